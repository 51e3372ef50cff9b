"""The pieces the backends' exactness rests on, each checked on its own: the rounding bounds
against real float32 and float16 GEMMs, the GPU top-k doubling on CPU FAISS indexes, the IVF
list bounds, and the projection's files and spectral-norm bound."""

import json
import os

import faiss
import numpy as np
import pytest
import torch

from spellshield.indexing.exact import ExactScan
from spellshield.indexing.exactness import float16_query_scale, merge, round_up_float32
from spellshield.indexing.faiss_search import range_by_topk
from spellshield.indexing.manifest import IndexFormatError
from spellshield.indexing.projected import fit_projection, projection_dir, spectral_norm_bound, write_projection
from spellshield.indexing.search import open_index
from tests.index_helpers import brute_force, write_index


@pytest.mark.parametrize("compute", ["float32", "float16"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
@pytest.mark.parametrize("dim", [8, 3072])
def test_margins_bound_the_fast_distance_error(compute, scale, dim):
    # Large vectors overflow float16 dot products unless the query is scaled; tiny ones hit
    # float16 subnormals: the bound must hold for both.
    rng = np.random.default_rng(dim)
    base = (rng.standard_normal((500, dim)) * scale).astype(np.float16)
    queries = base[:6].astype(np.float32) + np.float32(0.01 * scale) * rng.standard_normal((6, dim)).astype(np.float32)
    scan = ExactScan(torch.from_numpy(base), compute=compute)
    q = torch.from_numpy(queries)
    qsq, qsq32, operand, s = scan._prepare(q)
    fast = scan._fast_sq(operand, qsq32, 0, s).double().numpy()
    true = brute_force(base, queries) ** 2
    bound = scan._margins(qsq, scan.sq_max, s)
    assert np.all(np.isfinite(fast))
    assert np.all(np.abs(fast - true) <= bound[:, None])


def test_float16_query_scale_keeps_products_in_range():
    s = float16_query_scale(np.array([1e4, 3.0]), 5e3)
    assert s == 2.0 ** np.floor(np.log2(2.0**14 / (1e4 * 5e3)))
    assert float16_query_scale(np.array([0.0]), 0.0) == 1.0


def test_round_up_float32_never_rounds_down():
    values = np.array([1.0, 1.0 + 1e-12, 3.3, 1e-40, 7e30])
    up = round_up_float32(values)
    assert up.dtype == np.float32 and np.all(up.astype(np.float64) >= values)
    assert np.all(np.nextafter(up, np.float32(-np.inf)).astype(np.float64) < values)


def test_merge_orders_by_distance_then_id():
    a = [(np.array([5, 2]), np.array([1.0, 2.0]))]
    b = [(np.array([1, 9]), np.array([1.0, 0.5]))]
    ids, dist = merge([a, b], k=3)[0]
    assert ids.tolist() == [9, 1, 5] and dist.tolist() == [0.5, 1.0, 1.0]


@pytest.mark.parametrize("k0, max_k", [(1, 2048), (3, 8), (64, 64)])
def test_range_by_topk_doubles_k_until_the_radius_is_passed(k0, max_k):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((700, 12)).astype(np.float32)
    index = faiss.IndexFlatL2(12)
    index.add(x)
    queries = np.concatenate([x[:5] + 0.01, rng.standard_normal((5, 12)).astype(np.float32)])
    dist_all, rows_all = index.search(queries, len(x))  # the same kernel, every row
    thresholds = np.quantile(dist_all, [0.001, 0.02, 0.2, 0.0001, 0.5, 0.01, 0.03, 0.001, 0.9, 1.0], axis=1).diagonal()
    thresholds = thresholds.astype(np.float32)
    calls = []

    def search(q, k):
        calls.append(k)
        return index.search(q, k)

    found, pending = range_by_topk(search, queries, thresholds, index.ntotal, k0, max_k)
    expected = [set(rows_all[i][dist_all[i] <= thresholds[i]].tolist()) for i in range(len(queries))]
    for i in range(len(queries)):
        if i in pending:
            assert found[i] is None and len(expected[i]) >= max_k  # left for the CPU fallback
        else:
            assert set(found[i].tolist()) == expected[i]
    assert calls[0] == k0 and all(b == min(2 * a, max_k, len(x)) for a, b in zip(calls, calls[1:]))
    assert (len(pending) > 0) == (max_k < 300)


def test_ivf_probes_few_lists_on_clustered_data_and_misses_nothing(tmp_path):
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 16)) * 10
    base = (centres[rng.integers(0, 20, 2000)] + rng.standard_normal((2000, 16))).astype(np.float32)
    path = write_index(tmp_path / "clustered", base, 1000)
    shield = open_index(path, backend="faiss", index_type="ivf", nlist=20)
    queries = (base[:30] + 0.1 * rng.standard_normal((30, 16))).astype(np.float32)
    d = brute_force(base, queries)
    radius = float(np.quantile(d, 0.01))
    for i, (ids, _) in enumerate(shield.range_search(queries, radius)):
        assert sorted(ids.tolist()) == np.flatnonzero(d[i] < radius).tolist()
    lists_per_query_and_shard = shield.lists_probed / (len(queries) * 2)
    assert lists_per_query_and_shard < 6  # of 20: the bounds prune, and prove what they prune


def test_projection_files_and_bound(tmp_path):
    rng = np.random.default_rng(6)
    base = (rng.standard_normal((600, 40)) / (1 + np.arange(40))).astype(np.float32)
    path = write_index(tmp_path / "index", base, 250)
    out = write_projection(path, dims=5)
    assert out == projection_dir(path, 5)
    meta = json.load(open(os.path.join(out, "projection.json")))
    basis = np.load(os.path.join(out, "basis.npy"))
    assert basis.shape == (5, 40) and meta["count"] == 600 and meta["dims"] == 5
    true_sigma = np.linalg.svd(basis.astype(np.float64), compute_uv=False)[0]
    assert true_sigma <= meta["sigma"] < 1 + 1e-5
    np.testing.assert_allclose(basis.astype(np.float64) @ basis.T, np.eye(5), atol=1e-6)
    assert meta["explained_variance"] > 0.8  # the spectrum decays: 5 of 40 directions keep most of it
    vectors = np.load(os.path.join(out, "vectors.npy"), mmap_mode="r")
    np.testing.assert_array_equal(vectors, base)
    np.testing.assert_array_equal(np.load(os.path.join(out, "ids.npy")), np.arange(600))
    with pytest.raises(ValueError, match="exists"):
        write_projection(path, dims=5)
    with pytest.raises(IndexFormatError, match="project-index"):
        open_index(path, backend="projected", dims=7, create=False)
    # A rewritten manifest makes the projection stale: refuse it rather than search old vectors.
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    manifest["build"] = {"rebuilt": True}
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(IndexFormatError, match="another version"):
        open_index(path, backend="projected", dims=5)


def test_fit_projection_with_fewer_samples_than_dims():
    sample = torch.randn(3, 10)
    projection = fit_projection(sample, 6)
    b = projection.basis.astype(np.float64)
    np.testing.assert_allclose(b @ b.T, np.eye(6), atol=1e-6)
    assert projection.sigma >= np.linalg.svd(b, compute_uv=False)[0]
    assert spectral_norm_bound(torch.from_numpy(projection.basis)) == projection.sigma


def test_project_index_command(capsys, tmp_path):
    from spellshield.jobs.cli import main

    base = np.random.default_rng(7).standard_normal((300, 12)).astype(np.float32)
    path = write_index(tmp_path / "index", base, 100)
    assert main(["project-index", path, "--dims", "4", "--sample-size", "200"]) == 0
    assert "300 vectors, 4 of 12 dims" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(path, "projection-4", "projection.json"))
    for argv, message in [
        (["project-index", path, "--dims", "4"], "exists"),
        (["project-index", path, "--dims", "0"], "--dims must be >= 1"),
        (["project-index", str(tmp_path / "nope")], "does not exist"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("spellshield project-index: error:") and message in err[0]
    shield = open_index(path, backend="projected", dims=4, create=False)
    ids, _ = shield.knn(base[:2], 1)[0]
    assert ids.tolist() == [0]
