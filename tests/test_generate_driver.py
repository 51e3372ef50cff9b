"""The generate driver: one writer per run directory, a failed start leaves nothing behind, and
progress counts images with an ETA."""

import glob
import json
import os
import shutil

import pytest

from spellshield.jobs.cli import main
from spellshield.jobs.run_record import format_seconds, run_lock


def small_run(model, out, *extra):
    return ["generate", "--model", model, "--out", str(out), "--num-images", "4", "--steps", "4", "--batch-size", "2",
            *extra]


def test_second_driver_on_a_held_run_is_refused(capsys, memorizer_model, tmp_path):
    out = tmp_path / "run"
    with run_lock(str(out)):  # another driver holds the run (flock: a second open file is refused)
        code = main(small_run(memorizer_model, out))
        err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "is being written by another generate driver (pid" in err[0] and f"pid {os.getpid()} on" in err[0]
    assert os.listdir(out) == [".lock"]  # nothing written by the refused driver
    with run_lock(str(out)):  # released with its holder
        pass
    with run_lock(str(out)):
        with pytest.raises(Exception, match="another generate driver"):
            with run_lock(str(out)):
                pass


@pytest.mark.slow
def test_failed_start_leaves_no_run(capsys, ray_session, memorizer_model, tmp_path):
    # A model that passes every check but cannot load in the workers: the job fails before its
    # first unit, and removes what it made, so the same command runs once the model is fixed.
    model = tmp_path / "model"
    shutil.copytree(memorizer_model, model)
    weights = glob.glob(str(model / "unet" / "*.safetensors")) + glob.glob(str(model / "unet" / "*.bin"))
    saved = {path: open(path, "rb").read() for path in weights}
    for path in weights:
        with open(path, "wb") as f:
            f.write(b"not a weights file")
    out = tmp_path / "run"
    code = main(small_run(str(model), out, "--max-unit-attempts", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("spellshield generate: failed: ") and "run the same command again" in err[-1]
    assert not out.exists()
    for path, data in saved.items():
        with open(path, "wb") as f:
            f.write(data)
    assert main(small_run(str(model), out)) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["progress"]["samples_done"] == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generate: ")]
    assert any(line.startswith("generate: 4/4 images (1/1 units)") and line.endswith("ETA done") for line in lines), lines


def test_format_seconds():
    assert format_seconds(0) == "0:00" and format_seconds(61.4) == "1:01" and format_seconds(3725) == "1:02:05"


def test_version_and_quiet(capsys, memorizer_model, tmp_path):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"spellshield {version('spellshield')}"
    # --quiet silences progress, not errors
    code = main(small_run(memorizer_model, tmp_path / "run", "--quiet", "--radius", "1"))
    assert code == 2 and capsys.readouterr().err.strip() == "spellshield generate: error: --radius needs --index"
