"""audit on a real S3 server (SeaweedFS): the run, the index and the compared run on s3://, read
through the commit protocol (committed units only, the leftovers of an aborted attempt ignored,
a committed unit not yet published read from its stage), the report written back to the run's
own audit/ prefix, nothing written to the working directory; the numbers are those of the same
run audited on local disk. Bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spellshield import storage
from spellshield.jobs.cli import main
from spellshield.storage.cache import CACHE_ENV
from spellshield.storage.commit import ATTEMPTS, committed_units
from tests.s3server import READER
from tests.test_storage_generate import GEN, machine_env, run_generate

REPORT = ["audit/summary.json", "audit/report.html", "audit/nearest_distance.png"]  # and a thumbnail per offender
SAME = ["num_samples", "num_images", "near_duplicates", "near_duplicate_rate", "near_duplicate_rate_ci95", "radius",
        "per_prompt", "top_offenders", "completeness", "collapse", "verdict", "second_judges"]


def objects(prefix: str) -> list[str]:
    base = storage.resolve(prefix).uri.rstrip("/") + "/"
    return sorted(loc.uri[len(base):] for loc in storage.list_dir(prefix, recursive=True))


def leave_aborted_attempt(run: str) -> None:
    """What a writer killed before its commit leaves: staged files of a unit no record commits,
    here a copy of unit-00000's files posing as unit-00007 (which the plan does not even have)."""
    stage = f"{run}/{ATTEMPTS}/unit-00007/{'a' * 32}"
    for name in ("images/unit-00000.tar", "audit/hits/unit-00000.parquet", "audit/samples/unit-00000.parquet"):
        storage.copy(f"{run}/{name}", f"{stage}/{name.replace('00000', '00007')}")


def unpublish(run: str, unit: str) -> None:
    """What a writer killed between commit and publication leaves: the record and the stage it
    names, no published file."""
    record = committed_units(run)[unit]
    for item in record["files"]:
        storage.copy(f"{run}/{item['name']}", f"{run}/{ATTEMPTS}/{unit}/{record['attempt']}/{item['name']}")
        storage.delete(f"{run}/{item['name']}")


@pytest.mark.slow
def test_audit_on_s3(ray_session, s3_server, s3_env, s3_bucket, memorizer_model, protected_index, tmp_path):
    from spellshield.jobs.audit import audit

    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    run, other = f"{s3_bucket}/run", f"{s3_bucket}/other"
    home, env = machine_env(s3_server, tmp_path, "driver")
    code, err = run_generate(["--model", memorizer_model, "--out", run, *GEN], env, home)
    assert code == 0, err
    for name in objects(run):  # the run to compare with: a copy on the same store
        storage.copy(f"{run}/{name}", f"{other}/{name}")
    # the reference: the same run copied to local disk and audited there
    local = tmp_path / "local-run"
    storage.copy_prefix_to_local(run, str(local))
    reference = audit(str(local), index=protected_index, quiet=True)
    assert reference["near_duplicates"] > 0 and reference["completeness"]["complete"]
    duckdb_reads_the_logs(run, local)

    leave_aborted_attempt(run)
    unpublish(run, "unit-00001")
    before = objects(run)
    code, err = run_job_audit([run, "--index", f"{s3_bucket}/index", "--compare", other], env, home)
    assert code == 0, err
    assert os.listdir(home) == []  # the driver's working directory holds nothing
    assert f"audit: report: {run}/audit/report.html" in err and f"audit: comparison: {run}/audit/compare.html" in err
    written = objects(run)
    thumbs = [f"audit/thumbs/offender-{i:03d}.png" for i in range(len(reference["top_offenders"]))]
    # the judges' grid of flagged images, when the judges flagged any (as in the local reference)
    flagged = ["audit/judges_flagged.png"] if (reference["second_judges"].get("flagged") or {}).get("grid") else []
    assert sorted(set(written) - set(before)) == sorted(REPORT + thumbs + flagged + ["audit/compare.html"])
    assert set(before) <= set(written)  # nothing read was changed or removed: the audit only adds its report
    summary = storage.read_json(f"{run}/audit/summary.json")
    assert {k: summary[k] for k in SAME} == {k: reference[k] for k in SAME}
    assert summary["num_images"] == 8 and summary["report"] == f"{run}/audit/report.html"
    assert summary["audit"]["index_manifest_sha256"] == reference["audit"]["index_manifest_sha256"]
    page = storage.read_bytes(f"{run}/audit/report.html").decode()
    assert "thumbs/offender-000.png" in page and "127.0.0.1" not in page
    assert "run (B)" in storage.read_bytes(f"{run}/audit/compare.html").decode()
    assert storage.read_json(f"{other}/audit/summary.json")["near_duplicates"] == reference["near_duplicates"]
    for text in (json.dumps(summary), page):
        assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in text


def duckdb_connection():
    """DuckDB with the httpfs extension of the ``duckdb-ext-httpfs`` wheel (no network: the wheel
    ships ``duckdb_ext/extensions/v<version>/<platform>/httpfs.duckdb_extension``, the layout of
    an extension directory) and an S3 secret from the AWS_* variables (docs/storage.md)."""
    import importlib.util
    from urllib.parse import urlparse

    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    extensions = os.path.join(list(importlib.util.find_spec("duckdb_ext").submodule_search_locations)[0], "extensions")
    con.execute(f"SET extension_directory = '{extensions}'")
    con.execute("LOAD httpfs")
    endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
    con.execute(f"""CREATE SECRET spellshield_s3 (TYPE s3, KEY_ID '{os.environ["AWS_ACCESS_KEY_ID"]}',
                    SECRET '{os.environ["AWS_SECRET_ACCESS_KEY"]}', REGION '{os.environ.get("AWS_REGION", "us-east-1")}',
                    ENDPOINT '{endpoint.netloc}', URL_STYLE 'path', USE_SSL {str(endpoint.scheme == "https").lower()})""")
    return con


def duckdb_reads_the_logs(run: str, local) -> None:
    """The run's sample and hit rows, read by DuckDB straight from S3, are those on local disk."""
    import pandas as pd

    con = duckdb_connection()
    samples = con.sql(f"SELECT * FROM read_parquet('{run}/audit/samples/*.parquet') ORDER BY sample, attempt").df()
    expected = pd.read_parquet(local / "audit" / "samples").sort_values(["sample", "attempt"]).reset_index(drop=True)
    assert sorted(samples.loc[samples["image"].notna(), "sample"]) == [f"s{i:06d}" for i in range(8)]
    pd.testing.assert_frame_equal(samples[["sample", "attempt", "seed", "unit", "nearest_distance"]],
                                  expected[["sample", "attempt", "seed", "unit", "nearest_distance"]], check_dtype=False)
    hits = con.sql(f"SELECT * FROM read_parquet('{run}/audit/hits/*.parquet')").df()
    assert len(hits) == len(pd.read_parquet(local / "audit" / "hits")) and {"step", "distance", "radius"} <= set(hits.columns)


def run_job_audit(argv, env, cwd):
    from tests.s3server import run_job

    return run_job("audit", argv, env, cwd)


# heavy: the CI budget (30 min on 2 cores); the same path is covered in CI by test_audit_on_s3 (the CLI) and test_readme_python_runs_as_written (the API); run with -m heavy
@pytest.mark.heavy
def test_api_audit_on_s3(s3_server, s3_env, s3_bucket, memorizer_model, protected_index, tmp_path):
    """spellshield.audit(run=s3://..., index=s3://...) in a fresh process: the summary it returns
    is the one it wrote to the run's storage; a second audit redraws the report in place."""
    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    run = f"{s3_bucket}/run"
    home, env = machine_env(s3_server, tmp_path, "driver")
    code, err = run_generate(["--model", memorizer_model, "--out", run, *GEN], env, home)
    assert code == 0, err
    script = (f"import json, spellshield; s = spellshield.audit(run={run!r}, index={(s3_bucket + '/index')!r}); "
              f"print(json.dumps(s['near_duplicates']), s['report'])")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr
        near, report = proc.stdout.split()
        assert report == f"{run}/audit/report.html"
        assert storage.read_json(f"{run}/audit/summary.json")["near_duplicates"] == int(near)
    assert os.listdir(home) == []


@pytest.mark.parametrize("problem", ["unreachable", "credentials", "bucket", "no run", "read-only", "index"])
def test_bad_audit_input_on_s3(problem, capsys, s3_env, s3_bucket, tmp_path, monkeypatch):
    """audit of a run on S3 that cannot be used: one line naming the problem, exit 2, before Ray
    starts (no Ray session here), nothing written on the store or in the working directory."""
    from tests.s3server import free_ports

    run = f"{s3_bucket}/run"
    storage.write_json(f"{run}/run.json", {"status": "finished", "config": {}})
    before = objects(s3_bucket)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = [run]
    if problem == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
        expected = "cannot reach the object store at http://127.0.0.1:"
    elif problem == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-SECRET-VALUE")
        expected = "refused the credentials"
    elif problem == "bucket":
        argv, expected = ["s3://no-such-bucket-9/run"], "bucket no-such-bucket-9 does not exist"
    elif problem == "no run":
        argv, expected = [f"{s3_bucket}/nothing"], f"{s3_bucket}/nothing is not a run directory: no run.json"
    elif problem == "read-only":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
        expected = f"no permission to write {run}/audit"
    else:
        argv, expected = [run, "--index", f"{s3_bucket}/no-index"], f"{s3_bucket}/no-index is not a finished index"
    code = main(["audit", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert err[0].startswith("spellshield audit: error: ") and "WRONG-SECRET-VALUE" not in err[0]
    for name, value in s3_env.env().items():  # back to the working identity to look
        monkeypatch.setenv(name, value)
    assert objects(s3_bucket) == before and os.listdir(tmp_path) == []
