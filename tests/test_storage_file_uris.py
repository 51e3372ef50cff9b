"""Every path option as a file:// URI: build-index, generate, generate --resume and audit give the
values the plain-path runs give, record plain paths, and write nothing into the working directory
(a raw ``file:///x`` handed to ``os`` is the relative path ``file:/x``: the issue's ``./s3:/...``)."""

from __future__ import annotations

import glob
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from spellshield import storage
from spellshield.indexing.manifest import read_manifest
from spellshield.jobs.cli import main
from spellshield.jobs.generate import validate
from spellshield.pipeline.config import AuditConfig, BuildConfig, ConfigError, GenerateConfig
from tests.test_generate import gen_config, tar_images
from tests.test_storage_generate import GEN


def uri(path) -> str:
    return "file://" + os.path.abspath(str(path))  # an absolute path starts with /: file:///...


def test_normalise():
    assert storage.normalise("file:///a/b") == "/a/b"
    assert storage.normalise("file://localhost/a/b/") == "/a/b"
    assert storage.normalise("FILE:///a/x%20y/../c") == "/a/c"
    # a comma list (--corpus, --holdout), a brace pattern and a glob's ? stay patterns, not a query
    assert storage.normalise("file:///c/d-{000..009}.tar,rel/e.tar, file:///c/f?.tar") == "/c/d-{000..009}.tar,rel/e.tar,/c/f?.tar"
    for unchanged in ("rel/path", "/abs/path", "s3://b/k", "gs://b/k", "pixels", "owner/name"):
        assert storage.normalise(unchanged) == unchanged
    assert storage.resolve("file:///a/f?.tar#1").uri == "/a/f?.tar#1"
    for bad in ("file://host/x", "file://"):
        with pytest.raises(storage.StorageError, match="file:///abs/path"):
            storage.normalise(bad)


def test_configs_take_file_uris(tmp_path):
    """The Python API's edge: every path field of the configs holds the plain path."""
    config = GenerateConfig.build(uri(tmp_path / "m"), uri(tmp_path / "r"), index=uri(tmp_path / "i"),
                                  prompts=uri(tmp_path / "p.jsonl"))
    assert (config.model, config.out, config.shield.index, config.sampling.prompts) == tuple(
        str(tmp_path / n) for n in ("m", "r", "i", "p.jsonl"))
    build = BuildConfig.build(uri(tmp_path) + "/c-{0..3}.tar", uri(tmp_path / "i"), encoder=uri(tmp_path / "vae"))
    assert (build.corpus, build.out, build.encode.encoder) == (f"{tmp_path}/c-{{0..3}}.tar", str(tmp_path / "i"), str(tmp_path / "vae"))
    audit = AuditConfig.build(uri(tmp_path / "r"), index=uri(tmp_path / "i"), compare=uri(tmp_path / "r2"))
    assert (audit.run_dir, audit.index, audit.compare) == tuple(str(tmp_path / n) for n in ("r", "i", "r2"))
    with pytest.raises(ConfigError, match="^out file://host/x: a file:// URI names a local path"):
        GenerateConfig.build(str(tmp_path), "file://host/x")


def test_round_trip_with_every_path_a_file_uri(ray_session, digits_corpus, protected_index, memorizer_model, tmp_path,
                                               monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # build-index: the corpus as a brace pattern under file://, the fixture's options -> the fixture's index
    index = tmp_path / "index"
    corpus = uri(os.path.dirname(digits_corpus[0])) + "/digits-{000000..000003}.tar"
    assert main(["build-index", "--corpus", corpus, "--out", uri(index), "--resolution", "8", "--batch-size", "256",
                 "--shard-size", "300"]) == 0
    built, expected = read_manifest(str(index)), read_manifest(protected_index)
    assert [(s.count, s.sha256) for s in built.shards] == [(s.count, s.sha256) for s in expected.shards] and built.count == 900
    for shard in built.shards:
        assert pq.read_table(os.path.join(index, shard.ids_file)).equals(pq.read_table(os.path.join(protected_index, shard.ids_file)))
    assert built.calibration == expected.calibration

    # generate: model, index and run directory as file:// URIs; run.json records the plain paths,
    # so its config digest is the one of the same run given plain paths
    run = tmp_path / "run"
    assert main(["generate", "--model", uri(memorizer_model), "--index", uri(index), "--out", uri(run), *GEN]) == 0
    record = json.load(open(run / "run.json"))
    assert record["status"] == "finished"
    config = record["config"]
    assert (config["model"], config["out"], config["shield"]["index"]) == (memorizer_model, str(run), str(index))
    plain = validate(gen_config(memorizer_model, str(run), str(index), num_images=8, unit_size=4, workers=1), check_out=False)
    assert record["config_sha256"] == plain.digest()
    rows = pd.read_parquet(run / "audit" / "samples")
    final = rows[rows["action"] != "resampled"]
    assert len(final) == 8 and final["sample"].is_unique
    assert sorted(rows.loc[rows["attempt"] == 1, "seed"]) == list(range(100, 108))

    # generate --resume file://: a lost unit is sampled again, the same images (noise depends on the seed)
    before = {k: v for tar in sorted(glob.glob(str(run / "images" / "*.tar"))) for k, v in tar_images(tar).items()}
    for kind in ("images/unit-00001.tar", "audit/hits/unit-00001.parquet", "audit/samples/unit-00001.parquet"):
        os.remove(run / kind)
    capsys.readouterr()
    assert main(["generate", "--resume", uri(run)]) == 0
    assert "1 unit(s) are not whole on disk" in capsys.readouterr().err
    after = {k: v for tar in sorted(glob.glob(str(run / "images" / "*.tar"))) for k, v in tar_images(tar).items()}
    assert sorted(after) == sorted(before) and all((after[k] == before[k]).all() for k in before)

    # audit file://RUN --index file://INDEX: the summary the same audit with plain paths writes
    summaries = []
    for argv in (["audit", uri(run), "--index", uri(index)], ["audit", str(run), "--index", protected_index]):
        assert main(argv) == 0
        summaries.append(json.load(open(run / "audit" / "summary.json")))
    keys = ("num_samples", "num_images", "near_duplicates", "near_duplicate_rate", "near_duplicate_rate_ci95", "radius",
            "completeness", "top_offenders", "per_prompt")
    assert [summaries[0][k] for k in keys] == [summaries[1][k] for k in keys]
    assert summaries[0]["num_samples"] == 8 and summaries[0]["completeness"]["complete"]
    assert main(["audit", uri(run), "--compare", uri(run)]) == 0
    assert os.path.isfile(run / "audit" / "compare.html")

    # --prompts file://: read (the memorizer is unconditional, which only the file's requests tell)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"a cat"\n')
    capsys.readouterr()
    assert main(["generate", "--model", uri(memorizer_model), "--prompts", uri(prompts), "--out", uri(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip().endswith("is unconditional: use --num-images, not --prompts")
    assert os.listdir(work) == []  # no ./file:/... and nothing else in the working directory


@pytest.mark.parametrize("argv, flag", [
    (["build-index", "--corpus", "file://host/x.tar", "--out", "index"], "--corpus"),
    (["generate", "--model", "model", "--out", "file://host/x"], "--out"),
    (["generate", "--resume", "file://host/x"], "--resume"),
    (["audit", "file://host/x"], "RUN_DIR"),
    (["index", "verify", "file://host/x"], "INDEX_DIR"),
    (["memorizer", "--corpus", "c.tar", "--out", "file://host/x"], "--out"),
    (["demo", "--out", "file://host/x"], "--out"),
])
def test_file_uri_with_a_host_is_one_line(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"spellshield {argv[0]}: error: {flag} file://host/x{'.tar' if flag == '--corpus' else ''}: a file:// URI "
                   f"names a local path (file:///abs/path), not host 'host'"]
    assert os.listdir(tmp_path) == []
