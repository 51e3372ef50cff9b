"""The ``ivf`` backend (a persisted inverted file over the projection) against numpy brute force in
float64: random data with duplicates, real CIFAR-10 TAEF2 latents, adversarial queries (on the
bisectors of centroids, on stored points, radii larger than every list), float16 storage; a
tampered or missing structure file refused; sharded (threads and Ray actors) equal to unsharded;
opening never trains."""

import os

import numpy as np
import pytest
import torch

from spellshield.indexing.ivf import META, ivf_dir, read_ivf, write_ivf
from spellshield.indexing.manifest import IndexFormatError
from spellshield.indexing.projected import write_projection
from spellshield.indexing.search import open_index
from spellshield.jobs.cli import main as cli_main
from spellshield.workers.index_server import IndexShardServer
from tests.conftest import CIFAR_DIR, SHARED, needs_shared
from tests.index_helpers import brute_force, cifar_latents, write_index

TAEF2_DIR = os.path.join(SHARED, "models", "taef2")


def ivf_index(path, base: np.ndarray, shard_size: int, dims: int, lists: int, dtype: str = "float32",
              code_dtype: str = "float16", shape=None) -> str:
    write_index(path, base, shard_size, dtype, shape)
    write_projection(str(path), dims, sample_size=len(base))
    write_ivf(str(path), dims, lists, code_dtype=code_dtype)
    return str(path)


def stored(base: np.ndarray, dtype: str) -> np.ndarray:
    return base.astype(np.float16).astype(np.float32) if dtype == "float16" else base


def check_range(shield, base: np.ndarray, queries: np.ndarray, radii) -> None:
    """Every radius: exactly the brute-force hits (recall and precision 1), nearest first, float64 distances."""
    d = brute_force(base, queries)
    for radius in radii:
        found = shield.range_search(torch.from_numpy(queries), float(radius))
        for i, (ids, dists) in enumerate(found):
            assert sorted(ids.tolist()) == np.flatnonzero(d[i] < radius).tolist(), f"query {i} at radius {radius}"
            assert np.all(np.diff(dists) >= 0)
            np.testing.assert_allclose(dists, d[i, ids], rtol=1e-6)


def check_knn(shield, base: np.ndarray, queries: np.ndarray, k: int) -> None:
    d = brute_force(base, queries)
    for i, (ids, _) in enumerate(shield.knn(queries, k)):
        assert ids.tolist() == np.lexsort((np.arange(len(base)), d[i]))[:k].tolist(), f"query {i}"


@pytest.fixture(scope="module", params=["float32", "float16"])
def random_ivf(request, tmp_path_factory):
    """1500 anisotropic vectors in 30 clusters with exact duplicates, 5 shards, 24 lists over a 12-dim projection."""
    rng = np.random.default_rng(0)
    scales = 3.0 / (1.0 + np.arange(32)) ** 0.7
    centres = 4.0 * rng.standard_normal((30, 32)) * scales
    base = (centres[rng.integers(0, 30, 1500)] + rng.standard_normal((1500, 32)) * scales).astype(np.float32)
    base[1480:] = base[:20]  # duplicated rows: ties, same codes, same list
    path = ivf_index(tmp_path_factory.mktemp(f"ivf-{request.param}") / "index", base, 300, 12, 24, request.param)
    return path, stored(base, request.param)


def random_queries(base: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    near = base[:10] + 0.1 * rng.standard_normal((10, base.shape[1])) * base.std(0)
    blends = 0.5 * (base[100:106] + base[700:706])
    return np.concatenate([near, blends, base[1480:1484]]).astype(np.float32)  # and duplicated corpus points


def test_range_and_knn_equal_brute_force(random_ivf):
    path, base = random_ivf
    shield = open_index(path, backend="ivf", dims=12)
    queries = random_queries(base)
    d = brute_force(base, queries)
    check_range(shield, base, queries, [np.quantile(d, q) for q in (0.0005, 0.005, 0.05, 0.5)])
    check_knn(shield, base, queries, 7)
    # The stats say how much work the bounds saved: lists probed and candidates per query.
    shield.stats.reset()
    shield.range_search(queries, float(np.quantile(d, 0.001)))
    stats = shield.stats.to_json()
    assert stats["queries"] == len(queries) and 0 < stats["lists_probed"] < 0.5 * 24 * len(queries)
    assert stats["hits"] <= stats["candidates"] < 0.1 * len(queries) * len(base)
    assert stats["lists_per_query"] == stats["lists_probed"] / len(queries)


def test_blocks_of_a_few_rows_find_what_one_block_finds(random_ivf):
    """The codes are scanned block by block (``block_rows``: small on the CPU, large on a GPU):
    blocks of 37 rows, cutting lists and the batch's union anywhere, change nothing."""
    from spellshield.indexing.ivf import CPU_BLOCK_BYTES, DEVICE_BLOCK_BYTES, block_rows

    path, base = random_ivf
    shield = open_index(path, backend="ivf", dims=12)
    assert shield.scan.chunk_rows == block_rows(12, "cpu") == CPU_BLOCK_BYTES // 48
    assert block_rows(256, "cuda") == DEVICE_BLOCK_BYTES // 1024 and block_rows(256, "cpu") == 4096
    queries = random_queries(base)
    d = brute_force(base, queries)
    radii = [np.quantile(d, q) for q in (0.005, 0.05, 0.5)]
    whole = [shield.scan.candidates(torch.from_numpy(queries).to(torch.float32), np.full(len(queries), r)) for r in radii]
    scan = shield.scan
    lists = np.flatnonzero(np.random.default_rng(1).random(scan.lists) < 0.6)  # some lists, made block by block
    blocks = list(scan._blocks(lists, 37))
    assert all(len(pos) == len(owner) == 37 for pos, owner in blocks[:-1]) and 0 < len(blocks[-1][0]) <= 37
    assert np.array_equal(np.concatenate([pos for pos, _ in blocks]),
                          np.concatenate([np.arange(scan.offsets[j], scan.offsets[j + 1]) for j in lists]))
    assert np.array_equal(np.concatenate([owner for _, owner in blocks]), np.repeat(lists, scan.sizes[lists]))
    shield.scan.chunk_rows = 37
    for r, (qi, rows, probed) in zip(radii, whole):
        qi2, rows2, probed2 = shield.scan.candidates(torch.from_numpy(queries).to(torch.float32), np.full(len(queries), r))
        assert probed2 == probed and sorted(zip(qi2.tolist(), rows2.tolist())) == sorted(zip(qi.tolist(), rows.tolist()))
    check_range(shield, base, queries, radii)


def test_rows_any_reads_words_like_any():
    """``rows_any`` (the rows a (rows, B) bool mask keeps, read as int64 words when B is a multiple
    of 8) equals ``any(1)`` for every width, a transposed (non-contiguous) mask and no rows."""
    from spellshield.indexing.ivf import rows_any

    rng = np.random.default_rng(5)
    for width in (1, 7, 8, 12, 16, 24, 64):
        mask = torch.from_numpy(rng.random((300, width)) < 0.02)
        mask[7] = True
        mask[8] = False
        assert torch.equal(rows_any(mask), mask.any(1)), width
        assert torch.equal(rows_any(mask.T.contiguous().T), mask.any(1)), width
    assert rows_any(torch.zeros((0, 16), dtype=torch.bool)).shape == (0,)


def test_a_radius_larger_than_every_list(random_ivf):
    path, base = random_ivf
    shield = open_index(path, backend="ivf", dims=12)
    queries = random_queries(base)
    radius = 2.0 * float(brute_force(base, queries).max()) + 1.0
    for ids, _ in shield.range_search(queries, radius):
        assert sorted(ids.tolist()) == list(range(len(base)))
    for ids, _ in shield.range_search(queries, radius, max_k=5):
        assert len(ids) == 5


def bisector_queries(path: str, dims: int, lists: int, base_dim: int) -> np.ndarray:
    """Queries whose projections lie exactly between two centroids, and on a centroid itself."""
    proj = os.path.join(path, f"projection-{dims}")
    basis, mean = np.load(os.path.join(proj, "basis.npy")), np.load(os.path.join(proj, "mean.npy"))
    centroids = np.load(os.path.join(ivf_dir(path, dims, lists), "centroids.npy")).astype(np.float64)
    pairs = [(0, 1), (2, 5), (3, 7), (4, 4)]
    mids = np.array([(centroids[a] + centroids[b]) / 2 for a, b in pairs])
    return (mean + mids @ basis.astype(np.float64)).astype(np.float32)  # basis rows orthonormal: P q = mid


def test_boundary_queries_and_duplicates(tmp_path):
    # A full-rank projection (dims = D) makes the bisector queries exact in the projected space;
    # a lattice with every point stored twice puts many stored points on bisectors too.
    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(*[np.arange(5.0)] * 3), -1).reshape(-1, 3)
    base = np.concatenate([grid, grid, grid[:40] + 0.5, grid[:100] + 0.25]).astype(np.float32)
    base = np.concatenate([base, np.zeros((len(base), 3), np.float32)], 1) @ np.linalg.qr(rng.standard_normal((6, 6)))[0].astype(np.float32)
    base = base.astype(np.float32)
    path = ivf_index(tmp_path / "lattice", base, 100, 6, 9)
    shield = open_index(path, backend="ivf")
    queries = np.concatenate([bisector_queries(path, 6, 9, 6), base[[0, 125, 250]]]).astype(np.float32)
    d = brute_force(base, queries)
    # Radii a hair (1e-12, far below float32 rounding) either side of stored distances: many ties on
    # the lattice. (Exactly at a distance, float64 summation order alone decides; no backend promises it.)
    values = np.unique(d[d > 0])[:10]
    check_range(shield, base, queries, np.concatenate([values * (1 - 1e-12), values * (1 + 1e-12)]))
    check_knn(shield, base, queries, 10)


@pytest.mark.parametrize("code_dtype", ["float16", "float32"])
def test_codes_rounding_within_the_bound(tmp_path, code_dtype):
    # Points within float16 rounding of the radius: a bound that ignored the codes' rounding loses them.
    rng = np.random.default_rng(3)
    query = rng.standard_normal(16).astype(np.float32) * 4
    dirs = rng.standard_normal((600, 16))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radius = 3.0
    base = (query + dirs * (radius * (1 + 2.0**-11 * rng.uniform(-1, 1, 600)))[:, None]).astype(np.float32)
    path = ivf_index(tmp_path / "edge", base, 200, 16, 12, code_dtype=code_dtype)
    shield = open_index(path, backend="ivf")
    d = brute_force(base, query[None])[0]
    assert 0.2 < (d < radius).mean() < 0.8
    ids, _ = shield.range_search(query[None], radius)[0]
    assert sorted(ids.tolist()) == np.flatnonzero(d < radius).tolist()


@pytest.mark.parametrize("code_dtype", ["float16", "float32"])
def test_the_head_pass_loses_no_hit(tmp_path, code_dtype):
    """The scan's first pass compares only the codes' leading ``head_dims`` coordinates. Queries
    within float16 rounding of the radius from a stored point, displaced along one of the fitted
    principal directions (the whole projected distance then lies in one coordinate, in the head
    or after it), along mixtures of them, or orthogonal to the projection: every head size finds
    exactly the brute-force hits, and its candidates are among those of one pass over all d."""
    from spellshield.indexing.ivf import HEAD_DIMS, head_dims

    assert head_dims(256) == HEAD_DIMS == 64 and head_dims(128) == 64 and head_dims(127) == 127 and head_dims(8) == 8
    rng = np.random.default_rng(11)
    base = (rng.standard_normal((900, 16)) * 4.0 * 0.8 ** np.arange(16)).astype(np.float32)
    base[880:] = base[:20]  # duplicates: ties
    path = ivf_index(tmp_path / "head", base, 300, 8, 10, code_dtype=code_dtype)
    shield = open_index(path, backend="ivf", dims=8)
    scan = shield.scan
    assert scan.head_dims == 8  # d = 8: one pass by default
    basis = scan.projection.basis.astype(np.float64)  # (8, 16), orthonormal rows
    outside = np.linalg.svd(basis)[2][-1]  # orthogonal to every row: projected distance 0
    mixes = rng.standard_normal((6, 8)) @ basis
    dirs = np.concatenate([basis, -basis[:4], mixes / np.linalg.norm(mixes, axis=1, keepdims=True), outside[None]])
    radius = 2.0
    anchors = base[rng.integers(0, len(base), (len(dirs), 16))]
    steps = radius * (1 + 2.0**-11 * rng.uniform(-1, 1, (len(dirs), 16)))
    queries = (anchors + dirs[:, None, :] * steps[..., None]).reshape(-1, 16).astype(np.float32)
    stored_base = stored(base, "float32")
    d = brute_force(stored_base, queries)
    assert 0.3 < (d < radius).any(1).mean() < 0.7  # about half the queries have their anchor inside
    q = torch.from_numpy(queries)
    pairs = lambda: set(zip(*[x.tolist() for x in scan.candidates(q, np.full(len(q), radius))[:2]]))  # noqa: E731
    one_pass = pairs()
    for head in (1, 2, 3, 5, 8):
        scan.head_dims = head
        check_range(shield, stored_base, queries, [radius])
        assert pairs() <= one_pass, f"head {head}"
    scan.head_dims = 9
    with pytest.raises(ValueError, match="head_dims must be in 1..8"):
        shield.range_search(queries, radius)


def test_sharded_equals_unsharded(random_ivf):
    path, base = random_ivf
    one = open_index(path, backend="ivf", dims=12)
    queries = random_queries(base)
    d = brute_force(base, queries)
    sharded = open_index(path, backend="sharded", shard_backend="ivf", parts=3, dims=12)
    for radius in (np.quantile(d, 0.002), np.quantile(d, 0.05)):
        a = one.range_search(queries, float(radius))
        b = sharded.range_search(queries, float(radius))
        assert [x[0].tolist() for x in a] == [x[0].tolist() for x in b]
        assert [x[1].tolist() for x in a] == [x[1].tolist() for x in b]
    assert sharded.lists_per_query() > 0 and sharded.candidates_per_query() > 0
    assert [x[0].tolist() for x in one.knn(queries, 5)] == [x[0].tolist() for x in sharded.knn(queries, 5)]
    assert torch.equal(sharded.vectors([1499, 0, 650]), torch.from_numpy(base[[1499, 0, 650]]))
    # A server over two of the five shards answers for exactly their rows.
    server = IndexShardServer(path, [1, 3], backend="ivf", dims=12)
    own = np.r_[300:600, 900:1200]
    radius = float(np.quantile(d, 0.05))
    for i, (ids, _) in enumerate(server.range_search64(queries, np.full(len(queries), radius), None)):
        assert sorted(ids.tolist()) == own[d[i, own] < radius].tolist()
    assert server.stats()["lists_probed"] > 0


def test_codes_split_in_ram_search_like_the_file(tmp_path):
    """From d = 128 the shield holds its codes split after the head's 64 coordinates
    (``read_codes``, ``SplitCodes``): indexed like the file's array, read in blocks and by a shard's
    selection, and searched (whole or by parts, one pass or two) exactly like brute force."""
    from spellshield.indexing.ivf import SplitCodes, read_codes

    rng = np.random.default_rng(4)
    base = (rng.standard_normal((1200, 160)) * 3.0 * 0.98 ** np.arange(160)).astype(np.float32)
    base[1190:] = base[:10]
    path = ivf_index(tmp_path / "wide", base, 300, 128, 20)
    shield = open_index(path, backend="ivf", dims=128)
    codes = shield.scan.codes
    file = np.load(os.path.join(shield.path, "codes.npy"))
    assert isinstance(codes, SplitCodes) and codes.head.shape == (1200, 64) and codes.tail.shape == (1200, 64)
    assert codes.head.flags.c_contiguous and codes.tail.flags.c_contiguous and shield.scan.head_dims == 64
    picks = np.array([0, 5, 6, 700, 1199])
    for k in (1, 64, 65, 100, 128, None):
        assert np.array_equal(codes[picks, :k], file[picks, :k]) and np.array_equal(codes[3:9, :k], file[3:9, :k])
    assert np.array_equal(codes[10:20], file[10:20])
    keep = rng.random(1200) < 0.4
    few = read_codes(os.path.join(shield.path, "codes.npy"), 64, keep, block_bytes=4096)  # blocks of 16 rows
    assert np.array_equal(few[np.arange(keep.sum()), :128], file[keep])
    assert np.array_equal(read_codes(os.path.join(shield.path, "codes.npy"), 128), file)  # no split: one array
    for cols in (slice(3, 5), slice(None, -1), slice(None, None, 2)):
        with pytest.raises(IndexError, match="leading columns"):
            codes[:, cols]
    queries = np.concatenate([base[:6] + 0.05 * rng.standard_normal((6, 160)).astype(np.float32), base[1190:1192]])
    d = brute_force(base, queries)
    radii = [np.quantile(d, q) for q in (0.002, 0.02, 0.3)]
    check_range(shield, base, queries, radii)
    check_knn(shield, base, queries, 7)
    shield.scan.head_dims = 128  # one pass over all d: the same answers
    check_range(shield, base, queries, radii)
    sharded = open_index(path, backend="sharded", shard_backend="ivf", parts=2, dims=128)
    check_range(sharded, base, queries, radii)


@pytest.mark.parametrize("name", ["codes.npy", "radii.npy", "centroids.npy", "rows.npy", "offsets.npy"])
def test_a_tampered_structure_file_is_refused(tmp_path, name):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((400, 8)).astype(np.float32)
    path = ivf_index(tmp_path / "index", base, 200, 8, 6)
    open_index(path, backend="ivf")  # intact: opens
    file = os.path.join(ivf_dir(path, 8, 6), name)
    with open(file, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(IndexFormatError, match="sha256"):
        open_index(path, backend="ivf")
    with pytest.raises(IndexFormatError, match="sha256"):
        IndexShardServer(path, [0], backend="ivf")
    os.remove(file)
    with pytest.raises(IndexFormatError, match="missing"):
        read_ivf(ivf_dir(path, 8, 6))


def test_opening_never_trains(tmp_path):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((300, 8)).astype(np.float32)
    path = write_index(tmp_path / "index", base, 100)
    with pytest.raises(IndexFormatError, match="project-index"):
        open_index(path, backend="ivf", dims=8)
    assert not os.path.exists(os.path.join(path, "projection-8"))  # nothing fitted on open
    write_projection(path, 8)
    with pytest.raises(IndexFormatError, match="--lists"):
        open_index(path, backend="ivf", dims=8)
    # project-index --lists reuses the projection and writes the structure; opening reads it as is.
    assert cli_main(["project-index", path, "--dims", "8", "--lists", "5"]) == 0
    meta_file = os.path.join(ivf_dir(path, 8, 5), META)
    before = {n: os.stat(os.path.join(ivf_dir(path, 8, 5), n)).st_mtime_ns for n in os.listdir(ivf_dir(path, 8, 5))}
    shield = open_index(path, backend="ivf", dims=8)
    check_range(shield, base, base[:5] + 0.01, [1.0, 3.0])
    assert before == {n: os.stat(os.path.join(ivf_dir(path, 8, 5), n)).st_mtime_ns for n in os.listdir(ivf_dir(path, 8, 5))}
    assert os.path.isfile(meta_file)


def test_project_index_rejects_bad_lists(tmp_path, capsys):
    base = np.random.default_rng(6).standard_normal((50, 4)).astype(np.float32)
    path = write_index(tmp_path / "index", base, 50)
    assert cli_main(["project-index", path, "--dims", "4", "--lists", "51"]) == 2
    assert "--lists" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(path, "projection-4"))


@needs_shared
def test_real_cifar_taef2_latents(tmp_path):
    if not os.path.isdir(TAEF2_DIR):
        pytest.skip("../shared TAEF2 weights are absent")
    base = cifar_latents(CIFAR_DIR, 600, encoder=TAEF2_DIR, resolution=64)
    held_out = cifar_latents(CIFAR_DIR, 4, start_shard=5, encoder=TAEF2_DIR, resolution=64)
    path = ivf_index(tmp_path / "taef2", base, 200, 256, 16, shape=(32, 8, 8))
    shield = open_index(path, backend="ivf")
    rng = np.random.default_rng(2)
    near = base[:6] + 0.05 * base.std() * rng.standard_normal((6, base.shape[1]))
    queries = np.concatenate([near, 0.5 * (base[100:104] + base[200:204]), held_out, base[300:302]]).astype(np.float32)
    d = brute_force(base, queries)
    nn = np.sort(brute_force(base, base[:100]), 1)[:, 1]
    suggested = 0.5 * float(np.median(nn))
    check_range(shield, base, queries, [suggested / 8, suggested / 2, suggested, np.quantile(d, 0.05)])
    check_knn(shield, base, queries, 5)


@pytest.mark.slow
def test_ray_index_servers_over_the_inverted_file(ray_session, random_ivf):
    from spellshield.workers.index_client import start_index_servers

    ray = ray_session
    path, base = random_ivf
    node = ray.get_runtime_context().get_node_id()
    placement = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    shield = start_index_servers(path, parts=2, backend="ivf", dims=12,
                                 actor_options=[{"num_cpus": 0.1, "scheduling_strategy": placement}] * 2)
    try:
        queries = random_queries(base)
        d = brute_force(base, queries)
        radius = float(np.quantile(d, 0.01))
        local = open_index(path, backend="ivf", dims=12).range_search(queries, radius)
        remote = shield.range_search(queries, radius)
        assert [x[0].tolist() for x in remote] == [x[0].tolist() for x in local]
        assert [x[1].tolist() for x in remote] == [x[1].tolist() for x in local]
        assert sum(s["lists_probed"] for s in shield.part_stats()) > 0
        ray.kill(shield.parts[0])  # fail closed: a lost part raises, never a partial answer
        with pytest.raises(ray.exceptions.RayActorError):
            shield.range_search(queries, radius)
    finally:
        shield.close()


def test_queries_just_beyond_the_farthest_point_of_every_list(tmp_path):
    # The covering radius is tight: the hit of a query just outside a list's farthest point (along
    # the ray from the centroid) is found only if the list's whole radius is in the bound.
    rng = np.random.default_rng(8)
    centres = 6.0 * rng.standard_normal((10, 8))
    base = (centres[rng.integers(0, 10, 800)] + rng.standard_normal((800, 8))).astype(np.float32)
    path = ivf_index(tmp_path / "index", base, 400, 8, 10, code_dtype="float32")
    folder = ivf_dir(path, 8, 10)
    proj = os.path.join(path, "projection-8")
    basis = np.load(os.path.join(proj, "basis.npy")).astype(np.float64)
    mean = np.load(os.path.join(proj, "mean.npy")).astype(np.float64)
    centroids = np.load(os.path.join(folder, "centroids.npy")).astype(np.float64)
    offsets, rows, codes = (np.load(os.path.join(folder, n)) for n in ("offsets.npy", "rows.npy", "codes.npy"))
    queries, delta = [], 0.05
    for j in range(10):
        local = codes[offsets[j]:offsets[j + 1]].astype(np.float64)
        far = int(np.argmax(np.linalg.norm(local - centroids[j], axis=1)))
        direction = (local[far] - centroids[j]) / np.linalg.norm(local[far] - centroids[j])
        queries.append(base[rows[offsets[j] + far]] + delta * (direction @ basis))  # P^T: back to the vectors' space
    queries = np.array(queries, np.float32)
    shield = open_index(path, backend="ivf")
    check_range(shield, base, queries, [1.5 * delta, 4 * delta])
    for ids, _ in shield.range_search(queries, 1.5 * delta):
        assert len(ids) >= 1


def test_bucketed_list_order_equals_one_bucket(tmp_path):
    # The build sorts the codes into list order through buckets by list range (bounded memory):
    # any number of buckets gives the same files, each list's rows ascending, each code the
    # float16 rounding of its row's float64 projection, each row in the list of its nearest centroid.
    from spellshield.indexing.ivf import build_ivf
    from spellshield.indexing.projected import fit_projection, project

    rng = np.random.default_rng(5)
    base = (rng.standard_normal((3000, 24)) * (1.0 / (1 + np.arange(24)))).astype(np.float16)
    base[2990:] = base[:10]
    projection = fit_projection(torch.from_numpy(base.astype(np.float32)), 8)
    files = {}
    for buckets, size in (("one", 1 << 30), ("many", 3000 * 8 * 2 // 7)):
        out = str(tmp_path / buckets)
        build_ivf(out, base, projection, 40, chunk_rows=256, bucket_bytes=size)
        files[buckets] = {n: np.load(os.path.join(out, n)) for n in ("codes.npy", "rows.npy", "offsets.npy", "radii.npy")}
    for name, value in files["one"].items():
        np.testing.assert_array_equal(value, files["many"][name], err_msg=name)
    rows, offsets, codes = files["one"]["rows.npy"], files["one"]["offsets.npy"], files["one"]["codes.npy"]
    assert sorted(rows.tolist()) == list(range(3000))
    p64 = project(torch.from_numpy(base), torch.from_numpy(projection.basis).to(torch.float64),
                  torch.from_numpy(projection.mean).to(torch.float64))
    np.testing.assert_array_equal(codes, p64.to(torch.float16).numpy()[rows])
    centroids = np.load(str(tmp_path / "one" / "centroids.npy")).astype(np.float64)
    d2 = ((codes.astype(np.float64)[:, None, :] - centroids[None]) ** 2).sum(2)
    for j in range(40):
        inside = slice(offsets[j], offsets[j + 1])
        assert np.all(np.diff(rows[inside]) > 0)
        assert np.all(d2[inside, j] <= d2[inside].min(1) + 1e-3)  # nearest up to float32 ties


@pytest.mark.slow
def test_generation_rows_and_audit_report_count_the_ivf_searches(memorizer_model, protected_index, tmp_path):
    # A run whose search counts are known: a radius larger than every list, one correction iteration
    # and no noise gate, so every step searches each sample once, every stored vector is a candidate
    # and every non-empty list is probed.
    import shutil

    import pandas as pd

    from spellshield.auditing.report import write_report
    from spellshield.auditing.summary import summarize
    from spellshield.pipeline.config import GenerateConfig
    from spellshield.pipeline.scheduler import SpellConfig
    from spellshield.workers.generation import GenerationWorker, WorkerRuntime
    from spellshield.workers.units import PromptRequest, plan_samples, plan_units

    index = str(tmp_path / "index")
    shutil.copytree(protected_index, index)
    dim = int(np.prod(open_index(index).manifest.latent.shape))
    write_projection(index, dim)
    lists_dir = write_ivf(index, dim, 6)
    sizes = np.diff(np.load(os.path.join(lists_dir, "offsets.npy")))
    count, lists = int(sizes.sum()), int((sizes > 0).sum())
    spell = SpellConfig(overcompensation=1e-9, correction_iterations=1, min_noise_radii=0.0)
    config = GenerateConfig.build(memorizer_model, str(tmp_path / "run"), index=index, radius=1e3, spell=spell, steps=5,
                                  batch_size=3, on_breach="flag", search_backend="ivf")
    worker = GenerationWorker(config, WorkerRuntime(device="cpu"))
    assert worker.shield.backend == "ivf"
    for unit in plan_units(plan_samples([PromptRequest(None, 5)], base_seed=0), unit_size=5):
        worker.run_unit(unit)
    rows = pd.read_parquet(str(tmp_path / "run" / "audit" / "samples"))
    assert len(rows) == 5 and (rows["steps"] == 5).all()
    np.testing.assert_allclose(rows["index_queries"], 5.0)  # batches of 3 and 2: counts divided evenly
    np.testing.assert_allclose(rows["index_candidates"], 5.0 * count)
    np.testing.assert_allclose(rows["index_lists_probed"], 5.0 * lists)
    summary = summarize({}, rows, pd.DataFrame(), None, None)
    assert summary["index_search"] == {"index_queries": 25.0, "candidates_per_query": float(count),
                                       "lists_probed_per_query": float(lists)}
    os.makedirs(tmp_path / "audit")
    page = open(write_report(str(tmp_path / "audit"), summary, [], {})).read()
    assert f"<td>{count:.2f}, {lists:.1f} (over 25 queries)</td>" in page
