"""build-index with its corpus and its output on a real S3 server (SeaweedFS): the same index as
a local build, parts staged on the store so that a build killed on one machine resumes on
another, and bad storage input refused in one line before Ray starts, with nothing written."""

from __future__ import annotations

import os
import signal

import pytest

from spellshield import storage
from spellshield.indexing.manifest import Manifest
from spellshield.jobs.build_index import build_index
from spellshield.jobs.cli import main
from spellshield.jobs.dataflow import EncodeOptions
from tests.s3server import READER, free_ports, kill_job_when, run_job

ARGS = ["--resolution", "8", "--batch-size", "100", "--shard-size", "250"]
SHARDS = 4


@pytest.fixture
def s3_corpus(s3_env, s3_bucket, digits_corpus):
    """The first SHARDS digits tars uploaded under ``<bucket>/corpus/``; returns their brace pattern."""
    for path in digits_corpus[:SHARDS]:
        storage.put_file(path, f"{s3_bucket}/corpus/{os.path.basename(path)}")
    return f"{s3_bucket}/corpus/digits-{{000000..{SHARDS - 1:06d}}}.tar"


def objects(prefix: str) -> list[str]:
    return [loc.uri for loc in storage.list_dir(prefix, recursive=True)]


def run_build(argv, env, cwd):
    return run_job("build_index", argv, env, cwd, timeout=300)


@pytest.mark.slow
def test_build_from_s3_to_s3_resumes_on_another_machine(ray_session, s3_server, s3_env, s3_bucket, s3_corpus, digits_corpus,
                                                          tmp_path):
    reference = str(tmp_path / "reference")
    build_index(",".join(digits_corpus[:SHARDS]), reference, EncodeOptions(resolution=8, batch_size=100), shard_size=250)
    out = f"{s3_bucket}/index"

    def machine(name):
        """A process with its own working and temporary directories that hold none of the data."""
        home = tmp_path / name
        (home / "tmp").mkdir(parents=True)
        env = {**os.environ, **s3_server.env(), "TMPDIR": str(home / "tmp"), "RAY_TMPDIR": "/tmp", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        return home, env

    first, env = machine("first")
    def staged_parts():
        return sorted(u.rsplit("/", 1)[1] for u in objects(f"{out}.partial") if u.rsplit("/", 1)[1].startswith("part-")
                      and u.endswith(".json"))

    # killed from outside (a lost machine) once two parts are staged; a third may land first
    code = kill_job_when("build_index", ["--corpus", s3_corpus, "--out", out, *ARGS], env, first,
                         lambda: len(staged_parts()) >= 2, timeout=300)
    assert code == -signal.SIGKILL
    staged = staged_parts()
    assert staged[:2] == ["part-00000.json", "part-00001.json"] and len(staged) < SHARDS
    assert any(u.endswith(".partial/build.json") for u in objects(f"{out}.partial"))
    assert objects(out) == []  # nothing published

    second, env = machine("second")
    code, err = run_build(["--corpus", s3_corpus, "--out", out, *ARGS], env, second)
    assert code == 0, err
    assert "resuming" in err and f"{len(staged)} of 4 parts finished" in err
    manifest = Manifest.from_json(storage.read_json(f"{out}/manifest.json"))
    local = Manifest.from_json(storage.read_json(f"{reference}/manifest.json"))
    assert manifest.build["resumed_parts"] == len(staged) and manifest.count == local.count == 900
    assert manifest.shards == local.shards  # same FAISS files and id tables, byte for byte (sha256)
    for shard in manifest.shards:
        assert storage.read_bytes(f"{out}/{shard.file}") == open(os.path.join(reference, shard.file), "rb").read()
    assert storage.read_bytes(f"{out}/rejects.parquet") == open(os.path.join(reference, "rejects.parquet"), "rb").read()
    assert objects(f"{out}.partial") == []  # staging removed once the manifest is up
    # no data on either machine's disk outside its temporary directory, and none left inside it
    for home in (first, second):
        assert sorted(os.listdir(home)) == ["tmp"]
    assert [n for n in os.listdir(second / "tmp") if n.startswith("spellshield-")] == []

    # the finished index on S3 is not overwritten
    code, err = run_build(["--corpus", s3_corpus, "--out", out, *ARGS], env, second)
    assert code == 2 and err.strip() == f"spellshield build-index: error: {out} already holds a finished index; choose another --out"


def _refused(capsys, argv) -> str:
    code = main(["build-index", *argv, *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_unreachable_endpoint_is_refused(capsys, s3_env, s3_bucket, s3_corpus, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    line = _refused(capsys, ["--corpus", s3_corpus, "--out", str(tmp_path / "index")])
    assert line.startswith("spellshield build-index: error: cannot reach the object store at http://127.0.0.1:")
    assert os.listdir(tmp_path) == []


def test_wrong_credentials_are_refused(capsys, s3_env, s3_bucket, s3_corpus, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-SECRET-VALUE")
    line = _refused(capsys, ["--corpus", s3_corpus, "--out", f"{s3_bucket}/index"])
    assert "refused the credentials" in line and "WRONG-SECRET-VALUE" not in line
    monkeypatch.undo()


def test_missing_bucket_and_prefix(capsys, s3_env, s3_bucket, s3_corpus, tmp_path):
    line = _refused(capsys, ["--corpus", "s3://no-such-bucket-9/corpus/digits-*.tar", "--out", str(tmp_path / "i")])
    assert line == ("spellshield build-index: error: bucket no-such-bucket-9 does not exist "
                    "(read s3://no-such-bucket-9/corpus/digits-*.tar)")
    line = _refused(capsys, ["--corpus", f"{s3_bucket}/nothing/digits-*.tar", "--out", str(tmp_path / "i")])
    assert line == f"spellshield build-index: error: corpus pattern {s3_bucket}/nothing/digits-*.tar matches no file"
    line = _refused(capsys, ["--corpus", f"{s3_bucket}/corpus/digits-000009.tar", "--out", str(tmp_path / "i")])
    assert line == f"spellshield build-index: error: corpus shard {s3_bucket}/corpus/digits-000009.tar does not exist"
    before = objects(s3_bucket)
    line = _refused(capsys, ["--corpus", s3_corpus, "--out", "s3://no-such-bucket-9/index"])
    assert line.startswith("spellshield build-index: error: bucket no-such-bucket-9 does not exist")
    assert os.listdir(tmp_path) == [] and objects(s3_bucket) == before


def test_no_write_permission_on_out(capsys, s3_env, s3_bucket, s3_corpus, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    line = _refused(capsys, ["--corpus", s3_corpus, "--out", f"{s3_bucket}/index"])
    assert line.startswith(f"spellshield build-index: error: no permission to write {s3_bucket}/index")
    assert objects(f"{s3_bucket}/index") == [] and objects(f"{s3_bucket}/index.partial") == []


def test_out_prefix_not_empty(capsys, s3_env, s3_bucket, s3_corpus):
    storage.write_bytes(f"{s3_bucket}/taken/notes.txt", b"someone else's")
    line = _refused(capsys, ["--corpus", s3_corpus, "--out", f"{s3_bucket}/taken"])
    assert line == f"spellshield build-index: error: {s3_bucket}/taken is not empty; choose a new or empty prefix"
    assert objects(f"{s3_bucket}/taken") == [f"{s3_bucket}/taken/notes.txt"]
