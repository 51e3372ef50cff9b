"""audit: rates recomputed from the PNGs with Wilson intervals, per prompt, plots, offenders
with thumbnails, comparison of two runs, logs readable by pandas / pyarrow / DuckDB, and image
references that cannot leave the run directory."""

import glob
import io
import json
import math
import os
import shutil
import tarfile

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from PIL import Image

from spellshield.auditing.collapse import ACTIVE_STEP_LIMIT, FAR_FACTOR, FAR_SHARE_LIMIT
from spellshield.indexing.manifest import read_manifest
from spellshield.jobs.audit import audit, compare
from spellshield.jobs.cli import main
from spellshield.jobs.generate import generate, validate
from spellshield.jobs.runtime import UsageError
from tests.test_generate import gen_config, tar_images
from spellshield.auditing.run_files import RunError, resolve_image_ref
from spellshield.auditing.stats import wilson_interval


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


@pytest.mark.parametrize("options, message", [
    ({"radius": float("inf")}, "--radius must be a finite number, got inf"),
    ({"radius": True}, "--radius must be a number, got True"),  # the audit's own check took True for 1.0
    ({"top": -1}, "--top must be >= 0, got -1"),  # ... and let a negative --top through
    ({"index": "file://host/index"}, "--index file://host/index: a file:// URI names a local path"),
])
def test_audit_api_checks_its_values_as_the_config_does(tmp_path, options, message):
    """jobs.audit.audit checks its values with AuditConfig's one check, before reading anything."""
    with pytest.raises(UsageError) as raised:
        audit(str(tmp_path / "no-run"), **options)
    assert str(raised.value).startswith(message)
    assert os.listdir(tmp_path) == []


def test_image_ref_inside(tmp_path):
    path, member = resolve_image_ref(str(tmp_path), "images/unit-00003.tar#s000012.png")
    assert path == os.path.join(str(tmp_path), "images", "unit-00003.tar") and member == "s000012.png"


@pytest.fixture(scope="module")
def runs(ray_session, memorizer_model, protected_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    plain, shielded = tmp / "plain", tmp / "shielded"
    generate(validate(gen_config(memorizer_model, plain, None, num_images=16, steps=25, unit_size=4)))
    generate(validate(gen_config(memorizer_model, shielded, protected_index, num_images=16, steps=25, unit_size=4)))
    return str(plain), str(shielded), protected_index


def copy_run(run, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(run, out)
    return str(out)


def section(page, title):
    start = page.index(title)
    end = page.find("<h2>", start + len(title))
    return page[start : end if end > 0 else None]


def test_audit_recomputes_from_images(runs):
    plain, shielded, index = runs
    summary = audit(plain, index=index)
    samples = pd.read_parquet(os.path.join(plain, "audit", "samples"))
    assert summary["num_samples"] == summary["num_images"] == len(samples) == 16
    k = summary["near_duplicates"]
    assert summary["near_duplicate_rate"] == k / 16 and k > 0
    assert summary["near_duplicate_rate_ci95"] == list(wilson_interval(k, 16))
    assert summary["per_prompt"] == [{"prompt_index": 0, "prompt": None, "near_duplicates": k, "num_samples": 16,
                                      "near_duplicate_rate": k / 16, "near_duplicate_rate_ci95": list(wilson_interval(k, 16))}]
    assert summary["schema_version"] == 2
    assert summary["verdict"] == {"status": "not gated", "exit_status": 0, "gate": None, "reasons": [], "warnings": []}
    assert summary["completeness"]["complete"] and summary["completeness"]["units_planned"] == 4
    assert summary["completeness"]["units_whole"] == 4 and summary["completeness"]["samples_planned"] == 16
    # offenders: only corpus images with audited images inside the radius, all of them counted
    offenders = summary["top_offenders"]
    assert offenders and all(o["samples_inside"] >= 1 for o in offenders) and sum(o["samples_inside"] for o in offenders) == k
    audit_dir = os.path.join(plain, "audit")
    for name in ("summary.json", "report.html", "nearest_distance.png", "thumbs/offender-000.png"):
        assert os.path.isfile(os.path.join(audit_dir, name)), name
    # an unshielded run has no corrected step: a sentence, not empty axes
    assert summary["hits"] == 0
    assert not os.path.exists(os.path.join(audit_dir, "corrected_per_step.png"))
    assert not os.path.exists(os.path.join(audit_dir, "correction_ratio.png"))
    page = open(os.path.join(audit_dir, "report.html")).read()
    assert "corrected no step" in section(page, "Share of trajectories corrected") and "<img" not in section(page, "Size of the corrections")
    assert "thumbs/offender-000.png" in page and offenders[0]["corpus_key"] in page
    # first screen: the rate as a percentage with its interval, the settings, never an absolute index path
    low, high = wilson_interval(k, 16)
    assert f"{100 * k / 16:.1f}% (95% CI {100 * low:.1f}% to {100 * high:.1f}%): {k} of 16 images" in page
    first_screen = page[: page.index("Distance of every image")]
    for label in ("Model", "Shield radius", "Overcompensation (lam)", "Correction iterations", "Breach policy",
                  "Audit index fingerprint (manifest sha256)"):
        assert f"<th>{label}</th>" in first_screen, label
    assert summary["audit"]["index_manifest_sha256"] in first_screen and os.path.abspath(index) not in page
    assert summary["index"] == os.path.basename(index) and os.path.abspath(index) not in open(os.path.join(audit_dir, "summary.json")).read()
    assert "near_duplicate_rate" not in page  # human headers, not JSON keys
    assert json.load(open(os.path.join(audit_dir, "summary.json")))["near_duplicates"] == k


def test_audit_of_shielded_run_uses_its_index(runs):
    plain, shielded, index = runs
    summary = audit(shielded)  # no --index: the run's own index and radius
    run = json.load(open(os.path.join(shielded, "run.json")))
    assert summary["recomputed_from_images"] and summary["radius"] == run["config"]["shield"]["radius"]
    assert summary["audit"]["radius_source"] == "the run's shield radius"
    assert summary["active_step_fraction"] > 0 and summary["correction_ratio_quantiles"]["1"] > 0
    assert len(summary["corrected_share_per_step"]) == 25
    assert summary["settings"]["overcompensation"] == run["config"]["spell"]["overcompensation"]
    assert summary["settings"]["shield_index_manifest_sha256"] == run["index_manifest_sha256"]
    for name in ("corrected_per_step.png", "correction_ratio.png", "nearest_distance.png"):
        assert os.path.isfile(os.path.join(shielded, "audit", name)), name
    page = open(os.path.join(shielded, "audit", "report.html")).read()
    if summary["near_duplicates"] == 0:  # the shield worked: one line, no empty table
        assert "No offenders" in page and summary["top_offenders"] == []


def test_collapse_figures_match_the_calibration(runs):
    plain, shielded, index = runs
    summary = audit(shielded, index=index)
    checked = audit_distances(shielded)
    q90 = read_manifest(index).calibration["nn_distance_quantiles"]["0.9"]
    collapse = summary["collapse"]
    assert collapse["far_threshold"] == pytest.approx(FAR_FACTOR * q90)
    assert collapse["far_share"] == pytest.approx(float(np.mean(checked > FAR_FACTOR * q90)))
    rows = pd.read_parquet(os.path.join(shielded, "audit", "samples"))  # every attempt, resampled ones too
    assert collapse["active_step_fraction"] == pytest.approx(rows["active_steps"].sum() / rows["steps"].sum())
    expected = summary["active_step_fraction"] > ACTIVE_STEP_LIMIT or collapse["far_share"] > FAR_SHARE_LIMIT
    assert collapse["warning"] == expected


def numpy(x):
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def audit_distances(run):
    """Every written image's nearest protected distance, by brute force over the index's vectors."""
    from spellshield.indexing.encoders import Encoder
    from spellshield.indexing.search import open_index

    run_json = json.load(open(os.path.join(run, "run.json")))
    shield = open_index(run_json["config"]["shield"]["index"])
    vectors = numpy(shield.vectors(np.arange(shield.manifest.count))).reshape(shield.manifest.count, -1).astype(np.float64)
    encoder = Encoder(shield.manifest.latent.encoder).init()
    out = []
    for tar in sorted(glob.glob(os.path.join(run, "images", "*.tar"))):
        for image in tar_images(tar).values():
            z = numpy(encoder.encode(image[None])).reshape(1, -1).astype(np.float64)
            out.append(np.sqrt(((vectors - z) ** 2).sum(axis=1)).min())
    return np.array(out)


def test_collapsed_run_is_not_presented_as_success(ray_session, memorizer_model, protected_index, tmp_path):
    # A radius far too large for the corpus and a strong overcompensation: the shield bends
    # every trajectory; whatever the rate, the summary and the report say so with the figures.
    radius = 3 * read_manifest(protected_index).calibration["nn_distance_quantiles"]["0.9"]
    out = tmp_path / "collapsed"
    generate(validate(gen_config(memorizer_model, out, protected_index, num_images=8, steps=20, radius=radius,
                               overcompensation=10.0, unit_size=8, on_breach="flag")))
    summary = audit(str(out))
    collapse = summary["collapse"]
    assert summary["num_images"] == 8 and summary["active_step_fraction"] == collapse["active_step_fraction"]
    assert collapse["warning"] and summary["active_step_fraction"] > ACTIVE_STEP_LIMIT
    assert f"corrected {summary['active_step_fraction']:.1%} of all denoising steps" in collapse["reasons"][0]
    assert any(w.startswith("collapse: ") for w in summary["verdict"]["warnings"])
    page = open(os.path.join(out, "audit", "report.html")).read()
    first_screen = page[: page.index("<h2>Run settings")]
    assert "Warnings" in first_screen and f"{summary['active_step_fraction']:.1%}" in first_screen


def test_compare_two_runs(runs, capsys):
    plain, shielded, index = runs
    a, b = audit(shielded, index=index), audit(plain, index=index)
    path = compare(shielded, plain, a, b)
    page = open(path).read()
    assert "shielded" in page and "plain" in page and os.path.isfile(os.path.join(shielded, "audit", "compare_corrected_per_step.png"))
    assert "Not like for like" not in page  # same model, same audit index and radius
    assert main(["audit", shielded, "--index", index, "--compare", plain]) == 0
    # another radius for one of them: the comparison says so
    c = audit(plain, index=index, radius=2 * a["radius"])
    page = open(compare(shielded, plain, a, c)).read()
    assert "Not like for like" in page and "different radii" in page


def gate_exit(run, index, *options):
    code = main(["audit", run, "--index", index, *options])
    return code, json.load(open(os.path.join(run, "audit", "summary.json")))["verdict"]


def test_gate_on_the_upper_bound_and_on_the_rate(runs, capsys):
    plain, shielded, index = runs
    summary = audit(plain, index=index)
    k = summary["near_duplicates"]
    upper = wilson_interval(k, 16)[1]
    code, verdict = gate_exit(plain, index, "--fail-above", repr(upper))
    assert code == 0 and verdict["status"] == "pass" and verdict["gate"] == {"fail_above": upper, "on": "upper", "value": upper}
    code, verdict = gate_exit(plain, index, "--fail-above", repr(upper - 1e-6))
    assert code == 1 and verdict["status"] == "fail" and "upper bound" in verdict["reasons"][0]
    assert "FAIL" in capsys.readouterr().err
    code, verdict = gate_exit(plain, index, "--fail-above", repr(k / 16), "--fail-on", "rate")
    assert code == 0 and verdict["gate"]["value"] == k / 16
    code, verdict = gate_exit(plain, index, "--fail-above", repr(k / 16 - 1e-6), "--fail-on", "rate")
    assert code == 1
    for bad in ("1.5", "-0.1", "nan"):
        assert main(["audit", plain, "--index", index, "--fail-above", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spellshield audit: error: --fail-above must be a rate in [0, 1]")
    # an unshielded run audited without an index has no rate to gate on: bad input
    assert main(["audit", plain, "--fail-above", "0.5"]) == 2


def test_missing_unit_is_reported_and_fails_the_gate(runs, tmp_path, capsys):
    plain, shielded, index = runs
    run = copy_run(plain, tmp_path)
    os.remove(os.path.join(run, "images", "unit-00002.tar"))
    os.remove(os.path.join(run, "audit", "hits", "unit-00001.parquet"))
    summary = audit(run, index=index)
    completeness = summary["completeness"]
    assert not completeness["complete"] and completeness["units_whole"] == 2 and completeness["units_planned"] == 4
    assert [m["unit"] for m in completeness["missing_units"]] == ["unit-00001", "unit-00002"]
    assert completeness["missing_units"][0]["problems"] == ["hits file missing"]
    assert completeness["missing_units"][1]["problems"] == ["images file missing"]
    assert completeness["missing_images"] == 4 and summary["num_images"] == 12  # unit 2's 4 images are gone
    assert main(["audit", run, "--index", index, "--fail-above", "1"]) == 1
    verdict = json.load(open(os.path.join(run, "audit", "summary.json")))["verdict"]
    assert verdict["status"] == "fail" and any("2 of 4 planned units" in r for r in verdict["reasons"])
    page = open(os.path.join(run, "audit", "report.html")).read()
    assert "unit-00002 (4 samples): images file missing" in page
    # a whole unit deleted (the samples file too): "16 planned, 12 with rows"
    run2 = copy_run(plain, tmp_path, "run2")
    for kind in ("images/unit-00003.tar", "audit/hits/unit-00003.parquet", "audit/samples/unit-00003.parquet"):
        os.remove(os.path.join(run2, kind))
    summary = audit(run2, index=index)
    assert summary["completeness"]["missing_samples"] == 4 and summary["num_samples"] == 12
    assert "4 of 16 planned samples have no row" in summary["completeness"]["problems"]


def test_image_no_row_names_is_audited_and_fails_the_gate(runs, digits_corpus, tmp_path):
    # issue 13.5: a protected image slipped into a finished run's tar, and a stray tar
    plain, shielded, index = runs
    run = copy_run(shielded, tmp_path)
    before = audit(run, index=index)
    from spellshield.indexing.corpus import Sample, decode_image, iter_shard

    first = next(item for item in iter_shard(digits_corpus[0]) if isinstance(item, Sample))
    png = io.BytesIO()
    Image.fromarray(decode_image(first.image, 8)).save(png, format="PNG")
    with tarfile.open(os.path.join(run, "images", "unit-00000.tar"), "a") as tar:
        info = tarfile.TarInfo("extra.png")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    with tarfile.open(os.path.join(run, "images", "stray.tar"), "w") as tar:
        info = tarfile.TarInfo("noise.png")
        noise = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(noise, format="PNG")
        info.size = len(noise.getvalue())
        tar.addfile(info, io.BytesIO(noise.getvalue()))
    summary = audit(run, index=index)
    written = before["num_samples"]  # 16 requested; a sample copied on every attempt is dropped, not written
    assert written >= 14 and summary["num_samples"] == written and summary["num_images"] == written + 2
    assert summary["near_duplicates"] == before["near_duplicates"] + 1  # the protected image, at distance 0
    assert summary["near_duplicate_rate"] == summary["near_duplicates"] / (written + 2)
    completeness = summary["completeness"]
    assert completeness["unlisted_images"] == 2 and not completeness["complete"]
    assert completeness["unlisted_image_examples"] == ["images/stray.tar#noise.png", "images/unit-00000.tar#extra.png"]
    assert any(o["closest_sample"] == "images/unit-00000.tar#extra.png" and o["min_distance"] < 1e-4 for o in summary["top_offenders"])
    assert main(["audit", run, "--index", index, "--fail-above", "1"]) == 1


def test_resume_regenerates_missing_units_of_a_finished_run(runs, memorizer_model, tmp_path, capsys):
    plain, shielded, index = runs
    run = copy_run(shielded, tmp_path)
    before = {k: v for tar in sorted(glob.glob(os.path.join(run, "images", "*.tar"))) for k, v in tar_images(tar).items()}
    rows_before = pd.read_parquet(os.path.join(run, "audit", "samples", "unit-00001.parquet"))
    os.remove(os.path.join(run, "images", "unit-00001.tar"))  # a disk problem: the unit's marker stays
    for kind in ("images/unit-00003.tar", "audit/hits/unit-00003.parquet", "audit/samples/unit-00003.parquet"):
        os.remove(os.path.join(run, kind))
    assert json.load(open(os.path.join(run, "run.json")))["status"] == "finished"
    # the fixture's runs were made through the Python API: resume with the same options
    options = ["--model", memorizer_model, "--index", index, "--num-images", "16", "--steps", "25", "--unit-size", "4",
               "--batch-size", "4", "--seed", "100", "--overcompensation", "1.6", "--correction-iterations", "1"]
    assert main(["generate", "--resume", run] + options) == 0
    err = capsys.readouterr().err
    assert "2 unit(s) are not whole on disk" in err and "unit-00001: images file missing" in err
    after = {k: v for tar in sorted(glob.glob(os.path.join(run, "images", "*.tar"))) for k, v in tar_images(tar).items()}
    assert sorted(after) == sorted(before) and all((after[k] == before[k]).all() for k in before)
    cols = ["sample", "attempt", "seed", "nearest_id", "nearest_distance", "inside_shield", "action", "image"]
    pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(run, "audit", "samples", "unit-00001.parquet"))[cols], rows_before[cols])
    info = json.load(open(os.path.join(run, "run.json")))
    assert info["status"] == "finished" and info["progress"]["resumed_units_skipped"] == 2
    assert main(["generate", "--resume", run] + options) == 0
    assert "every unit is whole on disk; nothing to do" in capsys.readouterr().err
    assert audit(run)["completeness"]["complete"]


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
    # ties broken by sample and attempt: copies resampled by the final check share distance 0
    worst = con.execute(f"SELECT sample FROM '{shielded}/audit/samples/*.parquet' "
                        "ORDER BY nearest_distance, sample, attempt LIMIT 1").fetchone()[0]
    assert worst == samples.sort_values(["nearest_distance", "sample", "attempt"]).iloc[0]["sample"]


def test_tampered_image_reference_is_refused(runs, tmp_path):
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


def test_report_shows_the_three_judges_and_the_flagged_images(runs):
    # issue 14: the perceptual and off-manifold judges beside the L2 one, each rate against a
    # recomputation here (the final check on every written PNG), and the grid of flagged images
    from spellshield.auditing.report import judge_rate_text
    from spellshield.indexing.encoders import Encoder
    from spellshield.indexing.search import open_index
    from spellshield.workers.final_check import check_images, prepare_judges

    plain, _, index = runs
    summary = audit(plain, index=index)
    images = {}
    for tar in sorted(glob.glob(os.path.join(plain, "images", "*.tar"))):
        images.update({f"images/{os.path.basename(tar)}#{m}.png": im for m, im in tar_images(tar).items()})
    shield = open_index(index)
    encoder = Encoder(shield.manifest.latent.encoder).init()
    check = check_images(np.stack(list(images.values())), encoder, shield, summary["radius"], prepare_judges(shield, encoder))
    second = summary["second_judges"]
    for key, flags in (("perceptual_copy", check.perceptual_copy), ("off_manifold", check.off_manifold)):
        k = int(flags.sum())
        assert second[key] == {"near_duplicates": k, "num_samples": 16, "near_duplicate_rate": k / 16,
                               "near_duplicate_rate_ci95": list(wilson_interval(k, 16))}, key
    assert check.inside.sum() == summary["near_duplicates"]
    flagged = check.perceptual_copy | check.off_manifold
    assert flagged.any()  # the unshielded memorizer copies protected digits
    listed = second["flagged"]
    assert listed["total"] == int(flagged.sum()) and listed["grid"] == "judges_flagged.png"
    assert sorted(f["image"] for f in listed["images"]) == sorted(r for r, f in zip(images, flagged) if f)
    keys = dict(zip(images, check.perceptual_keys))
    assert all(f["protected_key"] == keys[f["image"]] for f in listed["images"] if "perceptual copy" in f["judge"])
    with Image.open(os.path.join(plain, "audit", "judges_flagged.png")) as grid:  # 8x8 digits, pairs 8 a row, 2x
        shown = len(listed["images"])
        assert grid.size == (min(8, shown) * (2 * 8 + 6) * 2, -(-shown // 8) * (8 + 2) * 2)
    page = open(os.path.join(plain, "audit", "report.html")).read()
    judges = section(page, "The three judges")
    for key in ("perceptual_copy", "off_manifold"):
        assert judge_rate_text(second[key]) in judges
    assert "L2 (the shield&#x27;s)" in judges and '<img src="judges_flagged.png"' in judges


def test_flagged_order_is_the_same_whatever_order_the_recheck_tasks_finished_in():
    # exact copies tie at distance 0; the report's list must not depend on which tar's task
    # returned first (found by the fresh-clone CI: S3 and local audits listed them differently)
    from spellshield.jobs.audit import flagged_order

    rows = pd.DataFrame({
        "image": ["u1#b", "u0#a", "u1#c", "u0#d", "u0#e", "u1#f"],
        "audit_perceptual_copy": [True, True, True, False, False, False],
        "audit_descriptor_copy": [None, None, None, True, None, None],
        "audit_off_manifold": [False, False, True, False, True, True],
        "audit_perceptual_distance": [0.0, 0.0, 0.1, 0.5, 0.6, 0.6],
        "audit_descriptor_similarity": [0.0, 0.0, 0.0, 0.9, 0.0, 0.0],
        "audit_nearest_distance": [1.0, 1.0, 1.0, 1.0, 2.0, 3.0],
    })
    expected = ["u0#a", "u1#b", "u1#c", "u0#d", "u1#f", "u0#e"]
    for seed in range(6):
        shuffled = rows.sample(frac=1, random_state=seed)
        assert list(flagged_order(shuffled)["image"]) == expected, seed
