"""build-index on real images through Ray Data: rejects recorded, the rest indexed exactly."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from spellshield.indexing.corpus import decode_image, iter_shard
from spellshield.indexing.digits import digits_images
from spellshield.indexing.manifest import file_sha256, read_manifest
from spellshield.indexing.search import open_index
from spellshield.jobs.build_index import build_index
from spellshield.jobs.dataflow import EncodeOptions
from tests.conftest import CIFAR_DIR, add_tar_members, jpeg_bytes, needs_shared


@pytest.fixture(scope="module")
def built(ray_session, digits_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    images, _ = digits_images()
    extra = str(tmp / "extra-000000.tar")
    members = [(f"jpeg_{i:03d}.jpg", jpeg_bytes(np.repeat(images[1500 + i][:, :, None], 3, 2))) for i in range(20)]
    members.insert(5, ("corrupt_000.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF garbage that ends early"))
    members.insert(9, ("notes_000.txt", b"not an image"))
    add_tar_members(extra, members)
    corpus = ",".join(digits_corpus[:2] + [extra])
    out = str(tmp / "index")
    build_index(corpus, out, EncodeOptions(resolution=8, batch_size=64), shard_size=200)
    return out, digits_corpus[:2] + [extra]


def test_counts_and_rejects(built):
    out, shards = built
    manifest = read_manifest(out)
    assert manifest.count == 225 + 225 + 20
    rejects = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    assert manifest.rejects == 2
    by_key = {r["key"]: r for r in rejects}
    assert set(by_key) == {"corrupt_000", "notes_000"}
    assert by_key["corrupt_000"]["shard"] == "extra-000000.tar"
    assert "undecodable" in by_key["corrupt_000"]["reason"]
    assert "no image member" in by_key["notes_000"]["reason"]


def test_shards_ids_and_manifest(built):
    out, shards = built
    manifest = read_manifest(out)
    assert manifest.latent.shape == (3, 8, 8) and manifest.latent.encoder == "pixels"
    assert [s.count for s in manifest.shards] == [200, 200, 70]
    ids = []
    for shard in manifest.shards:
        assert file_sha256(os.path.join(out, shard.file)) == shard.sha256
        table = pq.read_table(os.path.join(out, shard.ids_file)).to_pydict()
        assert table["id"] == list(range(shard.first_id, shard.last_id + 1))
        ids += list(zip(table["id"], table["key"], table["shard"]))
    # ids follow corpus order: shard by shard, member by member
    expected = [(s.key, s.shard) for path in shards for s in iter_shard(path) if hasattr(s, "image")]
    expected = [e for e in expected if e[0] != "corrupt_000"]
    assert [(k, s) for _, k, s in ids] == expected
    cal = manifest.calibration
    assert cal["suggested_radius"] == pytest.approx(0.5 * cal["nn_distance_quantiles"]["0.5"])
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["format_version"] == 1


def test_vectors_are_the_pixels(built):
    out, shards = built
    shield = open_index(out)
    samples = [s for path in shards for s in iter_shard(path) if hasattr(s, "image") and s.key != "corrupt_000"]
    for global_id in (0, 224, 225, 449, 450, 469):
        expected = decode_image(samples[global_id].image, 8).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(shield.vectors([global_id]).numpy()[0], expected.reshape(-1), atol=1e-6)
    # every stored vector is found at distance 0 by an exact range search
    ids, dists = shield.range_search(shield.vectors([300]), 1e-3)[0]
    assert 300 in ids.tolist() and dists[0] == 0


def test_refuses_finished_index(built, digits_corpus):
    from spellshield.jobs.runtime import UsageError

    out, _ = built
    before = file_sha256(os.path.join(out, "manifest.json"))
    with pytest.raises(UsageError, match="already holds a finished index"):
        build_index(digits_corpus[0], out, EncodeOptions(resolution=8))
    assert file_sha256(os.path.join(out, "manifest.json")) == before


@needs_shared
def test_cifar_shard(ray_session, tmp_path):
    out = str(tmp_path / "cifar")
    build_index(os.path.join(CIFAR_DIR, "train-000000.tar"), out, EncodeOptions(resolution=32, batch_size=250), shard_size=400)
    manifest = read_manifest(out)
    assert manifest.count == 1000 and manifest.rejects == 0
    assert manifest.latent.shape == (3, 32, 32)
    shield = open_index(out)
    keys = shield.keys([0, 999])
    assert all("_" in k for k in keys)
