"""Every search backend against numpy brute force in float64, on real FAISS shard files:
random data and real CIFAR-10 vectors (pixels, and latents of the real pretrained TAEF2), float32
and float16 storage, several radii, hits within float32 and float16 rounding of the radius, knn
with ties broken by id."""

import math
import os

import numpy as np
import pytest
import torch

from spellshield.indexing.search import open_index
from spellshield.indexing.encoders import PIXELS
from spellshield.indexing.store import DTYPES
from spellshield.toys.indexes import cifar_latents
from tests.conftest import CIFAR_DIR, SHARED, needs_shared
from tests.index_helpers import brute_force, write_index

TAEF2_DIR = os.path.join(SHARED, "models", "taef2")

CONFIGS = {
    "exact": dict(backend="exact"),
    "exact-gemm16": dict(backend="exact", compute="float16"),  # the GPU's float16 GEMM path, on the CPU
    "faiss": dict(backend="faiss"),
    "faiss-ivf": dict(backend="faiss", index_type="ivf"),
    "projected": dict(backend="projected", dims=6),  # full vectors memory-mapped from disk
    "projected-memory": dict(backend="projected", dims=6, full="memory"),
    "sharded": dict(backend="sharded", parts=2),
    "sharded-faiss-ivf": dict(backend="sharded", shard_backend="faiss", index_type="ivf", parts=3),
    "sharded-projected": dict(backend="sharded", shard_backend="projected", parts=2, dims=6),
}
CIFAR_CONFIGS = ["exact", "exact-gemm16", "faiss", "faiss-ivf", "projected", "sharded"]  # the rest: random data
_shields: dict = {}


def shield_for(path: str, config: str, dtype: str, dims: int | None = None):
    options = dict(CONFIGS[config])
    if options.get("compute") == "float16" and dtype != "float16":
        pytest.skip("the float16 GEMM needs float16 storage")
    if dims is not None and "dims" in options:
        options["dims"] = dims
    key = (path, config, dims)
    if key not in _shields:
        _shields[key] = open_index(path, **options)
    return _shields[key]


def stored(base: np.ndarray, dtype: str) -> np.ndarray:
    """What the index holds: float16 storage rounds once, and that rounding is the truth."""
    return base.astype(np.float16).astype(np.float32) if dtype == "float16" else base


@pytest.fixture(scope="module", params=list(DTYPES))
def random_index(request, tmp_path_factory):
    """1000 anisotropic vectors (a spectrum for the projection to find) with exact duplicates (ties)."""
    rng = np.random.default_rng(0)
    scales = 3.0 / (1.0 + np.arange(24)) ** 0.8
    base = (rng.standard_normal((1000, 24)) * scales).astype(np.float32)
    base[990:] = base[:10]  # duplicated rows: knn must break their ties by id
    path = write_index(tmp_path_factory.mktemp(f"rand-{request.param}") / "index", base, 300, request.param)
    return path, stored(base, request.param), request.param


CIFAR_SPACES = {
    # space: (encoder spec, image resolution, latent shape, corpus size, shard size, projection
    # dims that make the filter selective: 32 PCA directions hold 82% of the pixels' variance but
    # only 33% of TAEF2's latents', whose spectrum is flatter; 256 hold 77% of it)
    "pixels": (PIXELS, 32, (3, 32, 32), 2000, 700, 32),
    "taef2": (TAEF2_DIR, 64, (32, 8, 8), 700, 250, 256),  # the real pretrained TAEF2 of ../shared
}
_encoded: dict = {}


def cifar_space(space: str) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, 4 held-out images) of a space, encoded once per test module."""
    if space not in _encoded:
        encoder, resolution, _, count, _, _ = CIFAR_SPACES[space]
        _encoded[space] = (cifar_latents(CIFAR_DIR, count, encoder=encoder, resolution=resolution),
                           cifar_latents(CIFAR_DIR, 4, start_shard=5, encoder=encoder, resolution=resolution))
    return _encoded[space]


@pytest.fixture(scope="module", params=[(space, dtype) for space in CIFAR_SPACES for dtype in DTYPES],
                ids=lambda p: "-".join(p))
def cifar_index(request, tmp_path_factory):
    space, dtype = request.param
    encoder, _, shape, _, shard_size, filter_dims = CIFAR_SPACES[space]
    if not os.path.isdir(CIFAR_DIR) or not os.path.isdir(encoder if encoder != PIXELS else CIFAR_DIR):
        pytest.skip("../shared (CIFAR-10 shards, TAEF2 weights) is absent")
    base, held_out = cifar_space(space)
    path = write_index(tmp_path_factory.mktemp(f"cifar-{space}-{dtype}") / "index", base, shard_size, dtype, shape)
    return path, stored(base, dtype), dtype, held_out, filter_dims


def random_queries(base: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    near = base[:20] + 0.2 * rng.standard_normal((20, base.shape[1])) * base.std(0)
    far = rng.standard_normal((12, base.shape[1])) * base.std(0)
    return np.concatenate([near, far, base[20:24]]).astype(np.float32)  # and 4 exact corpus points


def cifar_queries(base: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """Near-copies of corpus images, blends of two, held-out images and exact corpus points."""
    rng = np.random.default_rng(2)
    near = base[:8] + 0.1 * base.std() * rng.standard_normal((8, base.shape[1]))
    blends = 0.5 * (base[100:104] + base[200:204])
    return np.concatenate([near, blends, held_out, base[300:302]]).astype(np.float32)


def check_range(shield, base, queries, quantiles):
    d = brute_force(base, queries)
    for quantile in quantiles:
        radius = float(np.quantile(d, quantile))
        found = shield.range_search(torch.from_numpy(queries), radius)
        assert len(found) == len(queries)
        for i, (ids, dists) in enumerate(found):
            assert ids.dtype == np.int64 and dists.dtype == np.float32
            expected = np.flatnonzero(d[i] < radius)
            assert sorted(ids.tolist()) == expected.tolist(), f"query {i} at radius {radius}"  # recall 1, no extras
            assert np.all(np.diff(dists) >= 0)  # nearest first
            np.testing.assert_allclose(dists, d[i, ids], rtol=1e-6)


def check_knn(shield, base, queries, k):
    d = brute_force(base, queries)
    for i, (ids, dists) in enumerate(shield.knn(queries, k)):
        order = np.lexsort((np.arange(len(base)), d[i]))[:k]  # nearest first, ties by id
        assert ids.tolist() == order.tolist(), f"query {i}"
        np.testing.assert_allclose(dists, d[i, order], rtol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
def test_range_search_equals_brute_force_on_random_data(random_index, config):
    path, base, dtype = random_index
    check_range(shield_for(path, config, dtype), base, random_queries(base), [0.001, 0.01, 0.05, 0.3])


@pytest.mark.parametrize("config", CONFIGS)
def test_knn_equals_brute_force_with_ties_by_id(random_index, config):
    path, base, dtype = random_index
    shield = shield_for(path, config, dtype)
    queries = random_queries(base)
    queries[-1] = base[3]  # base[993] duplicates it: a tie at distance 0
    for k in (1, 5, 12):
        check_knn(shield, base, queries, k)


@needs_shared
@pytest.mark.parametrize("config", CIFAR_CONFIGS)
def test_range_search_and_knn_on_cifar(cifar_index, config):
    path, base, dtype, held_out, _ = cifar_index
    shield = shield_for(path, config, dtype, dims=32)
    queries = cifar_queries(base, held_out)
    check_range(shield, base, queries, [0.0005, 0.005, 0.02])
    check_knn(shield, base, queries, 3)


@needs_shared
def test_projection_filter_is_selective_on_cifar(cifar_index):
    path, base, dtype, held_out, filter_dims = cifar_index
    shield = open_index(path, backend="projected", dims=filter_dims)
    queries = cifar_queries(base, held_out)
    radius = float(np.quantile(brute_force(base, queries), 0.002))
    shield.stats.reset()
    shield.range_search(queries, radius)
    assert shield.stats.queries == len(queries)
    assert shield.stats.hits <= shield.stats.candidates < 0.25 * len(queries) * len(base)
    assert shield.stats.candidates_per_query == shield.stats.candidates / len(queries)


def edge_case(dtype: str, dim: int = 64, count: int = 400, radius: float = 3.0):
    """A query and stored points whose distances straddle the radius by less than storage rounding."""
    rng = np.random.default_rng(3)
    query = rng.standard_normal(dim).astype(np.float32)
    dirs = rng.standard_normal((count, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rel = 1e-6 if dtype == "float32" else 2.0**-11
    scale = radius * (1 + rel * rng.uniform(-1, 1, count))
    base = stored((query + dirs * scale[:, None]).astype(np.float32), dtype)
    return query, base, radius, rel


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("config", CONFIGS)
def test_hits_within_rounding_of_the_radius(tmp_path, config, dtype):
    # float32: points at r (1 +- 1e-6), which float32 expanded distances cannot tell apart;
    # float16: points within float16 rounding (2^-11 relative) of r, after float16 storage.
    query, base, radius, rel = edge_case(dtype)
    d = brute_force(base, query[None])[0]
    assert (np.abs(d - radius) < rel * radius).sum() > 100 and 0.2 < (d < radius).mean() < 0.8
    options = dict(CONFIGS[config], **({"dims": 8} if "dims" in CONFIGS[config] else {}))
    if options.get("compute") == "float16" and dtype != "float16":
        pytest.skip("the float16 GEMM needs float16 storage")
    shield = open_index(write_index(tmp_path / "edge", base, 150, dtype), **options)
    ids, dists = shield.range_search(torch.from_numpy(query[None]), radius)[0]
    assert sorted(ids.tolist()) == np.flatnonzero(d < radius).tolist()
    assert np.all(dists < np.float32(radius) * (1 + 1e-6))


@pytest.mark.parametrize("config", CONFIGS)
def test_max_k_keeps_the_nearest(random_index, config):
    path, base, dtype = random_index
    shield = shield_for(path, config, dtype)
    q = base[:3] + 0.01
    full = shield.range_search(q, 5.0)
    limited = shield.range_search(q, 5.0, max_k=4)
    for (a_ids, a_d), (b_ids, b_d) in zip(full, limited):
        assert len(a_ids) > 4
        assert b_ids.tolist() == a_ids[:4].tolist() and b_d.tolist() == a_d[:4].tolist()


@pytest.mark.parametrize("config", CONFIGS)
def test_vectors_and_keys_round_trip(random_index, config):
    path, base, dtype = random_index
    shield = shield_for(path, config, dtype)
    ids = np.array([999, 0, 299, 300, 601])
    assert torch.equal(shield.vectors(ids).cpu(), torch.from_numpy(base[ids]))
    assert shield.keys(ids) == ["k999", "k0", "k299", "k300", "k601"]
    assert shield.count == len(base) and shield.dim == base.shape[1]


def test_chunk_boundaries_do_not_matter(random_index):
    path, base, dtype = random_index
    queries = random_queries(base)
    whole = open_index(path)
    chunked = open_index(path, chunk_rows=37)
    assert len(chunked.scan._starts) > 20
    for a, b in zip(whole.range_search(queries, 2.0), chunked.range_search(queries, 2.0)):
        assert a[0].tolist() == b[0].tolist()
    for a, b in zip(whole.knn(queries, 7), chunked.knn(queries, 7)):
        assert a[0].tolist() == b[0].tolist()


def test_bad_input_is_refused(random_index):
    path, _, _ = random_index
    shield = open_index(path)
    with pytest.raises(ValueError, match="radius"):
        shield.range_search(np.zeros((1, 24), np.float32), 0)
    with pytest.raises(ValueError, match="radius"):
        shield.range_search(np.zeros((1, 24), np.float32), math.inf)
    with pytest.raises(ValueError, match="shape"):
        shield.range_search(np.zeros((1, 7), np.float32), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        shield.range_search(np.full((1, 24), np.nan, np.float32), 1.0)  # fail closed, never "no hit"
    with pytest.raises(ValueError, match="k must be"):
        shield.knn(np.zeros((1, 24), np.float32), 0)
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        open_index(path, backend="annoy")
    with pytest.raises(ValueError, match="shard numbers"):
        open_index(path, shards=[0, 9])
