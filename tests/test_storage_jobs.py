"""memorizer, index calibrate (with --holdout) and index verify with every path on a real S3 server
(SeaweedFS): the same model and the same calibration as on local disk, nothing in the working
directory."""

from __future__ import annotations

import os
import shutil

import pytest

from spellshield import storage
from spellshield.jobs.cli import main
from spellshield.storage.cache import CACHE_ENV
from tests.s3server import run_job
from tests.test_storage_generate import machine_env


def put_corpus(digits_corpus, bucket) -> str:
    """The digits shards under ``bucket/corpus/``; their brace pattern."""
    for path in digits_corpus:
        storage.put_file(path, f"{bucket}/corpus/{os.path.basename(path)}")
    return f"{bucket}/corpus/digits-{{000000..{len(digits_corpus) - 1:06d}}}.tar"


@pytest.mark.slow
def test_memorizer_on_s3(s3_server, s3_env, s3_bucket, digits_corpus, memorizer_model, tmp_path):
    corpus = put_corpus(digits_corpus, s3_bucket)
    home, env = machine_env(s3_server, tmp_path, "driver")
    code, err = run_job("memorizer", ["--corpus", corpus, "--out", f"{s3_bucket}/model", "--resolution", "8",
                                      "--batch-size", "256"], env, home)
    assert code == 0, err
    assert os.listdir(home) == []
    local = sorted(os.path.relpath(os.path.join(d, n), memorizer_model) for d, _, names in os.walk(memorizer_model) for n in names)
    base = f"{s3_bucket}/model/"
    assert sorted(loc.uri[len(base):] for loc in storage.list_dir(f"{s3_bucket}/model", recursive=True)) == local
    for name in local:  # the same latents in the same order: the same weights (rejects name shards by basename)
        if name.endswith((".safetensors", ".json")):
            with open(os.path.join(memorizer_model, name), "rb") as f:
                assert storage.read_bytes(f"{base}{name}") == f.read(), name
    code, err = run_job("memorizer", ["--corpus", corpus, "--out", f"{s3_bucket}/model", "--resolution", "8"], env, home)
    assert code == 2 and err.strip() == f"spellshield memorizer: error: {s3_bucket}/model already holds a finished model; choose another --out"


def test_calibrate_and_verify_on_s3(capsys, s3_env, s3_bucket, digits_corpus, protected_index, tmp_path, monkeypatch):
    """index calibrate s3://... --holdout s3://...: the manifest on S3 gets the calibration the
    same command writes locally; index verify s3://... then reproduces it."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    put_corpus(digits_corpus, s3_bucket)
    storage.put_tree(protected_index, f"{s3_bucket}/index", last="manifest.json")
    local = str(tmp_path / "local-index")
    shutil.copytree(protected_index, local)
    options = ["--holdout-size", "40", "--sample-size", "200", "--seed", "3"]
    assert main(["index", "calibrate", local, "--holdout", digits_corpus[7], *options]) == 0
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    holdout = f"{s3_bucket}/corpus/{os.path.basename(digits_corpus[7])}"
    assert main(["index", "calibrate", f"{s3_bucket}/index", "--holdout", holdout, *options]) == 0
    remote = storage.read_json(f"{s3_bucket}/index/manifest.json")["calibration"]
    expected = storage.read_json(os.path.join(local, "manifest.json"))["calibration"]
    assert remote["holdout"].pop("corpus") == holdout and expected["holdout"].pop("corpus") == digits_corpus[7]
    assert remote == expected and remote["holdout"]["sample_size"] == 40
    capsys.readouterr()
    assert main(["index", "verify", f"{s3_bucket}/index"]) == 0
    assert "calibration reproduced" in capsys.readouterr().err
    assert os.listdir(work) == []


@pytest.mark.parametrize("argv", [["--out", "gs://some-bucket/run"], ["--resume", "gs://some-bucket/run"]])
def test_generate_on_gs_is_refused_before_anything(argv, capsys, memorizer_model, tmp_path, monkeypatch):
    """gs:// has no create-only write here yet: a run there is refused, one line, before the store
    is even contacted, instead of running without at-most-once commits and the driver lease."""
    from tests.test_storage_generate import GEN

    monkeypatch.chdir(tmp_path)
    options = ["--model", memorizer_model, *GEN] if argv[0] == "--out" else []
    assert main(["generate", *argv, *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spellshield generate: error: gs://some-bucket/run: runs and leases need create-only writes, implemented "
                   "for s3:// and local paths only (not gs:// yet, see docs/storage.md); write the run to s3:// or a local path"]
    assert os.listdir(tmp_path) == []
