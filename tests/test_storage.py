"""The storage layer against a real S3 server (SeaweedFS), a real GCS emulator (fake-gcs-server)
and the local disk: URIs, reads and writes, brace patterns and globs, and one-line errors that
never show a credential."""

from __future__ import annotations

import os
import pickle

import pytest

from spellshield import storage
from spellshield.storage import StorageError
from tests.conftest import bucket_on
from tests.s3server import ADMIN, READER, free_ports


def test_plain_paths_and_file_uris_are_local(tmp_path):
    plain = storage.resolve(str(tmp_path / "a"))
    as_uri = storage.resolve(f"file://{tmp_path}/a")
    assert plain.path == as_uri.path == str(tmp_path / "a") and not plain.remote
    assert storage.resolve("relative/x").path == os.path.abspath("relative/x")


def test_s3_uri_is_canonical_and_refuses_credentials(s3_env):
    loc = storage.resolve("s3://bucket/some/prefix/")
    assert (loc.uri, loc.path, loc.remote) == ("s3://bucket/some/prefix", "bucket/some/prefix", True)
    assert loc.child("x", "y.tar").uri == "s3://bucket/some/prefix/x/y.tar"
    assert loc.sibling(".partial").uri == "s3://bucket/some/prefix.partial"
    with pytest.raises(StorageError, match="credentials in a URI are refused") as err:
        storage.resolve("s3://AKID:VERYSECRET@bucket/x")
    assert "VERYSECRET" not in str(err.value)
    with pytest.raises(StorageError, match="unsupported scheme"):
        storage.resolve("ftp://host/x")


def test_location_pickles_without_credentials(s3_env):
    data = pickle.dumps(storage.resolve("s3://bucket/x"))
    assert ADMIN[1].encode() not in data and ADMIN[0].encode() not in data
    assert pickle.loads(data).uri == "s3://bucket/x"


@pytest.mark.parametrize("where", ["local", "s3", "gs"])
def test_write_read_list_glob_copy(where, request, tmp_path):
    root = storage.resolve(str(tmp_path / "data") if where == "local" else f"{bucket_on(request, where)}/data")
    for i in range(3):
        storage.write_bytes(root.child(f"train-{i:06d}.tar"), bytes([i]) * (i + 1))
    storage.write_json(root.child("sub", "meta.json"), {"n": 3})
    assert storage.exists(root.child("train-000001.tar")) and not storage.exists(root.child("nope"))
    assert storage.is_dir(root) and storage.is_file(root.child("sub", "meta.json"))
    assert storage.size(root.child("train-000002.tar")) == 3
    assert storage.read_bytes(root.child("train-000001.tar")) == b"\x01\x01"
    assert storage.read_json(root.child("sub", "meta.json")) == {"n": 3}
    assert [l.name for l in storage.list_dir(root)] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [l.name for l in storage.list_dir(root, recursive=True)][0] == "meta.json"  # data/sub/ sorts first
    braces = storage.expand(f"{root.uri}/train-{{000000..000001}}.tar")
    assert braces == [f"{root.uri}/train-000000.tar", f"{root.uri}/train-000001.tar"]
    assert [os.path.basename(u) for u in storage.expand(f"{root.uri}/train-*.tar")] == [f"train-{i:06d}.tar" for i in range(3)]
    assert [os.path.basename(u) for u in storage.expand(f"{root.uri}/*/meta.json")] == ["meta.json"]
    assert storage.expand(f"{root.uri}/zzz-*.tar") == []
    local = tmp_path / "copy"
    copied = storage.copy_prefix_to_local(root, str(local))
    assert sorted(os.path.relpath(p, local) for p in copied) == ["sub/meta.json"] + [f"train-{i:06d}.tar" for i in range(3)]
    assert (local / "train-000002.tar").read_bytes() == b"\x02\x02\x02"
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    storage.put_file(str(src), root.child("big.bin"))
    assert storage.get_file(root.child("big.bin"), str(tmp_path / "back.bin")) == 100_000
    storage.delete_tree(root)
    assert not storage.exists(root.child("train-000000.tar")) and storage.list_dir(root, recursive=True) == []


def _error(call) -> str:
    with pytest.raises(StorageError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for secret in (ADMIN[1], READER[1], "WRONG-SECRET-VALUE"):
        assert secret not in message
    return message


def test_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    message = _error(lambda: storage.probe("s3://bucket/x"))
    assert "cannot reach the object store at http://127.0.0.1:" in message and "s3://bucket/x" in message
    assert "cannot reach" in _error(lambda: storage.read_bytes("s3://bucket/x"))


def test_wrong_credentials(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-SECRET-VALUE")
    assert "refused the credentials" in _error(lambda: storage.probe(f"{s3_bucket}/x"))
    assert "refused the credentials" in _error(lambda: storage.list_dir(f"{s3_bucket}/x"))


def test_missing_bucket_and_object(s3_env, s3_bucket):
    assert _error(lambda: storage.probe("s3://no-such-bucket-here/x")).startswith("bucket no-such-bucket-here does not exist")
    assert _error(lambda: storage.read_bytes(f"{s3_bucket}/missing.tar")) == f"{s3_bucket}/missing.tar does not exist"
    assert _error(lambda: storage.size(f"{s3_bucket}/missing.tar")) == f"{s3_bucket}/missing.tar does not exist"


def test_no_write_permission(s3_env, s3_bucket, monkeypatch):
    storage.write_bytes(f"{s3_bucket}/in/a.bin", b"a")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    storage.probe(f"{s3_bucket}/in")  # reading is allowed
    assert storage.read_bytes(f"{s3_bucket}/in/a.bin") == b"a"
    assert _error(lambda: storage.check_writable(f"{s3_bucket}/out")).startswith(f"no permission to write {s3_bucket}/out")
    assert _error(lambda: storage.write_bytes(f"{s3_bucket}/out/x", b"x")).startswith("no permission to write")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
    assert [l.name for l in storage.list_dir(f"{s3_bucket}/out", recursive=True)] == []  # nothing written


def test_gs_uri_and_errors(gcs_env, gcs_bucket, monkeypatch):
    """gs:// (and its alias gcs://) on the emulator STORAGE_EMULATOR_HOST names: canonical URIs,
    one-line errors for a missing bucket or object and an unreachable endpoint."""
    loc = storage.resolve("gcs://bucket/some/prefix/")
    assert (loc.uri, loc.path, loc.remote) == ("gs://bucket/some/prefix", "bucket/some/prefix", True)
    with pytest.raises(StorageError, match="credentials in a URI are refused; use GOOGLE_APPLICATION_CREDENTIALS"):
        storage.resolve("gs://user:VERYSECRET@bucket/x")
    assert pickle.loads(pickle.dumps(loc)).uri == loc.uri and gcs_env.endpoint.encode() not in pickle.dumps(loc)
    storage.probe(f"{gcs_bucket}/x")
    missing = "gs://no-such-bucket-here"
    assert _error(lambda: storage.probe(f"{missing}/x")) == f"bucket no-such-bucket-here does not exist (read {missing}/x)"
    assert _error(lambda: storage.check_writable(f"{missing}/out")) == f"bucket no-such-bucket-here does not exist (write {missing}/out)"
    assert _error(lambda: storage.read_bytes(f"{gcs_bucket}/missing.tar")) == f"{gcs_bucket}/missing.tar does not exist"
    assert _error(lambda: storage.size(f"{gcs_bucket}/missing.tar")) == f"{gcs_bucket}/missing.tar does not exist"
    unreachable = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", unreachable)
    assert _error(lambda: storage.probe(f"{gcs_bucket}/x")) == (
        f"cannot reach the object store at {unreachable} to read {gcs_bucket}/x; is it running, and is STORAGE_EMULATOR_HOST right?")


def test_local_write_permission(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "dir"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that may write anywhere (root)")
        assert "no permission to write" in _error(lambda: storage.check_writable(str(locked / "out")))
    finally:
        locked.chmod(0o700)
