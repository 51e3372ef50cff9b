"""build-index with its corpus and its output on a real S3 server (SeaweedFS): the same index as
a local build, parts staged on the store so that a build killed on one machine resumes on
another, and bad storage input refused in one line before Ray starts, with nothing written."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

import pytest

from spellshield import storage
from spellshield.indexing.manifest import Manifest
from spellshield.indexing.parts import BUILD_CONFIG, PARTS, PartWriter, StagedParts, part_paths
from spellshield.jobs.build_index import build_index
from spellshield.jobs.cli import main
from spellshield.jobs.dataflow import EncodeOptions
from spellshield.storage.commit import ATTEMPTS, LEASE_TTL_ENV, committed_units
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
        env = {**os.environ, **s3_server.env(), "TMPDIR": str(home / "tmp"), "RAY_TMPDIR": "/tmp", "RAY_AUTH_MODE": "disabled",
               LEASE_TTL_ENV: "6"}
        env.pop("RAY_ADDRESS", None)
        return home, env

    first, env = machine("first")
    def staged_parts():
        return sorted(committed_units(f"{out}.partial"))

    # killed from outside (a lost machine) once two parts are committed; a third may land first
    code = kill_job_when("build_index", ["--corpus", s3_corpus, "--out", out, *ARGS], env, first,
                         lambda: len(staged_parts()) >= 2, timeout=300)
    assert code == -signal.SIGKILL
    staged = staged_parts()
    assert staged[:2] == ["part-00000", "part-00001"] and len(staged) < SHARDS
    assert any(u.endswith(".partial/build.json") for u in objects(f"{out}.partial"))
    assert objects(out) == []  # nothing published
    # what a driver killed while staging the last part leaves: an attempt without a commit record
    todo = min(set(range(SHARDS)) - {int(u.split("-")[1]) for u in staged})
    leftover = f"{out}.partial/{ATTEMPTS}/part-{todo:05d}/killed/parts/part-{todo:05d}.latents"
    storage.write_bytes(leftover, b"half a part")

    second, env = machine("second")
    code, err = run_build(["--corpus", s3_corpus, "--out", out, *ARGS], env, second)
    if code == 2:  # the killed driver's lease was still live: refused in one line, nothing written
        assert "is held by another driver" in err and len(err.strip().splitlines()) == 1, err
        time.sleep(6)
        code, err = run_build(["--corpus", s3_corpus, "--out", out, *ARGS], env, second)
    assert code == 0, err
    assert f"{SHARDS - len(staged)} part(s) encoded, {len(staged)} reused" in err  # a part is committed once
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


def _part(parts_dir, number: int, value: float):
    """A finished local part of 3 latents (dim 4) all equal to ``value``."""
    writer = PartWriter(str(parts_dir), number, f"s3://b/corpus-{number}.tar", 4, "float32")
    writer.add(["a", "b", "c"], ["t"] * 3, ["h"] * 3, ["", "", ""], np.full((3, 4), value, dtype=np.float32))
    return writer.finish("tar-sha")


def test_build_parts_are_committed_once_and_aborted_leftovers_ignored(s3_env, s3_bucket, tmp_path, monkeypatch):
    from spellshield.storage.commit import COMMITS, LEASE, LeaseLost

    monkeypatch.setenv(LEASE_TTL_ENV, "1")
    remote = f"{s3_bucket}/index.partial"
    first = tmp_path / "first"
    (first / PARTS).mkdir(parents=True)
    staged = StagedParts(remote, str(first))
    staged.open()
    storage.write_json(f"{first}/{BUILD_CONFIG}", {"placeholder": True})
    staged.publish_config()
    staged.push(_part(first / PARTS, 0, 1.0))
    # a driver killed while staging part 1: its attempt's objects, no commit record
    for path in part_paths(str(first / PARTS), 1)[:2]:
        storage.write_bytes(f"{remote}/{ATTEMPTS}/part-00001/dead-attempt/{PARTS}/{os.path.basename(path)}", b"half")
    # and a published-looking part without a commit (what a retraction killed midway leaves)
    storage.write_bytes(f"{remote}/{PARTS}/part-00002.json", b"{}")
    staged.lease._stop.set()  # the driver is killed: its lease stays, no longer renewed, and expires
    time.sleep(1.5)

    second = tmp_path / "second"  # another machine takes the expired lease over
    second.mkdir()
    again = StagedParts(remote, str(second))
    again.open()
    # only the committed part reaches the local copy; the aborted attempt is gone from the store
    assert sorted(os.listdir(second / PARTS)) == ["part-00000.json", "part-00000.latents", "part-00000.rows.parquet"]
    assert storage.list_dir(f"{remote}/{ATTEMPTS}", recursive=True) == []
    assert list(committed_units(remote)) == ["part-00000"]
    # a part is committed once: another attempt of part 0 loses, and the first one's bytes stay
    published = storage.read_bytes(f"{remote}/{PARTS}/part-00000.latents")
    with pytest.raises(LeaseLost, match="part-00000 was committed by another build driver"):
        again.push(_part(second / PARTS, 0, 2.0))
    assert storage.read_bytes(f"{remote}/{PARTS}/part-00000.latents") == published
    assert storage.list_dir(f"{remote}/{ATTEMPTS}", recursive=True) == []
    # a committed part that no longer holds is retracted, then committed anew
    again.retract_all_but({})
    assert not storage.exists(f"{remote}/{COMMITS}/part-00000.json")
    again.push(_part(second / PARTS, 0, 2.0))
    assert storage.read_bytes(f"{remote}/{PARTS}/part-00000.latents") == np.full((3, 4), 2.0, np.float32).tobytes()
    again.close()
    assert not storage.exists(f"{remote}/{LEASE}")


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
