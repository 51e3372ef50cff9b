"""Exactly once without rename, on a real S3 server (SeaweedFS), a real GCS emulator
(fake-gcs-server) and on local disk: create-only writes, the driver lease, unit commits that a
second attempt cannot repeat, and roll-forward after a writer killed between commit and
publication."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from spellshield import storage
from spellshield.storage.commit import (ATTEMPTS, COMMITS, LeaseHeld, LeaseLost, acquire_lease, commit_unit, committed_units,
                                        create_only, read_with_etag, replace_if, retract_unit, roll_forward)
from tests.conftest import bucket_on


@pytest.fixture(params=["local", "s3", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return bucket_on(request, request.param) + "/run"


def test_create_only_and_compare_and_swap(root):
    target = f"{root}/_lease.json"
    assert create_only(target, b"first") is True
    assert create_only(target, b"second") is False
    data, etag = read_with_etag(target)
    assert data == b"first"
    assert replace_if(target, b"third", "not-the-etag") is None and storage.read_bytes(target) == b"first"
    assert replace_if(target, b"third", etag) is not None and storage.read_bytes(target) == b"third"
    assert read_with_etag(f"{root}/missing") is None


def test_concurrent_create_only_has_one_winner(root):
    results = []
    barrier = threading.Barrier(6)

    def race(i):
        barrier.wait()
        results.append((create_only(f"{root}/_commits/unit-00000.json", f"{i}".encode()), i))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for won, i in results if won]
    assert len(winners) == 1 and storage.read_bytes(f"{root}/_commits/unit-00000.json") == str(winners[0]).encode()


def test_lease_refuses_a_second_driver_and_expires(root):
    first = acquire_lease(f"{root}/_lease.json", ttl_s=2.0)
    with pytest.raises(LeaseHeld, match=f"held by another driver \\(host .*, pid {os.getpid()}\\)"):
        acquire_lease(f"{root}/_lease.json", ttl_s=2.0)
    first.renew()
    time.sleep(2.5)  # the first driver stops renewing (killed): its lease expires
    second = acquire_lease(f"{root}/_lease.json", ttl_s=60.0)
    with pytest.raises(LeaseLost):
        first.renew()
    first.release()  # not its lease any more: nothing happens
    assert json.loads(storage.read_bytes(f"{root}/_lease.json"))["driver"] == second.holder["driver"]
    second.release()
    assert not storage.exists(f"{root}/_lease.json")


def _unit_files(tmp_path, tag, unit="unit-00003"):
    files = []
    for name in (f"images/{unit}.tar", f"audit/hits/{unit}.parquet", f"audit/samples/{unit}.parquet"):
        local = tmp_path / tag / name.replace("/", "_")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(f"{tag}:{name}".encode())
        files.append((name, str(local)))
    return files


def test_a_unit_is_committed_once_and_whole(root, tmp_path):
    assert commit_unit(root, "unit-00003", _unit_files(tmp_path, "attempt-a")) is True
    assert commit_unit(root, "unit-00003", _unit_files(tmp_path, "attempt-b")) is False  # a retry of the same unit
    for name in ("images/unit-00003.tar", "audit/hits/unit-00003.parquet", "audit/samples/unit-00003.parquet"):
        assert storage.read_bytes(f"{root}/{name}") == f"attempt-a:{name}".encode()
    assert list(committed_units(root)) == ["unit-00003"]
    assert storage.list_dir(f"{root}/{ATTEMPTS}", recursive=True) == []


def test_roll_forward_after_a_writer_killed_between_commit_and_publication(root, tmp_path):
    # what a writer killed right after its commit record leaves: a staged attempt and the record
    staged = _unit_files(tmp_path, "killed", "unit-00001")
    record = {"unit": "unit-00001", "attempt": "a1", "files": []}
    for name, local in staged:
        storage.put_file(local, f"{root}/{ATTEMPTS}/unit-00001/a1/{name}")
        record["files"].append({"name": name, "sha256": storage.file_sha256(local), "size": os.path.getsize(local)})
    assert create_only(f"{root}/{COMMITS}/unit-00001.json", json.dumps(record).encode())
    # and an attempt of another unit that never committed
    storage.write_bytes(f"{root}/{ATTEMPTS}/unit-00002/b7/images/unit-00002.tar", b"half")
    assert not storage.exists(f"{root}/audit/samples/unit-00001.parquet")
    assert roll_forward(root) == {"published": ["unit-00001"], "dropped": ["unit-00002"]}
    assert storage.read_bytes(f"{root}/audit/samples/unit-00001.parquet") == b"killed:audit/samples/unit-00001.parquet"
    assert not storage.exists(f"{root}/images/unit-00002.tar")
    assert storage.list_dir(f"{root}/{ATTEMPTS}", recursive=True) == []
    assert list(committed_units(root)) == ["unit-00001"]


def test_roll_forward_after_a_writer_killed_while_dropping_its_stage(root, tmp_path):
    # a writer killed after publishing every file, while deleting its stage: the stage's first
    # object (in listing order) already gone, the others still there (CI saw this: a resumed
    # build failed on the stage object that was gone)
    files = _unit_files(tmp_path, "killed", "unit-00005")
    assert commit_unit(root, "unit-00005", files) is True
    attempt = committed_units(root)["unit-00005"]["attempt"]
    for name, local in files[1:]:
        storage.put_file(local, f"{root}/{ATTEMPTS}/unit-00005/{attempt}/{name}")
    assert roll_forward(root) == {"published": ["unit-00005"], "dropped": []}
    for name, _ in files:
        assert storage.read_bytes(f"{root}/{name}") == f"killed:{name}".encode()
    assert storage.list_dir(f"{root}/{ATTEMPTS}", recursive=True) == []
    # a committed unit with neither its stage nor its published file is reported, not skipped
    storage.delete(f"{root}/{files[0][0]}")
    storage.put_file(files[1][1], f"{root}/{ATTEMPTS}/unit-00005/{attempt}/{files[1][0]}")
    with pytest.raises(storage.StorageError, match=f"{files[0][0]} is committed but neither published nor staged"):
        roll_forward(root)


def test_a_retracted_unit_can_be_committed_again(root, tmp_path):
    assert commit_unit(root, "unit-00004", _unit_files(tmp_path, "stale", "unit-00004")) is True
    retract_unit(root, "unit-00004")
    assert committed_units(root) == {} and storage.list_dir(root, recursive=True) == []
    retract_unit(root, "unit-00004")  # nothing committed: nothing to do
    assert commit_unit(root, "unit-00004", _unit_files(tmp_path, "fresh", "unit-00004")) is True
    assert storage.read_bytes(f"{root}/audit/samples/unit-00004.parquet") == b"fresh:audit/samples/unit-00004.parquet"
