"""Exactly once and fail closed, with real processes: a worker actor killed with SIGKILL in the
middle of a unit, a driver stopped and resumed, a shield that cannot be searched."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from spellshield.jobs.cli import main
from tests.conftest import ROOT
from tests.test_generate import tar_images

pytestmark = pytest.mark.slow

RUN_ARGS = dict(num_images=40, unit_size=8, batch_size=8, steps=120, seed=7)


def cli_args(model, index, out):
    return ["--model", model, "--index", index, "--out", str(out), "--num-images", str(RUN_ARGS["num_images"]),
            "--unit-size", str(RUN_ARGS["unit_size"]), "--batch-size", str(RUN_ARGS["batch_size"]),
            "--steps", str(RUN_ARGS["steps"]), "--seed", str(RUN_ARGS["seed"]), "--workers", "1"]


@pytest.fixture(scope="module")
def clean_run(ray_session, memorizer_model, protected_index, tmp_path_factory):
    """The same options, run once without interruption (through the same CLI as the drivers)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(["generate"] + cli_args(memorizer_model, protected_index, out)) == 0
    return str(out)


def run_contents(run_dir):
    samples = pd.read_parquet(os.path.join(run_dir, "audit", "samples")).sort_values(["sample", "attempt"]).reset_index(drop=True)
    hits = pd.read_parquet(os.path.join(run_dir, "audit", "hits"))
    hits = hits.drop(columns=["run"]).sort_values(["sample", "attempt", "step", "iteration", "source", "neighbour_id"]).reset_index(drop=True)
    images = {}
    for tar in glob.glob(os.path.join(run_dir, "images", "*.tar")):
        for key, image in tar_images(tar).items():
            assert key not in images, f"{key} written twice"
            images[key] = image
    return samples, hits, images


def assert_same_as_clean(run_dir, clean_dir):
    samples, hits, images = run_contents(run_dir)
    clean_samples, clean_hits, clean_images = run_contents(clean_dir)
    # one row per attempt (a breach is resampled); every requested sample once among the written
    written = samples[samples["image"].notna()]
    assert set(samples["sample"]) == set(written["sample"]) and len(set(samples["sample"])) == RUN_ARGS["num_images"]
    assert written["sample"].is_unique
    assert sorted(images) == sorted(written["sample"]) == sorted(clean_images)
    for key in images:
        assert (images[key] == clean_images[key]).all()
    # hit rows of aborted attempts are not counted: exactly the clean run's rows
    pd.testing.assert_frame_equal(hits, clean_hits)
    cols = ["sample", "attempt", "seed", "nearest_id", "nearest_distance", "inside_shield", "active_steps", "action"]
    pd.testing.assert_frame_equal(samples[cols], clean_samples[cols])
    assert not glob.glob(os.path.join(run_dir, "**", "*.tmp-*"), recursive=True)


def driver(args, gcs_address):
    env = {**os.environ, "RAY_ADDRESS": gcs_address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "spellshield.jobs.generate"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def done_units(run_dir):
    return len(glob.glob(os.path.join(run_dir, "audit", "samples", "unit-*.parquet")))


def interrupted_run(ray_session, args, out, interrupt) -> tuple[int, str]:
    """Run a generate driver in its own process, call ``interrupt()`` once a first unit is done,
    and let the driver finish: (exit status, output)."""
    proc = driver(args, ray_session.get_runtime_context().gcs_address)
    try:
        wait_for(lambda: done_units(out) >= 1, what="a first unit")
        interrupt()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def kill_all(head, title: bytes) -> None:
    """SIGKILL this test cluster's processes titled ``title`` (by pid, found in the cluster's own
    process tree): never another cluster's worker of the same name."""
    victims = head.own_processes(title)
    assert victims, f"no {title!r} process in the test cluster"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)


def test_worker_killed_mid_unit(ray_session, ray_head, memorizer_model, protected_index, clean_run, tmp_path):
    out = tmp_path / "run"

    def kill_worker_mid_unit():
        wait_for(lambda: ray_head.own_processes(b"ray::GenerationWorker.run_unit"), what="a unit in progress")
        kill_all(ray_head, b"ray::GenerationWorker.run_unit")

    code, output = interrupted_run(ray_session, cli_args(memorizer_model, protected_index, out), out, kill_worker_mid_unit)
    assert code == 0, output[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished"
    assert run["progress"]["retries"] >= 1 and run["progress"]["actors_replaced"] >= 1
    assert_same_as_clean(str(out), clean_run)


def test_driver_stopped_then_resumed(ray_session, memorizer_model, protected_index, clean_run, tmp_path, capsys):
    out = tmp_path / "run"
    proc = driver(cli_args(memorizer_model, protected_index, out), ray_session.get_runtime_context().gcs_address)
    try:
        wait_for(lambda: done_units(out) >= 2, what="two units")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_before = done_units(out)
    assert finished_before < 5
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    # A new run cannot be started over it, and another config cannot resume it.
    assert main(["generate"] + cli_args(memorizer_model, protected_index, out)) == 2
    assert "--resume" in capsys.readouterr().err
    other = cli_args(memorizer_model, protected_index, out)
    other[other.index("--seed") + 1] = "8"
    assert main(["generate", "--resume", str(out)] + other) == 2
    assert "different config" in capsys.readouterr().err
    # The run's own options (here: none but --resume) finish it.
    assert main(["generate", "--resume", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["progress"]["resumed_units_skipped"] == finished_before
    assert_same_as_clean(str(out), clean_run)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_unsearchable_shield_fails_closed(ray_session, memorizer_model, protected_index, tmp_path, capsys, damage):
    index = tmp_path / "index"
    shutil.copytree(protected_index, index)
    shard = index / "shards" / "shard-00001.faiss"
    if damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    out = tmp_path / "run"
    code = main(["generate", "--model", memorizer_model, "--index", str(index), "--out", str(out),
                 "--num-images", "4", "--steps", "5", "--max-unit-attempts", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    expected = "does not match its sha256" if damage == "corrupt" else "is missing"
    assert expected in err[-1] and "unit 0 failed 2 times" in err[-1]
    # fail closed: not one image, not one audit row; and since no unit was ever written, the failed
    # start leaves no run behind (the same command runs again once the index is whole)
    assert "nothing was written: run the same command again" in err[-1]
    assert not out.exists()


def test_index_server_killed_mid_unit(ray_session, ray_head, memorizer_model, protected_index, clean_run, tmp_path):
    # The shield served by an index-shard actor: killing it fails the units that were searching
    # (nothing of them is written), Ray brings the server back, the units are retried.
    out = tmp_path / "run"
    args = cli_args(memorizer_model, protected_index, out) + ["--index-servers", "1"]
    code, output = interrupted_run(ray_session, args, out, lambda: kill_all(ray_head, b"ray::IndexShardServer"))
    assert code == 0, output[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["progress"]["index_servers"]
    assert_same_as_clean(str(out), clean_run)


def test_index_server_that_cannot_come_back_fails_the_job(ray_session, ray_head, memorizer_model, protected_index, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(protected_index, index)
    out = tmp_path / "run"

    def corrupt_then_kill_server():
        shard = index / "shards" / "shard-00000.faiss"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))  # the restarted server will refuse this shard
        kill_all(ray_head, b"ray::IndexShardServer")

    args = cli_args(memorizer_model, str(index), out) + ["--index-servers", "1", "--max-unit-attempts", "2"]
    code, output = interrupted_run(ray_session, args, out, corrupt_then_kill_server)
    assert code == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("spellshield generate: failed: unit") and "--resume" in last
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed"
    # units finished before the failure stay whole; nothing else was written
    finished = done_units(out)
    assert finished >= 1 and len(glob.glob(str(out / "images" / "*.tar"))) == finished
