"""Range search and knn over real FAISS shard files, against numpy brute force in float64."""

import numpy as np
import pytest
import torch

from indexing.encoders import LatentSpec
from indexing.search import open_index
from indexing.writer import IndexWriter

BACKENDS = ["exact", "faiss"]


def write_index(path, vectors: np.ndarray, shard_size: int) -> str:
    n, d = vectors.shape
    spec = LatentSpec("pixels", "pixels", "pixels", 1, (d, 1, 1), 1.0, 0.0)
    writer = IndexWriter(str(path), spec, shard_size)
    writer.add([f"k{i}" for i in range(n)], ["s.tar"] * n, ["0"] * n, vectors)
    writer.finish({})
    return str(path)


def brute_force(base: np.ndarray, queries: np.ndarray, radius: float):
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - base[None, :, :].astype(np.float64)) ** 2).sum(-1))
    return [np.flatnonzero(row < radius) for row in d], d


@pytest.fixture(scope="module")
def random_index(tmp_path_factory):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1000, 24)).astype(np.float32)
    path = write_index(tmp_path_factory.mktemp("rand") / "index", base, shard_size=300)
    return path, base


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantile", [0.001, 0.01, 0.05])
def test_range_search_equals_brute_force(random_index, backend, quantile):
    path, base = random_index
    rng = np.random.default_rng(1)
    queries = np.concatenate([base[:20] + 0.3 * rng.standard_normal((20, 24)), rng.standard_normal((20, 24))]).astype(np.float32)
    _, d = brute_force(base, queries, 0)
    radius = float(np.quantile(d, quantile))
    expected, d = brute_force(base, queries, radius)
    shield = open_index(path, backend=backend)
    found = shield.range_search(torch.from_numpy(queries), radius)
    assert len(found) == len(queries)
    for i, (ids, dists) in enumerate(found):
        assert ids.dtype == np.int64 and dists.dtype == np.float32
        assert sorted(ids.tolist()) == expected[i].tolist()  # recall 1.0 and no extras
        assert np.all(np.diff(dists) >= 0)  # nearest first
        np.testing.assert_allclose(dists, d[i, ids], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hits_at_the_edge_of_the_radius(tmp_path, backend):
    # Points placed at r(1 - 1e-7) and r(1 + 1e-7): float32 expanded distances cannot tell them
    # apart; the float64 re-check must keep exactly the inside ones.
    rng = np.random.default_rng(3)
    dim, radius = 64, 3.0
    query = rng.standard_normal(dim)
    dirs = rng.standard_normal((200, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    scale = np.where(np.arange(200) % 2 == 0, 1 - 1e-6, 1 + 1e-6) * radius
    base = (query + dirs * scale[:, None]).astype(np.float32)
    q32 = query.astype(np.float32)
    expected, _ = brute_force(base, q32[None], radius)
    shield = open_index(write_index(tmp_path / "edge", base, 64), backend=backend)
    ids, _ = shield.range_search(torch.from_numpy(q32[None]), radius)[0]
    assert sorted(ids.tolist()) == expected[0].tolist()
    assert 60 < len(ids) < 140  # the test really sits on the edge


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_k_keeps_nearest(random_index, backend):
    path, base = random_index
    shield = open_index(path, backend=backend)
    q = base[:3] + 0.01
    full = shield.range_search(q, 5.0)
    limited = shield.range_search(q, 5.0, max_k=4)
    for (a_ids, _), (b_ids, _) in zip(full, limited):
        assert b_ids.tolist() == a_ids[:4].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_equals_brute_force(random_index, backend):
    path, base = random_index
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((30, 24)).astype(np.float32)
    _, d = brute_force(base, queries, 0)
    shield = open_index(path, backend=backend)
    for i, (ids, dists) in enumerate(shield.knn(queries, 5)):
        assert ids.tolist() == np.argsort(d[i], kind="stable")[:5].tolist()
        np.testing.assert_allclose(dists, np.sort(d[i])[:5], rtol=1e-6)


def test_vectors_and_keys_round_trip(random_index):
    path, base = random_index
    for backend in BACKENDS:
        shield = open_index(path, backend=backend)
        ids = np.array([0, 299, 300, 999])
        assert torch.equal(shield.vectors(ids), torch.from_numpy(base[ids]))
        assert shield.keys(ids) == ["k0", "k299", "k300", "k999"]


def test_bad_radius_and_shape(random_index):
    path, _ = random_index
    shield = open_index(path)
    with pytest.raises(ValueError, match="radius"):
        shield.range_search(np.zeros((1, 24), np.float32), 0)
    with pytest.raises(ValueError, match="shape"):
        shield.range_search(np.zeros((1, 7), np.float32), 1.0)
