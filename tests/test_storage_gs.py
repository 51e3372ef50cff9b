"""The three jobs with every path on gs://, against a real GCS emulator (fake-gcs-server, which
enforces the generation preconditions the commit protocol's create-only writes and lease
need): build-index from a gs:// corpus to a gs:// index (the index a local build writes, byte for
byte), generate with model, index and run on gs:// (every sample exactly once; a second driver
on the run refused), audit of the gs:// run (the summary of the same run audited on local disk).
The store's endpoint reaches no record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spellshield import storage
from spellshield.indexing.manifest import Manifest
from spellshield.jobs.cli import main
from spellshield.storage.cache import CACHE_ENV
from spellshield.storage.commit import ATTEMPTS, LEASE, committed_units
from tests.test_storage_audit import SAME
from tests.test_storage_generate import GEN
from tests.test_storage_jobs import put_corpus

SHARDS = 4
# protected_index's settings (tests/conftest.py): the gs:// build must write the same files
BUILD = ["--resolution", "8", "--batch-size", "256", "--shard-size", "300"]

# The jobs one after another on one local Ray cluster that this process starts (ray_cluster
# then reuses it): the CLI's own code paths, one Ray start instead of three.
JOBS = """
import json, sys, ray
from spellshield.jobs.cli import main
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
codes = []
for argv in json.loads(sys.argv[1]):
    codes.append(main(argv))
    if codes[-1]:
        break
print(json.dumps(codes))
"""


@pytest.mark.slow
def test_build_generate_audit_on_gs(capsys, ray_session, gcs_server, gcs_env, gcs_bucket, digits_corpus, memorizer_model,
                                    protected_index, tmp_path):
    from spellshield.jobs.audit import audit

    corpus = put_corpus(digits_corpus[:SHARDS], gcs_bucket)
    storage.put_tree(memorizer_model, f"{gcs_bucket}/model")
    index, run = f"{gcs_bucket}/index", f"{gcs_bucket}/run"
    home = tmp_path / "driver"  # a driver whose working directory holds none of the data
    home.mkdir()
    env = {**os.environ, **gcs_server.env(), CACHE_ENV: str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    jobs = [["build-index", "--corpus", corpus, "--out", index, *BUILD],
            ["generate", "--model", f"{gcs_bucket}/model", "--index", index, "--out", run, *GEN],
            ["audit", run, "--index", index]]
    proc = subprocess.run([sys.executable, "-c", JOBS, json.dumps(jobs)], cwd=home, env=env, capture_output=True, text=True,
                          timeout=900, start_new_session=True)
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1]) == [0, 0, 0], proc.stderr
    assert os.listdir(home) == []

    # build-index: the index a local build of the same shards writes
    manifest = Manifest.from_json(storage.read_json(f"{index}/manifest.json"))
    local = Manifest.from_json(storage.read_json(os.path.join(protected_index, "manifest.json")))
    assert manifest.count == local.count == 900 and manifest.shards == local.shards  # same files (sha256)
    for shard in manifest.shards:
        with open(os.path.join(protected_index, shard.file), "rb") as f:
            assert storage.read_bytes(f"{index}/{shard.file}") == f.read()
    assert storage.list_dir(f"{index}.partial", recursive=True) == []  # staging and its lease removed

    # generate: every sample exactly once, the units committed once, no attempt or lease left
    assert sorted(committed_units(run)) == ["unit-00000", "unit-00001"]
    assert storage.list_dir(f"{run}/{ATTEMPTS}", recursive=True) == [] and not storage.exists(f"{run}/{LEASE}")
    assert storage.read_json(f"{run}/run.json")["status"] == "finished"
    import pyarrow.dataset as ds

    location = storage.resolve(f"{run}/audit/samples")
    samples = ds.dataset(location.path, filesystem=location.fs, format="parquet").to_table().to_pandas()
    assert sorted(samples.loc[samples["image"].notna(), "sample"]) == [f"s{i:06d}" for i in range(8)]
    assert len(os.listdir(tmp_path / "cache" / "indexes")) == 1 and len(os.listdir(tmp_path / "cache" / "models")) == 1

    # audit: the summary of the same run copied to local disk and audited there
    summary = storage.read_json(f"{run}/audit/summary.json")
    copy = tmp_path / "local-run"
    storage.copy_prefix_to_local(run, str(copy))
    reference = audit(str(copy), index=protected_index, quiet=True)
    assert reference["completeness"]["complete"] and summary["num_images"] == 8
    assert {k: summary[k] for k in SAME} == {k: reference[k] for k in SAME}
    assert summary["report"] == f"{run}/audit/report.html" and storage.is_file(f"{run}/audit/report.html")

    # the store's endpoint (as a secret would be) reaches no record
    for record in (f"{run}/run.json", f"{index}/manifest.json", f"{run}/audit/summary.json", f"{run}/audit/report.html"):
        assert gcs_server.endpoint not in storage.read_bytes(record).decode(), record

    # a second driver on the finished run is refused, one line, before Ray
    capsys.readouterr()
    assert main(["generate", "--model", f"{gcs_bucket}/model", "--out", run, *GEN]) == 2
    assert capsys.readouterr().err.strip() == f"spellshield generate: error: {run} already holds a finished run; choose another --out"

