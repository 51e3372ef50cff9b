"""An index on S3 (real SeaweedFS) searched from a node-local cache: the same answers as the
local index, fetched once (a warm node downloads nothing), only the shards a server serves,
and a file that does not match the manifest's sha256 fails closed and is not cached."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spellshield import storage
from spellshield.indexing.index_cache import fetch_index, local_index_dir
from spellshield.indexing.manifest import IndexFormatError, read_manifest
from spellshield.indexing.search import open_index
from spellshield.storage.cache import CACHE_ENV, cache_root
from spellshield.workers.index_server import IndexShardServer
from tests.index_helpers import write_index


@pytest.fixture
def s3_index(s3_env, s3_bucket, tmp_path):
    """A 3-shard float32 index written locally and uploaded to ``<bucket>/index`` (manifest last)."""
    vectors = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    local = write_index(tmp_path / "local-index", vectors, shard_size=20)
    storage.put_tree(local, f"{s3_bucket}/index", last="manifest.json")
    return local, f"{s3_bucket}/index", vectors


def test_cache_dir_is_configurable(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "spellshield")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == str(tmp_path / "mine") and cache_root(str(tmp_path / "arg")) == str(tmp_path / "arg")


def test_cold_then_warm_cache(s3_index, tmp_path, monkeypatch):
    local, uri, vectors = s3_index
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    manifest = read_manifest(local)
    every_file = sorted(n for s in manifest.shards for n in (s.file, s.ids_file))
    cold = fetch_index(uri)
    assert sorted(cold.downloaded) == every_file and cold.reused == []
    warm = fetch_index(uri)
    assert warm.downloaded == [] and sorted(warm.reused) == every_file  # a warm node downloads nothing
    assert cold.directory == warm.directory and os.path.dirname(cold.directory) == str(tmp_path / "node-cache" / "indexes")
    # searched through the cache, the S3 index answers exactly as the local one
    queries = vectors[[3, 25, 44]] + 0.01
    for (ids_a, d_a), (ids_b, d_b) in zip(open_index(uri).range_search(queries, 4.0), open_index(local).range_search(queries, 4.0)):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(d_a, d_b)


def test_shard_server_fetches_only_its_shards(s3_index, tmp_path, monkeypatch):
    local, uri, vectors = s3_index
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    server = IndexShardServer(uri, [1])
    shard = read_manifest(local).shards[1]
    assert sorted(os.listdir(os.path.join(server.index_dir, "shards"))) == sorted(
        os.path.basename(n) for n in (shard.file, shard.ids_file))
    assert server.info()["count"] == 20
    assert fetch_index(uri, [1]).downloaded == []


def test_mismatch_fails_closed(s3_index, tmp_path, monkeypatch):
    local, uri, _ = s3_index
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    shard = read_manifest(local).shards[0]
    storage.write_bytes(f"{uri}/{shard.ids_file}", b"replaced")
    with pytest.raises(IndexFormatError, match="does not match its sha256"):
        local_index_dir(uri)
    entry = fetch_index(uri, [1]).directory  # the other shards are fine
    assert not os.path.exists(os.path.join(entry, shard.ids_file))
    assert [n for n in os.listdir(os.path.join(entry, "shards")) if ".download-" in n] == []


def test_missing_index(s3_env, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    with pytest.raises(IndexFormatError, match=f"^{s3_bucket}/nothing is not a finished index: no manifest.json$"):
        open_index(f"{s3_bucket}/nothing")


def test_index_verify_on_s3(s3_index, tmp_path, monkeypatch, capsys):
    from spellshield.jobs.cli import main

    local, uri, _ = s3_index
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    assert main(["index", "verify", uri]) == 0
    assert f"index verify: {uri} is consistent: 50 vectors" in capsys.readouterr().err
    shard = read_manifest(local).shards[2]
    storage.write_bytes(f"{uri}/{shard.file}", b"not faiss")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "other-node"))
    assert main(["index", "verify", uri]) == 2
    assert f"{uri}/{shard.file} does not match its sha256" in capsys.readouterr().err
