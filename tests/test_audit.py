"""audit: rates recomputed from the PNGs with Wilson intervals, per prompt, plots, offenders
with thumbnails, comparison of two runs, logs readable by pandas / pyarrow / DuckDB, and image
references that cannot leave the run directory."""

import json
import math
import os

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from spellshield.jobs.audit import audit, compare
from spellshield.jobs.cli import main
from spellshield.jobs.generate import generate, validate
from spellshield.jobs.runtime import UsageError
from tests.test_generate import gen_config
from spellshield.workers.audit import RunError, resolve_image_ref, wilson_interval


def test_wilson_hand_worked():
    # k = 0, n = 10: upper = z^2 / (n + z^2) = 3.8415 / 13.8415
    low, high = wilson_interval(0, 10)
    assert low == 0 and math.isclose(high, 3.841459 / 13.841459, rel_tol=1e-6)
    # k = 5, n = 10: centre 0.5, half = z sqrt(.025 + z^2/400) / (1 + z^2/10)
    low, high = wilson_interval(5, 10)
    half = 1.959964 * math.sqrt(0.025 + 1.959964**2 / 400) / (1 + 1.959964**2 / 10)
    assert math.isclose(low, 0.5 - half, rel_tol=1e-5) and math.isclose(high, 0.5 + half, rel_tol=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("ref", [
    "../x.tar#a.png", "/abs/images/unit-00000.tar#a.png", "images/../../x.tar#a.png", "images/unit-00000.tar#../a.png",
    "images/unit-00000.tar#a/b.png", "audit/samples/unit-00000.tar#a.png", "images/unit-00000.tar", "images\\u.tar#a.png",
])
def test_image_refs_never_escape(tmp_path, ref):
    with pytest.raises(RunError):
        resolve_image_ref(str(tmp_path), ref)


def test_image_ref_inside(tmp_path):
    path, member = resolve_image_ref(str(tmp_path), "images/unit-00003.tar#s000012.png")
    assert path == os.path.join(str(tmp_path), "images", "unit-00003.tar") and member == "s000012.png"


@pytest.fixture(scope="module")
def runs(ray_session, memorizer_model, protected_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    plain, shielded = tmp / "plain", tmp / "shielded"
    generate(validate(gen_config(memorizer_model, plain, None, num_images=16, steps=25)))
    generate(validate(gen_config(memorizer_model, shielded, protected_index, num_images=16, steps=25)))
    return str(plain), str(shielded), protected_index


def test_audit_recomputes_from_images(runs):
    plain, shielded, index = runs
    summary = audit(plain, index=index)
    samples = pd.read_parquet(os.path.join(plain, "audit", "samples"))
    assert summary["num_samples"] == len(samples) == 16
    k = summary["near_duplicates"]
    assert summary["near_duplicate_rate"] == k / 16 and k > 0
    assert summary["near_duplicate_rate_ci95"] == list(wilson_interval(k, 16))
    assert summary["per_prompt"] == [{"prompt_index": 0, "prompt": None, "near_duplicates": k, "num_samples": 16,
                                      "near_duplicate_rate": k / 16, "near_duplicate_rate_ci95": list(wilson_interval(k, 16))}]
    offenders = summary["top_offenders"]
    assert offenders and offenders[0]["samples_inside"] >= 1 and sum(o["samples_inside"] for o in offenders) == k
    audit_dir = os.path.join(plain, "audit")
    for name in ("summary.json", "report.html", "corrected_per_step.png", "correction_ratio.png", "thumbs/offender-000.png"):
        assert os.path.isfile(os.path.join(audit_dir, name)), name
    page = open(os.path.join(audit_dir, "report.html")).read()
    assert "thumbs/offender-000.png" in page and offenders[0]["corpus_key"] in page
    assert json.load(open(os.path.join(audit_dir, "summary.json")))["near_duplicates"] == k


def test_audit_of_shielded_run_uses_its_index(runs):
    plain, shielded, index = runs
    summary = audit(shielded)  # no --index: the run's own index and radius
    assert summary["recomputed_from_images"] and summary["radius"] == json.load(open(os.path.join(shielded, "run.json")))["config"]["shield"]["radius"]
    assert summary["active_step_fraction"] > 0 and summary["correction_ratio_quantiles"]["1"] > 0
    assert len(summary["corrected_share_per_step"]) == 25


def test_compare_two_runs(runs):
    plain, shielded, index = runs
    a, b = audit(shielded, index=index), audit(plain, index=index)
    path = compare(shielded, plain, a, b)
    page = open(path).read()
    assert "shielded" in page and "plain" in page and os.path.isfile(os.path.join(shielded, "audit", "compare_corrected_per_step.png"))
    assert main(["audit", shielded, "--index", index, "--compare", plain]) == 0


def test_logs_readable_by_pandas_pyarrow_duckdb(runs):
    plain, shielded, index = runs
    samples = pd.read_parquet(os.path.join(shielded, "audit", "samples"))
    hits = pq.read_table(os.path.join(shielded, "audit", "hits")).to_pandas()
    assert pq.read_schema(os.path.join(shielded, "audit", "hits", "unit-00000.parquet")).metadata[b"spellshield.schema_version"] == b"1"
    con = duckdb.connect()
    rows = con.execute(f"SELECT count(*) FROM read_parquet('{shielded}/audit/**/*.parquet', union_by_name=true)").fetchone()[0]
    assert rows == len(samples) + len(hits)
    per_source = dict(con.execute(f"SELECT source, count(*) FROM '{shielded}/audit/hits/*.parquet' GROUP BY source").fetchall())
    assert per_source == hits.groupby("source").size().to_dict()
    worst = con.execute(f"SELECT sample FROM '{shielded}/audit/samples/*.parquet' ORDER BY nearest_distance LIMIT 1").fetchone()[0]
    assert worst == samples.sort_values("nearest_distance").iloc[0]["sample"]


def test_tampered_image_reference_is_refused(runs, tmp_path):
    import shutil

    plain, shielded, index = runs
    run = tmp_path / "run"
    shutil.copytree(plain, run)
    path = run / "audit" / "samples" / "unit-00000.parquet"
    table = pq.read_table(path).to_pandas()
    table.loc[0, "image"] = "images/../../../outside.tar#x.png"
    from spellshield.pipeline.records import SAMPLE_SCHEMA
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(table, schema=SAMPLE_SCHEMA, preserve_index=False), path)
    with pytest.raises(UsageError, match="points outside"):
        audit(str(run), index=index)
