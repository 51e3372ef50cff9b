"""``projected``: a PCA projection to d dimensions as a filter, then an exact re-check against the
full vectors, which may stay on disk (a memory-mapped ``.npy``).

Why no hit is lost. P is the stored float32 basis (d, D); its rows are orthonormal up to
rounding, and its largest singular value s (computed in float64 when the projection is written,
about 1 + 1e-7) bounds ``|P x| <= s |x|`` for every x. The mean m cancels from differences, so a
hit z of query q (``|q - z| < r``) has ``|P(q - m) - P(z - m)| < s r``. The stored projections
``p_z`` and the query's ``p_q`` are computed in float64 and rounded to float32 once, so each is
off by at most ``u |p| + gamma_D(float64) sqrt(d) s |x - m|``. The filter therefore keeps every
vector whose projection lies within

    t = s r + E(p_q) + max E(p_z)

of the query's, found by the ``exact`` kernel over the (N, d) projections (which widens t^2 by
its own float32 bound). Every candidate is then decided against the full vectors in float64.

The filter is only as selective as the data's spectrum allows: on isotropic data a d-dim
projection keeps d/D of every distance and passes almost everything. ``stats`` reports the
candidates per query; when a batch's candidates cover more than half the index, the re-check
becomes the plain exact scan (in bounded chunks from disk), so an unselective filter costs one
exact scan and never more.

Files, in ``INDEX_DIR/projection-<d>/`` (written by ``write_projection`` or ``spellshield
project-index``, or lazily by ``open_index(..., backend="projected")``, always to a temporary
directory renamed into place):

    projection.json   d, D, count, s, norms used in the bounds, variance kept, manifest sha256
    basis.npy         float32 (d, D), orthonormal rows      mean.npy   float32 (D,)
    projected.npy     float32 (N, d), rows in manifest shard order
    vectors.npy       (N, D) in the manifest dtype: the full vectors, memory-mapped for re-checks
    ids.npy           int64 (N,): the global id of each row
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from .exact import ExactScan
from .exactness import (
    EMPTY,
    FLOAT32_UNIT,
    gamma,
    inclusive_radius,
    merge,
    order_results,
    recheck_pairs,
    split_by_query,
)
from .manifest import IndexFormatError, manifest_hash, read_manifest, write_json_atomic
from .shield import SearchStats, Shield
from .store import RowLookup, load_shard, storage_dtype

META = "projection.json"
FULL = ("auto", "disk", "memory", "device")
FLOAT64_UNIT = 2.0**-53


def projection_dir(index_dir: str, dims: int) -> str:
    return os.path.join(index_dir, f"projection-{int(dims)}")


@dataclass(frozen=True)
class Projection:
    """An orthonormal basis (rows) fitted by PCA, the mean it is centered on, and its spectral norm."""

    basis: np.ndarray  # float32 (d, D)
    mean: np.ndarray  # float32 (D,)
    sigma: float  # largest singular value of the float32 basis, computed in float64, rounded up
    explained_variance: float  # share of the fitted sample's variance the d directions keep
    sample_size: int

    @property
    def dims(self) -> int:
        return self.basis.shape[0]


def fit_projection(sample: torch.Tensor, dims: int, seed: int = 0) -> Projection:
    """PCA of ``sample`` (S, D) to ``dims`` directions (randomised SVD), rows made orthonormal in float64.

    Exactness does not depend on how good the fit is (only ``sigma`` enters the bound); the fit
    decides how selective the filter is.
    """
    sample = sample.to(torch.float32)
    count, dim = sample.shape
    dims = int(dims)
    if not 1 <= dims <= dim:
        raise ValueError(f"projection dims must be in 1..{dim}, got {dims}")
    mean = sample.to(torch.float64).mean(0)
    centered = (sample.to(torch.float64) - mean).to(torch.float32)  # the fit needs no more precision
    total = float((centered.to(torch.float64) ** 2).sum())
    rank = min(dims, count)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        _, singular, v = torch.svd_lowrank(centered, q=min(rank + 8, count, dim), niter=2)
    finally:
        torch.random.set_rng_state(generator_state)
    directions = v[:, :rank].to(torch.float64)
    if rank < dims:  # fewer samples than dims: complete with random directions (any will do)
        extra = torch.randn(dim, dims - rank, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        directions = torch.cat([directions, extra.to(directions.device)], 1)
    q, _ = torch.linalg.qr(directions)
    basis = q.T.contiguous().to(torch.float32)
    sigma = spectral_norm_bound(basis)
    singular = singular.to(torch.float64)
    kept = float((singular[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return Projection(basis.cpu().numpy(), mean.to(torch.float32).cpu().numpy(), sigma, min(kept, 1.0), int(count))


def spectral_norm_bound(basis: torch.Tensor) -> float:
    """An upper bound on the largest singular value of ``basis`` (d, D), as stored (float32).

    sigma^2 is the largest eigenvalue of the Gram matrix B B^T, formed in float64 (each entry off
    by at most gamma_D(float64) times the product of two row norms, so the matrix by at most d
    times that in 2-norm) and solved by a symmetric eigensolver (backward stable: error of a few
    hundred float64 ulps of |G|); both are added before the square root.
    """
    b = basis.to(torch.float64)
    dims, dim = b.shape
    gram = b @ b.T
    top = float(torch.linalg.eigvalsh(gram)[-1])
    row_sq = float((b * b).sum(1).max())
    slack = dims * gamma(dim, FLOAT64_UNIT) * row_sq + 1024 * FLOAT64_UNIT * max(top, row_sq) * dims
    return math.sqrt(top + slack)


def projection_error_unit(projection: Projection) -> float:
    """Bound on |P(x - m) computed in float64 - exact| per unit of |x - m| (module doc)."""
    dims, dim = projection.basis.shape
    return gamma(dim + 1, FLOAT64_UNIT) * math.sqrt(dims) * projection.sigma


def project(vectors: torch.Tensor, basis64: torch.Tensor, mean64: torch.Tensor) -> torch.Tensor:
    """P (x - m) in float64 (rounded to float32 by the caller)."""
    return (vectors.to(torch.float64) - mean64) @ basis64.T


# -- writing the projection files --------------------------------------------------------------


def write_projection(index_dir: str, dims: int = 256, sample_size: int = 10000, seed: int = 0, device="cpu",
                     overwrite: bool = False) -> str:
    """Fit the projection on a sample of the corpus and write its files (module doc); returns the dir.

    Reads one shard at a time: host memory holds one shard plus the sample, whatever the index size.
    """
    manifest = read_manifest(index_dir)
    dtype = storage_dtype(manifest)
    dim = manifest.latent.dim
    dims = min(int(dims), dim)
    out = projection_dir(index_dir, dims)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists already (pass overwrite=True to refit it)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(manifest.count, size=min(int(sample_size), manifest.count), replace=False))
    sample, offset = [], 0
    for shard in manifest.shards:
        _, vectors = load_shard(index_dir, shard, dtype)
        local = chosen[(chosen >= offset) & (chosen < offset + len(vectors))] - offset
        sample.append(vectors[local].astype(np.float32))
        offset += len(vectors)
    projection = fit_projection(torch.from_numpy(np.concatenate(sample)).to(device), dims, seed)

    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    basis64 = torch.from_numpy(projection.basis).to(device, torch.float64)
    mean64 = torch.from_numpy(projection.mean).to(device, torch.float64)
    full = np.lib.format.open_memmap(os.path.join(tmp, "vectors.npy"), mode="w+", dtype=dtype, shape=(manifest.count, dim))
    projected = np.lib.format.open_memmap(os.path.join(tmp, "projected.npy"), mode="w+", dtype=np.float32,
                                          shape=(manifest.count, dims))
    ids = np.empty(manifest.count, np.int64)
    centered_max = 0.0
    row = 0
    step = max(1, (256 << 20) // (8 * dim))
    for shard in manifest.shards:
        shard_ids, vectors = load_shard(index_dir, shard, dtype)
        full[row : row + len(vectors)] = vectors
        ids[row : row + len(vectors)] = shard_ids
        for start in range(0, len(vectors), step):
            chunk = torch.from_numpy(np.ascontiguousarray(vectors[start : start + step])).to(device)
            centered_max = max(centered_max, float(torch.linalg.vector_norm(chunk.to(torch.float64) - mean64, dim=1).max()))
            projected[row + start : row + start + len(chunk)] = project(chunk, basis64, mean64).to(torch.float32).cpu().numpy()
        row += len(vectors)
    full.flush()
    projected.flush()
    projected_max = 0.0
    for start in range(0, manifest.count, 1 << 16):
        block = projected[start : start + (1 << 16)].astype(np.float64)
        projected_max = max(projected_max, float(np.sqrt((block * block).sum(1)).max()))
    del full, projected
    np.save(os.path.join(tmp, "basis.npy"), projection.basis)
    np.save(os.path.join(tmp, "mean.npy"), projection.mean)
    np.save(os.path.join(tmp, "ids.npy"), ids)
    meta = {
        "dims": dims, "dim": dim, "count": manifest.count, "dtype": manifest.dtype, "sigma": projection.sigma,
        "max_centered_norm": centered_max, "max_projected_norm": projected_max,
        "explained_variance": projection.explained_variance, "sample_size": projection.sample_size, "seed": seed,
        "manifest_sha256": manifest_hash(index_dir),
    }
    write_json_atomic(os.path.join(tmp, META), meta)
    if os.path.exists(out):
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process published the same projection first: keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(out, META)):
            raise
    return out


# -- where the full vectors live -----------------------------------------------------------------


class DeviceStore:
    """Full vectors as a tensor (host or GPU memory): gathers are indexing, a full scan is cached."""

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors
        self.count = len(vectors)
        self._scan: ExactScan | None = None

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.vectors[rows.to(self.vectors.device)]

    def full_scan(self, q: torch.Tensor, radii: np.ndarray, max_k: int | None):
        if self._scan is None:
            self._scan = ExactScan(self.vectors)
        return self._scan.range_search64(q.to(self.vectors.device), radii, max_k)


class MemmapStore:
    """Full vectors in a memory-mapped ``.npy`` (rows ``rows`` of it): read only what is re-checked."""

    def __init__(self, array: np.ndarray, rows: np.ndarray | None, device, max_bytes: int = 1 << 28):
        self.array = array
        self.rows = rows  # local row -> row of the file (None: identity)
        self.count = len(rows) if rows is not None else len(array)
        self.device = torch.device(device)
        self.max_bytes = max_bytes

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        local = rows.cpu().numpy()
        file_rows = local if self.rows is None else self.rows[local]
        order = np.argsort(file_rows, kind="stable")  # sequential reads
        block = np.empty((len(local), self.array.shape[1]), self.array.dtype)
        block[order] = self.array[file_rows[order]]
        return torch.from_numpy(block).to(self.device)

    def full_scan(self, q: torch.Tensor, radii: np.ndarray, max_k: int | None):
        step = max(1, self.max_bytes // (self.array.shape[1] * self.array.dtype.itemsize))
        parts = []
        for start in range(0, self.count, step):
            rows = torch.arange(start, min(start + step, self.count))
            if self.rows is None:  # contiguous rows of the file: one sequential read, no gather
                block = torch.from_numpy(np.array(self.array[start : start + step])).to(self.device)
            else:
                block = self.gather(rows)
            scan = ExactScan(block, ids=rows.numpy())
            parts.append(scan.range_search64(q.to(self.device), radii, max_k))
        return merge(parts, max_k)


# -- the filter + re-check kernel --------------------------------------------------------------


class ProjectedScan:
    """Range search and knn over a store of full vectors, filtered by their projections.

    Results carry *local rows* of the store as ids; ``ProjectedShield`` maps them to global ids.
    """

    def __init__(self, projection: Projection, projected: torch.Tensor, store, max_centered_norm: float,
                 max_projected_norm: float, stats: SearchStats | None = None, recheck_bytes: int = 1 << 28):
        self._setup(projection, projected.device, store, stats, recheck_bytes)
        self.filter = ExactScan(projected.to(torch.float32))
        self.count = len(projected)
        # The stored side's bound: float64 projection error plus one rounding to float32 (module doc).
        self._stored_error = FLOAT32_UNIT * (1 + 2 * FLOAT32_UNIT) * max_projected_norm + self._e64 * max_centered_norm

    def _setup(self, projection: Projection, device, store, stats: SearchStats | None, recheck_bytes: int) -> None:
        """What every filter over this projection shares (``indexing.ivf`` reuses it)."""
        self.projection = projection
        self.device = torch.device(device)
        self.basis64 = torch.from_numpy(projection.basis).to(self.device, torch.float64)
        self.mean64 = torch.from_numpy(projection.mean).to(self.device, torch.float64)
        self.store = store
        self.dims, self.dim = projection.basis.shape
        self.stats = stats if stats is not None else SearchStats()
        self.recheck_bytes = recheck_bytes
        # Float64 projection error per unit of |x - m| (module doc).
        self._e64 = projection_error_unit(projection)

    def filter_radii(self, q: torch.Tensor, radii: np.ndarray):
        """The projected queries (float32) and the filter radius t of each (module doc)."""
        p64, t = self.project_queries(q, radii)
        return p64.to(torch.float32), t

    def project_queries(self, q: torch.Tensor, radii: np.ndarray):
        """The projected queries in float64 and the filter radius t of each (it covers their float32 rounding)."""
        centered = q.to(torch.float64) - self.mean64
        p64 = centered @ self.basis64.T
        p_norm = torch.linalg.vector_norm(p64, dim=1).cpu().numpy()
        c_norm = torch.linalg.vector_norm(centered, dim=1).cpu().numpy()
        query_error = FLOAT32_UNIT * (1 + 2 * FLOAT32_UNIT) * p_norm + self._e64 * c_norm
        t = (self.projection.sigma * np.asarray(radii, np.float64) + query_error + self._stored_error) * (1 + 1e-12)
        return p64, t

    def recheck(self, q: torch.Tensor, rows: np.ndarray, radii: np.ndarray, max_k: int | None):
        """Exact search of every query against the union ``rows`` of the candidates, in bounded blocks."""
        step = max(1, self.recheck_bytes // (self.dim * 4))
        parts = []
        for start in range(0, len(rows), step):
            block = rows[start : start + step]
            scan = ExactScan(self.store.gather(torch.from_numpy(block)), ids=block)
            parts.append(scan.range_search64(q.to(scan.device), radii, max_k))
        return merge(parts, max_k) if parts else [EMPTY for _ in range(len(q))]

    def range_search64(self, q: torch.Tensor, radii: np.ndarray, max_k: int | None = None):
        p, t = self.filter_radii(q, radii)
        qi, rows = self.filter.candidates(p, t)
        union = torch.unique(rows)  # on the filter's device: it can be every row of the index
        if len(union) > self.count // 2:
            out = self.store.full_scan(q, radii, max_k)
        else:
            out = self.recheck(q, union.cpu().numpy(), radii, max_k)
        self.stats.add(len(q), len(qi), sum(len(i) for i, _ in out))
        return out

    def knn64(self, q: torch.Tensor, k: int, take: bool = True):
        """The k projected-nearest rows give U, an upper bound on the k-th distance; then a range
        search of radius just above U through the filter holds the exact k nearest (``take``:
        cut to k here, ties by row; else every row within U, for the caller to cut by id)."""
        k = min(int(k), self.count)
        p, _ = self.filter_radii(q, np.zeros(len(q)))
        seeds = self.filter.knn64(p, k)
        qi = torch.from_numpy(np.concatenate([np.full(len(ids), i) for i, (ids, _) in enumerate(seeds)]))
        rows = torch.from_numpy(np.concatenate([ids for ids, _ in seeds]))
        dist = recheck_pairs(q, qi.to(q.device), self.store.gather, rows).cpu().numpy()
        seeded = split_by_query(len(q), qi.numpy(), rows.numpy(), dist, None, k)
        radii = np.array([inclusive_radius(d[-1]) for _, d in seeded])
        return self.range_search64(q, radii, k if take else None)

    def vectors(self, rows: np.ndarray) -> torch.Tensor:
        return self.store.gather(torch.from_numpy(np.asarray(rows, np.int64))).to(torch.float32)


# -- the backend over an index directory -------------------------------------------------------


def load_projection(index_dir: str, dims: int, create: bool = True, device="cpu") -> tuple[str, dict]:
    path = projection_dir(index_dir, dims)
    if not os.path.isfile(os.path.join(path, META)):
        if not create:
            raise IndexFormatError(f"{index_dir} has no {dims}-dim projection: run `spellshield project-index {index_dir} --dims {dims}`")
        write_projection(index_dir, dims, device=device)
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if meta.get("manifest_sha256") != manifest_hash(index_dir):
        raise IndexFormatError(f"{path} was written for another version of the index: rewrite it (overwrite=True)")
    return path, meta


def read_projection(path: str, meta: dict) -> Projection:
    return Projection(np.load(os.path.join(path, "basis.npy")), np.load(os.path.join(path, "mean.npy")),
                      float(meta["sigma"]), float(meta["explained_variance"]), int(meta["sample_size"]))


def selected_rows(manifest, shards) -> np.ndarray:
    """Rows of the projection's files that belong to ``shards`` (the files follow the manifest's order)."""
    offsets = np.cumsum([0] + [s.count for s in manifest.shards])
    numbers = range(len(manifest.shards)) if shards is None else [int(s) for s in shards]
    return np.concatenate([np.arange(offsets[n], offsets[n + 1]) for n in numbers])


class ProjectedShield(Shield):
    """The ``projected`` backend over an index directory (module doc)."""

    backend = "projected"

    def __init__(self, index_dir: str, manifest, device="cpu", shards=None, dims: int = 256, full: str = "auto",
                 create: bool = True):
        super().__init__(index_dir, manifest, shards, device)
        if full not in FULL:
            raise ValueError(f"full must be one of {FULL}, got {full!r}")
        dims = min(int(dims), self.dim)
        path, meta = load_projection(index_dir, dims, create, device="cpu")
        rows = selected_rows(manifest, shards)
        all_ids = np.load(os.path.join(path, "ids.npy"), mmap_mode="r")
        self.ids = np.asarray(all_ids[rows], np.int64)
        self.lookup = RowLookup(self.ids)
        projected = np.asarray(np.load(os.path.join(path, "projected.npy"), mmap_mode="r")[rows], np.float32)
        vectors = np.load(os.path.join(path, "vectors.npy"), mmap_mode="r")
        if full == "auto":
            full = "device" if self.device.type == "cuda" else "disk"
        subset = None if shards is None else rows
        if full == "disk":
            store = MemmapStore(vectors, subset, self.device)
        else:
            array = np.array(vectors if subset is None else vectors[subset])  # a writable copy in memory
            store = DeviceStore(torch.from_numpy(array).to(self.device if full == "device" else "cpu"))
        projection = read_projection(path, meta)
        self.full = full
        self.scan = ProjectedScan(projection, torch.from_numpy(projected).to(self.device), store,
                                  float(meta["max_centered_norm"]), float(meta["max_projected_norm"]), self.stats)

    def _global(self, results, k):
        """Local rows -> global ids, then nearest first with ties by id, at most k."""
        return [order_results(self.ids[rows], dist, None, k) for rows, dist in results]

    def range_search64(self, queries, radii, max_k):
        return self._global(self.scan.range_search64(queries, radii, None), max_k)

    def knn64(self, queries, k):
        return self._global(self.scan.knn64(queries, k, take=False), k)

    def vectors(self, ids) -> torch.Tensor:
        return self.scan.vectors(self.lookup.rows(ids)).to(self.device)
