"""Bad input: one clear line on stderr, exit code 2, nothing written or overwritten."""

import json
import os
import subprocess
import sys

import pytest

from spellshield.jobs.cli import main
from tests.conftest import ROOT, add_tar_members


def run_cli(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def test_missing_corpus_subprocess(tmp_path):
    # The real process: exit status and stderr as a user sees them.
    out = tmp_path / "index"
    proc = subprocess.run(
        [sys.executable, "-m", "spellshield.jobs.build_index", "--corpus", str(tmp_path / "nope-{000..003}.tar"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and lines[0].startswith("spellshield build-index: error:")
    assert not out.exists()


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty-000.tar").write_bytes(b"")
    code, err = run_cli(capsys, ["build-index", "--corpus", str(tmp_path / "empty-000.tar"), "--out", str(tmp_path / "i")])
    assert code == 2 and len(err) == 1 and "empty" in err[0]
    assert not (tmp_path / "i").exists()


def test_corpus_without_images(capsys, ray_session, tmp_path):
    add_tar_members(str(tmp_path / "txt-000.tar"), [("a.txt", b"x"), ("b.txt", b"y")])
    code, err = run_cli(capsys, ["build-index", "--corpus", str(tmp_path / "txt-000.tar"), "--out", str(tmp_path / "i")])
    # Found only by reading the corpus, so Ray may have logged before; the error is the last line.
    assert code == 2 and "no indexable image (2 rejected; first: no image member" in err[-1]
    assert not (tmp_path / "i").exists() and not (tmp_path / "i.partial").exists()


@pytest.mark.parametrize("command", ["build-index", "memorizer"])
@pytest.mark.parametrize("weights", [False, True])
def test_encoder_that_cannot_load(capsys, digits_corpus, tmp_path, command, weights):
    vae = tmp_path / "vae"
    vae.mkdir()
    if weights:  # a config, but no weights beside it
        (vae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    code, err = run_cli(capsys, [command, "--corpus", digits_corpus[0], "--encoder", str(vae), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"spellshield {command}: error: --encoder: ")
    assert ("holds no weights" if weights else "has no config.json") in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_index_shape_differs_from_model(capsys, ray_session, memorizer_model, digits_corpus, tmp_path):
    from spellshield.jobs.build_index import build_index
    from spellshield.jobs.dataflow import EncodeOptions

    index16 = str(tmp_path / "index16")
    build_index(digits_corpus[0], index16, EncodeOptions(resolution=16))
    capsys.readouterr()
    code, err = run_cli(capsys, ["generate", "--model", memorizer_model, "--index", index16, "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1
    assert "index latent shape (3, 16, 16) differs from the model's (3, 8, 8)" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("radius", ["0", "-1.5"])
def test_radius_must_be_positive(capsys, memorizer_model, protected_index, tmp_path, radius):
    code, err = run_cli(capsys, ["generate", "--model", memorizer_model, "--index", protected_index,
                                 "--radius", radius, "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and "--radius must be > 0" in err[0]
    assert not (tmp_path / "run").exists()


def test_prompts_line_not_json(capsys, memorizer_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
    code, err = run_cli(capsys, ["generate", "--model", memorizer_model, "--prompts", str(prompts), "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and "line 2 is not JSON" in err[0]
    assert not (tmp_path / "run").exists()


def test_num_images_zero(capsys, memorizer_model, tmp_path):
    code, err = run_cli(capsys, ["generate", "--model", memorizer_model, "--num-images", "0", "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and "--num-images" in err[0]


def test_finished_run_is_not_overwritten(capsys, ray_session, memorizer_model, tmp_path):
    run_dir = tmp_path / "run"
    args = ["generate", "--model", memorizer_model, "--num-images", "2", "--steps", "3", "--out", str(run_dir)]
    assert main(args) == 0
    capsys.readouterr()
    before = {p: open(run_dir / p, "rb").read() for p in tree(run_dir)}
    code, err = run_cli(capsys, args)
    assert code == 2 and len(err) == 1 and "already holds a finished run" in err[0]
    assert {p: open(run_dir / p, "rb").read() for p in tree(run_dir)} == before
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_missing_model_dir(capsys, tmp_path):
    code, err = run_cli(capsys, ["generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]


def test_every_command_has_help(capsys):
    for command in ["build-index", "memorizer", "generate", "audit", "demo"]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: spellshield " + command in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "spellshield.jobs.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ["build-index", "memorizer", "generate", "audit", "demo"]:
        assert command in proc.stdout


def test_unknown_pipeline_class(capsys, memorizer_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(memorizer_model, model)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "NoSuchPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    code, err = run_cli(capsys, ["generate", "--model", str(model), "--num-images", "2", "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and "unknown pipeline class 'NoSuchPipeline'" in err[0]
    assert not (tmp_path / "run").exists()
