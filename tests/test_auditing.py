"""The audit's plain parts without Ray, on hand-worked cases: the gate's verdict, the collapse
criteria, a unit checked whole against its plan (real files written by the unit writer), the
plan read back from run.json, relative paths refused in a Ray job, and the progress helper."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from spellshield.auditing.collapse import ACTIVE_STEP_LIMIT, FAR_FACTOR, assess_collapse
from spellshield.auditing.completeness import check_completeness
from spellshield.auditing.report import comparison_warnings, rate_text
from spellshield.auditing.stats import rate, wilson_interval
from spellshield.auditing.summary import EXIT_FAIL, run_settings, verdict
from spellshield.pipeline.config import GateConfig
from spellshield.jobs.paths import check_job_paths
from spellshield.jobs.progress import ProgressBar, format_seconds
from spellshield.jobs.runtime import UsageError
from spellshield.workers.unit_writer import missing_units, unit_paths, unit_problems, units_to_run, write_unit
from spellshield.pipeline.config import GenerateConfig
from spellshield.workers.units import PromptRequest, plan_from_record, plan_samples, plan_units


def summary_with(k, n, complete=True, problems=()):
    return {**rate([True] * k + [False] * (n - k)), "num_images": n,
            "completeness": {"complete": complete, "problems": list(problems)}, "collapse": {"reasons": []}}


@pytest.mark.parametrize("on, limit, status", [
    ("upper", 0.25, "pass"), ("upper", 0.2, "fail"), ("rate", 0.0625, "pass"), ("rate", 0.06, "fail"),
])
def test_gate_on_upper_bound_or_rate(on, limit, status):
    # k = 1 of n = 16: rate 0.0625, Wilson upper bound 0.2832 (hand-checked below)
    summary = summary_with(1, 16)
    upper = wilson_interval(1, 16)[1]
    assert upper == pytest.approx(0.28328, abs=1e-4)
    if on == "upper":
        limit = upper if status == "pass" else upper - 1e-9
    out = verdict(summary, GateConfig(limit, on))
    assert out["status"] == status and out["exit_status"] == (0 if status == "pass" else EXIT_FAIL)
    assert out["gate"]["value"] == (upper if on == "upper" else 1 / 16)


def test_incomplete_run_fails_the_gate_whatever_the_rate():
    summary = summary_with(0, 16, complete=False, problems=["1 of 4 planned units are not whole on disk (unit-00001)"])
    out = verdict(summary, GateConfig(1.0))
    assert out["status"] == "fail" and out["exit_status"] == 1
    assert out["reasons"] == ["incomplete: 1 of 4 planned units are not whole on disk (unit-00001)"]
    ungated = verdict(summary, None)  # without a gate the same finding is a warning, exit 0
    assert ungated["status"] == "not gated" and ungated["exit_status"] == 0 and ungated["warnings"] == out["reasons"]


@pytest.mark.parametrize("bad", [(-0.1, "upper"), (1.5, "upper"), (float("nan"), "upper"), (0.1, "mean")])
def test_gate_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        GateConfig(*bad)


def test_rate_text_is_a_percentage_with_its_interval():
    low, high = wilson_interval(3, 16)
    assert rate_text(summary_with(3, 16)) == f"18.8% (95% CI {100 * low:.1f}% to {100 * high:.1f}%): 3 of 16 images"


def test_collapse_criteria_hand_worked():
    calibration = {"nn_distance_quantiles": {"0.5": 19.4, "0.9": 24.0}}
    threshold = FAR_FACTOR * 24.0  # 36
    # the run: 83% of steps corrected, outputs at ~40 against a corpus whose images are ~20 apart
    out = assess_collapse(0.83, [40.0, 41.0, 39.0, 12.0], calibration)
    assert out["warning"] and out["far_threshold"] == threshold and out["far_share"] == 0.75
    assert "83.0% of all denoising steps" in out["reasons"][0] and "75.0% of the images" in out["reasons"][1]
    # sparse corrections, outputs at the corpus's own distances: no warning
    quiet = assess_collapse(0.04, [18.0, 20.0, 37.0], calibration)
    assert not quiet["warning"] and quiet["far_share"] == pytest.approx(1 / 3)
    # exactly at the limits: not beyond them
    assert not assess_collapse(ACTIVE_STEP_LIMIT, [36.0, 36.0], calibration)["warning"]
    # no calibration: the distance criterion is not evaluated, and the summary says so
    uncalibrated = assess_collapse(0.1, [100.0], {})
    assert not uncalibrated["warning"] and uncalibrated["far_share"] is None and "no calibration" in uncalibrated["note"]


def test_comparison_warnings():
    base = {"radius": 4.0, "audit": {"index_manifest_sha256": "a" * 64},
            "settings": {"model": "m", "shielded": True, "shield_index_manifest_sha256": "a" * 64, "shield_radius": 4.0}}
    assert comparison_warnings(base, base) == []
    other = {"radius": 5.0, "audit": {"index_manifest_sha256": "b" * 64},
             "settings": {"model": "n", "shielded": True, "shield_index_manifest_sha256": "b" * 64, "shield_radius": 5.0}}
    found = " | ".join(comparison_warnings(base, other))
    for words in ("different indexes", "different radii (4 vs 5)", "different models (m vs n)",
                  "shielded by different indexes", "shielded with different radii"):
        assert words in found, words
    unshielded = {**base, "settings": {**base["settings"], "shielded": False, "shield_radius": None}}
    assert comparison_warnings(base, unshielded) == []  # shield vs no shield is the point of a comparison


def png(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_planned_unit(run_dir, unit, seeds=None):
    rows = []
    for i, spec in enumerate(unit.samples):
        rows.append({"run": "r", "unit": unit.index, "sample": spec.key, "prompt_index": spec.prompt_index, "prompt": None,
                     "seed": (seeds or {}).get(spec.key, spec.seed), "attempt": 1, "active_steps": 0, "steps": 5,
                     "max_correction_ratio": 0.0, "action": "kept", "image": f"images/{unit.name}.tar#{spec.key}.png",
                     "seconds": 0.1})
    write_unit(run_dir, unit.name, [(s.key, png(i), {}) for i, s in enumerate(unit.samples)], [], rows)


@pytest.fixture
def planned_run(tmp_path):
    config = GenerateConfig.build("model", str(tmp_path / "run"), requests=(PromptRequest(None, 10),), seed=40,
                                  unit_size=4).to_json()
    units = plan_from_record(config)
    run_dir = str(tmp_path / "run")
    for unit in units:
        write_planned_unit(run_dir, unit)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"status": "finished", "config": config}, f)
    return run_dir, units, config


def test_plan_from_record_is_generates_plan(planned_run):
    run_dir, units, config = planned_run
    assert units == plan_units(plan_samples([PromptRequest(None, 10)], 40), 4)
    assert [len(u.samples) for u in units] == [4, 4, 2] and units[2].samples[-1].seed == 49
    with pytest.raises(ValueError, match="does not describe a unit plan"):
        plan_from_record({"seed": 1})


def test_unit_checked_whole_against_its_plan(planned_run, tmp_path):
    run_dir, units, _ = planned_run
    assert missing_units(run_dir, units) == []
    paths = unit_paths(run_dir, units[1].name)
    os.remove(paths["images"])
    assert unit_problems(run_dir, units[1]) == ["images file missing"]
    # a member missing from a unit's tar
    with tarfile.open(unit_paths(run_dir, units[0].name)["images"], "w") as tar:
        data = png(0)
        info = tarfile.TarInfo(f"{units[0].samples[0].key}.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert unit_problems(run_dir, units[0]) == ["3 written image(s) missing from its tar, e.g. s000001.png"]
    # a unit written with another seed than planned
    write_planned_unit(run_dir, units[2], seeds={units[2].samples[1].key: 7})
    assert unit_problems(run_dir, units[2]) == ["1 sample(s) whose first attempt is not the planned seed, e.g. s000009"]
    # resume: every broken unit is to be run again, its done marker removed first
    todo = units_to_run(run_dir, units)
    assert [u.name for u in todo] == ["unit-00000", "unit-00001", "unit-00002"]
    assert not any(os.path.exists(unit_paths(run_dir, u.name)["samples"]) for u in todo)


def test_completeness_of_a_run_on_disk(planned_run):
    import pandas as pd

    run_dir, units, config = planned_run
    run = json.load(open(os.path.join(run_dir, "run.json")))
    samples = pd.read_parquet(os.path.join(run_dir, "audit", "samples"))
    whole = check_completeness(run_dir, run, samples)
    assert whole["complete"] and whole["units_planned"] == 3 and whole["samples_planned"] == 10 and whole["problems"] == []
    for kind in ("images", "hits", "samples"):
        os.remove(unit_paths(run_dir, units[2].name)[kind])
    with tarfile.open(os.path.join(run_dir, "images", "unit-00000.tar"), "a") as tar:
        data = png(9)
        info = tarfile.TarInfo("intruder.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    samples = pd.read_parquet(os.path.join(run_dir, "audit", "samples"))
    out = check_completeness(run_dir, {**run, "status": "running"}, samples)
    assert not out["complete"] and out["units_whole"] == 2 and out["missing_samples"] == 2
    assert out["missing_units"] == [{"unit": "unit-00002", "samples": 2,
                                     "problems": ["images file missing", "hits file missing", "samples file missing"]}]
    assert out["unlisted_images"] == 1 and out["unlisted_image_examples"] == ["images/unit-00000.tar#intruder.png"]
    assert out["problems"] == ["1 of 3 planned units are not whole on disk (unit-00002)",
                               "2 of 10 planned samples have no row",
                               "1 image file(s) in images/*.tar that no sample row names (audited anyway), "
                               "e.g. images/unit-00000.tar#intruder.png",
                               "run.json says the run is 'running', not finished"]


def test_relative_paths_refused_in_a_ray_job(monkeypatch):
    from types import SimpleNamespace

    args = SimpleNamespace(corpus="/data/a.tar,shards/b.tar", out="/abs/index", index=None)
    check_job_paths(args)  # not a Ray job: relative to the submitter's directory, left alone
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(UsageError, match=r"^--corpus shards/b.tar is a relative path, and this runs as a Ray job"):
        check_job_paths(args)
    check_job_paths(SimpleNamespace(corpus="s3://bucket/x.tar", out="/abs/index", run_dir="/abs/run"))
    with pytest.raises(UsageError, match="^RUN_DIR run is a relative path"):
        check_job_paths(SimpleNamespace(run_dir="run"))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_and_eta():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar("audit", total=100, unit="images", interval=10, stream=stream, tty=False, clock=clock)
    clock.now = 5.0
    bar.advance(25, detail="images/unit-00000.tar")
    assert bar.eta() == pytest.approx(15.0)
    clock.now = 6.0
    bar.advance(5)  # within the interval: no line
    clock.now = 20.0
    bar.advance(50)
    clock.now = 21.0
    bar.advance(20)  # the last one always prints
    lines = stream.getvalue().splitlines()
    assert lines == ["audit: 25/100 images (25%), 5.00 images/s, elapsed 5s, ETA 15s [images/unit-00000.tar]",
                     "audit: 80/100 images (80%), 4.00 images/s, elapsed 20s, ETA 5s",
                     "audit: 100/100 images (100%), 4.76 images/s, elapsed 21s, ETA 0s"]
    tty = io.StringIO()
    bar = ProgressBar("build-index", total=4, unit="tars", stream=tty, tty=True, clock=clock)
    bar.advance(1)
    bar.close()
    assert tty.getvalue().startswith("\r[######                  ] build-index: 1/4 tars (25%)") and tty.getvalue().endswith("\n")
    assert format_seconds(3725) == "1h02m" and format_seconds(75) == "1m15s"
    quiet = io.StringIO()
    ProgressBar("x", total=1, stream=quiet, quiet=True).advance(1)
    assert quiet.getvalue() == ""


def test_run_settings_read_run_json_through_the_config():
    config = GenerateConfig.build("/models/memo", "/runs/r1", index="/idx/digits", radius=2.5, steps=20,
                                  overcompensation=1.6, on_breach="flag")
    settings = run_settings({"config": config.to_json(), "status": "finished", "index_manifest_sha256": "ab" * 32})
    assert settings["model"] == "memo" and settings["shield_index"] == "digits" and settings["shielded"]
    assert (settings["shield_radius"], settings["steps"], settings["overcompensation"], settings["on_breach"]) == (2.5, 20, 1.6, "flag")
    assert settings["max_attempts"] == 4 and settings["shield_index_manifest_sha256"] == "ab" * 32
    unreadable = run_settings({"config": {"shield": {"radius": -1}}, "status": "running"})
    assert set(unreadable) == set(settings) and unreadable["status"] == "running" and not unreadable["shielded"]
    assert all(v is None for k, v in unreadable.items() if k not in ("status", "shielded"))


def test_recheck_columns_of_a_final_check():
    """A rechecked image's judge columns, from a hand-made FinalCheck: the declared JUDGE_COLUMNS in
    order, typed, the descriptor's null when the index has no descriptor judge."""
    from spellshield.workers.audit import JUDGE_COLUMNS, L2_COLUMNS, L2_FIELDS, perceptual_audit_columns
    from spellshield.workers.final_check import FinalCheck

    judged = dict(ids=np.array([4, 9]), keys=["a", "b"], distances=np.array([0.5, 2.0]), inside=np.array([True, False]),
                  off_manifold=np.array([False, True]), perceptual_ids=np.array([4, 7]), perceptual_keys=["a", "c"],
                  perceptual_distances=np.array([0.1, 3.0]), perceptual_ssim=np.array([0.9, 0.2]),
                  perceptual_copy=np.array([True, False]))
    plain = FinalCheck(**judged)
    assert list(perceptual_audit_columns(plain, 1).items()) == [
        ("audit_perceptual_copy", False), ("audit_perceptual_id", 7), ("audit_perceptual_key", "c"),
        ("audit_perceptual_distance", 3.0), ("audit_perceptual_ssim", 0.2), ("audit_off_manifold", True),
        ("audit_descriptor_copy", None), ("audit_descriptor_id", None), ("audit_descriptor_key", None),
        ("audit_descriptor_similarity", None)]
    described = FinalCheck(**judged, descriptor_ids=np.array([5, 6]), descriptor_keys=["d", "e"],
                           descriptor_similarity=np.array([0.95, 0.1]), descriptor_copy=np.array([True, False]))
    columns = perceptual_audit_columns(described, 0)
    assert tuple(columns) == JUDGE_COLUMNS and L2_COLUMNS == tuple(L2_FIELDS)
    assert [columns[c] for c in JUDGE_COLUMNS[-4:]] == [True, 5, "d", 0.95]
    assert all(type(columns[c]) is t for c, t in (("audit_perceptual_copy", bool), ("audit_perceptual_id", int),
                                                   ("audit_descriptor_similarity", float)))
