"""``ivf``: an inverted file over the ``projected`` space, trained once and persisted, whose per-list
bounds prove which lists can hold a hit; only those are scanned, every candidate re-checked exactly.

Why no hit is lost. Everything happens in the projected space of ``indexing.projected`` (P the
stored basis, sigma its spectral-norm bound, m the mean). Each stored vector z has a code c_z
(float16 or float32, the float64 projection rounded once) with |c_z - P(z - m)| <= E, where E is
the largest |c_z - p64_z| measured at build time (float64, rounded up) plus the float64
projection error bound (``projection_error_unit`` times |z - m|). The query's projection p_q is
computed in float64, off by at most e_q. A hit (|q - z| < r) therefore has

    |p_q - c_z| < t = sigma r + e_q + E                                                       (1)

exactly as the ``projected`` filter. k-means centroids mu_j (float32, FAISS, on a sample of the
codes) split the codes into lists; z sits in list j when mu_j was its nearest centroid in a
float32 computation, so for every centroid k, f_jk(c_z) = |c_z - mu_j|^2 - |c_z - mu_k|^2 <= eps,
eps twice the float32 bound of ``exactness.float32_margin``. A list j can be skipped for a query
when either proof holds:

    covering radius:  |p_q - mu_j| - R_j >= t,   R_j = max_{z in j} |c_z - mu_j| (float64, rounded up)
    Voronoi:          (f_jk(p_q) - eps) / (2 |mu_j - mu_k|) >= t   for one of the query's nearest centroids k

The second holds because f_jk is affine with gradient 2 (mu_k - mu_j): f_jk(p_q) - f_jk(c_z) <=
2 |mu_j - mu_k| |p_q - c_z|. Both sides are computed in float64 from the stored float32 values
and given a float64 rounding allowance. In the lists that remain, the codes within t of p_q
(float32 GEMM, widened by ``exactness.float32_margin``) are the candidates, and each is decided
against the full vectors (memory-mapped) in float64, as the ``projected`` backend does. The codes
are compared in two passes: on their first ``head_dims`` coordinates (the PCA directions of
largest variance), then on all d for the rows the first pass keeps; a distance over some of the
coordinates is at most the distance over all, so a code within t passes both. When the
candidates would cover half the rows, the re-check is the plain exact scan instead.

knn: the k rows of the query's nearest non-empty lists give U, an upper bound on the k-th
distance (re-checked in float64); a range search of radius just above U then holds the k nearest.

Files, in ``INDEX_DIR/projection-<d>/ivf-<lists>/`` (``write_ivf`` or ``spellshield project-index
--lists K``), written to a temporary directory and renamed into place; opening never trains:

    ivf.json        lists, dims, count, eps, stored_error, code dtype, build stats, sha256 of every
                    file below and of the projection's basis.npy, mean.npy, ids.npy, projection.json
    centroids.npy   float32 (lists, d)                offsets.npy  int64 (lists + 1,)
    rows.npy        int64 (N,): rows of the projection's files, list by list
    codes.npy       (N, d) float16 or float32 codes in the order of rows.npy
    radii.npy       float64 (lists,): covering radius R_j of each list (-inf when empty)

Every sha256 is checked when the structure is opened: a changed file is refused
(``IndexFormatError``), never searched. ivf.json itself is the anchor (it also records the
manifest's sha256, so a structure built for another version of the index is refused); a
consistent rewrite of ivf.json together with a file is not detected until the manifest lists the
structure. The projection's vectors.npy is, as for ``projected``, trusted as written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import torch

from .exactness import (
    full_precision_matmul,
    round_up_float32,
    float32_margin,
    gamma,
    inclusive_radius,
    order_results,
    recheck_pairs,
    split_by_query,
)
from .manifest import IndexFormatError, file_sha256, manifest_hash, write_json_atomic
from .projected import (
    FLOAT64_UNIT,
    DeviceStore,
    MemmapStore,
    Projection,
    ProjectedScan,
    load_projection,
    project,
    projection_dir,
    projection_error_unit,
    read_projection,
    selected_rows,
)
from .shield import SearchStats, Shield
from .store import RowLookup

META = "ivf.json"
FILES = ("centroids.npy", "offsets.npy", "rows.npy", "codes.npy", "radii.npy")
PROJECTION_FILES = ("basis.npy", "mean.npy", "ids.npy", "projection.json")
CODE_DTYPES = ("float16", "float32")
VORONOI_NEIGHBOURS = 8  # nearest centroids each query tries as the k of the Voronoi bound
SLACK64 = 1e-9  # relative allowance for float64 rounding in the list bounds (errors are ~1e-13)


_BLAS = []


def one_blas_thread():
    """A context in which numpy's BLAS runs one thread (threadpoolctl; the controller made once)."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def ivf_dir(index_dir: str, dims: int, lists: int) -> str:
    return os.path.join(projection_dir(index_dir, dims), f"ivf-{int(lists)}")


def default_lists(count: int) -> int:
    """About 2 sqrt(N) lists (a power of two), at least 1 and at most N / 8."""
    target = 2.0 * math.sqrt(max(count, 1))
    return int(max(1, min(2 ** round(math.log2(target)), max(count // 8, 1))))


# -- building ------------------------------------------------------------------------------------


def train_centroids(codes: np.ndarray, lists: int, seed: int = 0, niter: int = 10) -> np.ndarray:
    """k-means (FAISS) on a sample of codes (S, d) float32 -> float32 (lists, d)."""
    import faiss

    kmeans = faiss.Kmeans(codes.shape[1], int(lists), niter=niter, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, len(codes) // max(lists, 1) + 1))
    kmeans.train(np.ascontiguousarray(codes, np.float32))
    return np.ascontiguousarray(kmeans.centroids, np.float32)


def assign(codes32: torch.Tensor, centroids: torch.Tensor, centroid_sq: torch.Tensor, block_rows: int = 4096) -> torch.Tensor:
    """Nearest centroid of each code by the float32 expanded distance (the |x|^2 term is common),
    ``block_rows`` codes at a time: a (block x lists) float32 matrix instead of (N x lists)."""
    out = torch.empty(len(codes32), dtype=torch.long)
    for start in range(0, len(codes32), block_rows):
        d2 = torch.addmm(centroid_sq[None, :], codes32[start:start + block_rows], centroids.T, alpha=-2.0)
        out[start:start + len(d2)] = torch.argmin(d2, dim=1)
    return out


def build_ivf(out: str, vectors: np.ndarray, projection: Projection, lists: int | None = None, *,
              code_dtype: str = "float16", sample_size: int | None = None, seed: int = 0, niter: int = 10,
              chunk_rows: int = 1 << 15, bucket_bytes: int = 256 << 20, extra_meta: dict | None = None,
              log=None) -> dict:
    """Write the structure (module doc) for ``vectors`` (N, D), any array (a memmap: read in chunks).

    Memory: one chunk of vectors in float64, the k-means sample, 12 bytes per vector (list and row
    numbers) and one bucket of codes (~``bucket_bytes``) when they are put in list order. Returns the metadata written.
    """
    if code_dtype not in CODE_DTYPES:
        raise ValueError(f"code dtype must be one of {CODE_DTYPES}, got {code_dtype!r}")
    count, dim = vectors.shape
    dims = projection.dims
    if projection.basis.shape[1] != dim:
        raise ValueError(f"projection is for {projection.basis.shape[1]}-d vectors, these are {dim}-d")
    lists = default_lists(count) if lists is None else int(lists)
    if not 1 <= lists <= count:
        raise ValueError(f"lists must be in 1..{count} (the number of vectors), got {lists}")
    started = time.perf_counter()
    say = log or (lambda _msg: None)
    basis64 = torch.from_numpy(projection.basis).to(torch.float64)
    mean64 = torch.from_numpy(projection.mean).to(torch.float64)
    ctype = np.dtype(code_dtype)

    # 1. k-means on the projections of a sample (sorted rows: sequential reads of a memmap).
    sample_size = min(count, max(32 * lists, 20000) if sample_size is None else int(sample_size))
    if sample_size < lists:
        raise ValueError(f"a sample of {sample_size} cannot train {lists} lists")
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=sample_size, replace=False))
    tdtype = getattr(torch, code_dtype)
    sample = torch.cat([  # the codes' values (rounded to the code dtype), as float32
        project(torch.from_numpy(np.array(vectors[chosen[i:i + chunk_rows]])), basis64, mean64).to(tdtype).to(torch.float32)
        for i in range(0, len(chosen), chunk_rows)]).numpy()
    centroids = train_centroids(sample, lists, seed, niter)
    del sample
    trained = time.perf_counter()
    say(f"k-means: {lists} lists on {sample_size} codes in {trained - started:.1f} s")

    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # The codes go to ``groups`` files by list range (sequential appends, ~bucket_bytes each), which are
    # then sorted one at a time into codes.npy: an external bucket sort, bounded memory, no random
    # writes into a file the size of the codes.
    groups = int(min(lists, max(1, math.ceil(count * dims * ctype.itemsize / bucket_bytes))))
    group_of_list = (np.arange(lists) * groups) // lists
    bucket_files = [open(os.path.join(tmp, f"bucket-{g}.bin"), "wb") for g in range(groups)]
    owner = np.empty(count, np.int32)
    cent32 = torch.from_numpy(centroids)
    cent64 = cent32.to(torch.float64)
    cent_sq = (cent64 * cent64).sum(1)
    radii = np.full(lists, -np.inf)
    max_code_error = max_centered = max_code_sq = 0.0
    # 2. One streaming pass: project (float64), round to codes, measure the rounding, assign, radii.
    reported = trained
    for start in range(0, count, chunk_rows):
        if time.perf_counter() - reported > 60:
            reported = time.perf_counter()
            say(f"assigned {start} of {count} vectors ({start / (reported - trained):.0f}/s)")
        chunk = torch.from_numpy(np.array(vectors[start:start + chunk_rows]))
        centered = chunk.to(torch.float64) - mean64
        del chunk
        max_centered = max(max_centered, float(torch.linalg.vector_norm(centered, dim=1).max()))
        p64 = centered @ basis64.T
        del centered
        codes = p64.to(tdtype)  # torch's conversions: numpy's float16 ones are slow
        c64 = codes.to(torch.float64)
        max_code_error = max(max_code_error, float(torch.linalg.vector_norm(c64 - p64, dim=1).max()))
        max_code_sq = max(max_code_sq, float((c64 * c64).sum(1).max()))
        with full_precision_matmul():
            near = assign(c64.to(torch.float32), cent32, cent_sq.to(torch.float32))
        dist = torch.linalg.vector_norm(c64 - cent64[near], dim=1).numpy()
        near = near.numpy()
        np.maximum.at(radii, near, dist)
        owner[start:start + len(near)] = near
        code_rows, group = codes.numpy(), group_of_list[near]
        for g in np.unique(group):
            bucket_files[g].write(np.ascontiguousarray(code_rows[group == g]).tobytes())
    for f in bucket_files:
        f.close()
    say(f"assigned {count} vectors in {time.perf_counter() - trained:.1f} s")

    # 3. Lists in order: rows sorted by list (stable: by row within a list), each bucket sorted in memory.
    order = np.argsort(owner, kind="stable")
    offsets = np.zeros(lists + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=lists), out=offsets[1:])
    header = np.lib.format.open_memmap(os.path.join(tmp, "codes.npy"), mode="w+", dtype=ctype, shape=(count, dims)).offset
    with open(os.path.join(tmp, "codes.npy"), "r+b") as listed:
        listed.seek(header)
        for g in range(groups):
            bucket = os.path.join(tmp, f"bucket-{g}.bin")
            block = np.fromfile(bucket, dtype=ctype).reshape(-1, dims)
            # Rows of the group's lists in row order (the order they were appended), sorted stably by list.
            listed.write(np.ascontiguousarray(block[np.argsort(owner[group_of_list[owner] == g], kind="stable")]).tobytes())
            del block
            os.remove(bucket)
    del owner
    np.save(os.path.join(tmp, "rows.npy"), order.astype(np.int64))
    np.save(os.path.join(tmp, "offsets.npy"), offsets)
    np.save(os.path.join(tmp, "centroids.npy"), centroids)
    # Rounded up: the radii come from float64 arithmetic on exact float16/float32 values.
    np.save(os.path.join(tmp, "radii.npy"), np.where(np.isfinite(radii), radii * (1 + SLACK64), radii))

    # eps: an assignment made in float32 is off by at most twice the float32 distance bound.
    eps = 2.0 * float(float32_margin(dims, np.array([max_code_sq]), float(cent_sq.max()))[0])
    stored_error = (max_code_error * (1 + SLACK64) + projection_error_unit(projection) * max_centered) * (1 + SLACK64)
    sizes = np.diff(offsets)
    meta = {
        "lists": lists, "dims": dims, "dim": dim, "count": count, "code_dtype": code_dtype, "eps": eps,
        "stored_error": stored_error, "max_code_rounding": max_code_error, "max_centered_norm": max_centered,
        "sample_size": sample_size, "seed": seed, "niter": niter,
        "list_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                       "empty": int((sizes == 0).sum())},
        "build_seconds": time.perf_counter() - started,
        "sha256": {name: file_sha256(os.path.join(tmp, name)) for name in FILES},
    }
    meta.update(extra_meta or {})
    write_json_atomic(os.path.join(tmp, META), meta)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    say(f"ivf written to {out} in {meta['build_seconds']:.1f} s")
    return meta


def write_ivf(index_dir: str, dims: int = 256, lists: int | None = None, overwrite: bool = False, **options) -> str:
    """Build the structure over the index's ``projection-<dims>`` (which must exist); returns its dir."""
    path, pmeta = load_projection(index_dir, dims, create=False)
    lists = default_lists(int(pmeta["count"])) if lists is None else int(lists)
    out = ivf_dir(index_dir, pmeta["dims"], lists)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists already (pass overwrite=True to rebuild it)")
    vectors = np.load(os.path.join(path, "vectors.npy"), mmap_mode="r")
    anchors = {"manifest_sha256": manifest_hash(index_dir),
               "projection_sha256": {name: file_sha256(os.path.join(path, name)) for name in PROJECTION_FILES}}
    build_ivf(out, vectors, read_projection(path, pmeta), lists, extra_meta=anchors, **options)
    return out


# -- opening -------------------------------------------------------------------------------------


def read_ivf(path: str, projection_path: str | None = None) -> dict:
    """The metadata of a structure, after checking the sha256 of every file it names (fail closed)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise IndexFormatError(f"{path} holds no inverted file ({META} missing)")
    with open(meta_path) as f:
        meta = json.load(f)
    checks = [(os.path.join(path, n), h) for n, h in meta["sha256"].items()]
    if projection_path is not None:
        checks += [(os.path.join(projection_path, n), h) for n, h in meta.get("projection_sha256", {}).items()]
    for file, expected in checks:
        if not os.path.isfile(file):
            raise IndexFormatError(f"{file} is missing: the inverted file cannot be searched")
        if file_sha256(file) != expected:
            raise IndexFormatError(f"{file} does not match the sha256 recorded in {meta_path}: refusing to search it")
    return meta


# The codes of the probed lists are upcast to float32 and multiplied one block at a time. On the
# CPU a block of ~4 MB stays in cache from the upcast to the GEMM and reuses the allocator's
# memory, where a 64 MB block is a fresh allocation (page faults) written to and read back from
# DRAM: at 10^6 x 256 float16 codes (benchmarks/ivf_profile.py --chunk-rows, RESULTS.md) 4,096
# rows per block cut the batch from 693 to 299 ms at r and 334 to 136 ms at r/8, the same
# candidates. On a GPU large blocks keep the kernel launches few.
CPU_BLOCK_BYTES, DEVICE_BLOCK_BYTES = 4 << 20, 64 << 20


def block_rows(dims: int, device) -> int:
    """Rows of float32 codes per block of ``IvfScan.candidates`` on ``device``."""
    budget = CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else DEVICE_BLOCK_BYTES
    return max(1024, budget // (4 * dims))


# The codes are compared with the queries in two passes: first on their leading ``head_dims``
# coordinates (the PCA directions of largest variance), then, for the rows some query keeps, on all
# d. A squared distance over some of the coordinates is at most the one over all of them, so every
# code within t of p_q in (1) is also within t on the head: the head pass loses no candidate, and
# the full pass decides as before. On latents like TAEF2's the first 64 of 256 coordinates already
# put 95% of the rows beyond t at the suggested radius r and all but a handful at r/2 to r/8 (10^6
# rows: 47,215 and 9 of the batch's 1.0 M, benchmarks/results/ivf-profile-1e6-heads.json), so the
# scan reads and multiplies a quarter of each code: 186/139/120/48 ms per batch from r to r/8
# there, against 309/330/226/138 ms in one pass (32 coordinates: 500 ms at r, 662,183 survivors).
HEAD_DIMS = 64


def head_dims(dims: int) -> int:
    """Coordinates of the head pass of ``IvfScan.candidates``: ``HEAD_DIMS`` when it is at most
    half of ``dims``, else all of them (one pass: a head that large saves too little)."""
    return HEAD_DIMS if 2 * HEAD_DIMS <= dims else dims


def rows_any(mask: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: the rows of a (rows, B) bool mask that hold a True. When B is a multiple of 8
    and the mask C-contiguous, its bytes are read as B / 8 int64 words per row (a bool is one byte,
    0 or 1): at B = 16 and 16,384 rows 0.05 ms against 0.19-0.21 for ``any(1)``, whose reduction
    over a short inner dimension is slow on the CPU (benchmarks/results/scan-kernels.json)."""
    width = mask.shape[1]
    if width % 8 == 0 and width > 0 and mask.is_contiguous():
        words = mask.view(torch.int64)
        return words[:, 0] != 0 if width == 8 else words.any(1)
    return mask.any(1)


class SplitCodes:
    """Codes (N, d) held in RAM as two C-contiguous arrays: the first ``h`` coordinates of every
    row, and the rest. Indexed like the (N, d) array for leading columns (``codes[rows, :k]``).
    The head pass of ``IvfScan.candidates`` then copies a contiguous block of a quarter of the
    bytes (d = 256, h = 64); a strided slice of the full rows read as many cache lines and, in
    torch's float16 -> float32 copy, cost 8x more per row even from cache (RESULTS.md, "Scale")."""

    def __init__(self, head: np.ndarray, tail: np.ndarray):
        if len(head) != len(tail) or head.dtype != tail.dtype:
            raise ValueError("the head and tail of split codes must have the same rows and dtype")
        self.head, self.tail = head, tail
        self.shape = (len(head), head.shape[1] + tail.shape[1])
        self.dtype = head.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if (not isinstance(cols, slice) or cols.start not in (None, 0) or cols.step not in (None, 1)
                or (cols.stop is not None and cols.stop < 0)):
            raise IndexError("split codes are indexed by rows and leading columns only")
        k, h = min(self.shape[1], self.shape[1] if cols.stop is None else cols.stop), self.head.shape[1]
        if k <= h:
            return self.head[rows, :k]
        return np.concatenate([self.head[rows], self.tail[rows, :k - h]], axis=1)


class NpyRows:
    """The rows of a 2-D .npy file read with ``pread`` instead of a memory map: the process then
    holds the rows it asked for, never the pages of a file larger than RAM it has touched (the
    codes, ``read_codes``; the vectors ``build_ivf`` streams in benchmarks/scale.py). Indexed by a
    slice of step 1 or an array of rows; a context manager that closes its file."""

    def __init__(self, path: str):
        with open(path, "rb") as f:  # the header only (a memory map would refuse a short file unnamed)
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise IndexFormatError(f"{path} does not hold rows of vectors (shape {shape}, dtype {dtype})")
        self.path, self.shape, self.dtype = path, shape, dtype
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "NpyRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, rows: int) -> np.ndarray:
        data = os.pread(self.fd, rows * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != rows * self.row_bytes:
            raise IndexFormatError(f"{self.path} is shorter than its header says ({self.shape[0]} rows of {self.shape[1]})")
        return np.frombuffer(data, self.dtype).reshape(rows, self.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("rows of a .npy are read by slices of step 1 or arrays of rows")
            return self._read(start, max(stop - start, 0))
        rows = np.asarray(key)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for i, row in enumerate(rows.tolist()):
            out[i] = self._read(row, 1)[0]
        return out


def read_codes(path: str, head: int, keep: np.ndarray | None = None, block_bytes: int = 64 << 20):
    """The (N, d) codes in the .npy at ``path`` (the rows where the bool ``keep`` holds, if given),
    read into RAM: ``SplitCodes`` at column ``head`` when head < d, else one array. Read block by
    block (``NpyRows``), not memory-mapped: the process then holds the arrays it keeps and one
    block, never the file's pages as well."""
    with NpyRows(path) as file:
        (count, dims), dtype = file.shape, file.dtype
        if keep is not None and len(keep) != count:
            raise ValueError(f"{path} holds {count} rows, the selection {len(keep)}")
        total = count if keep is None else int(np.count_nonzero(keep))
        head = min(int(head), dims)
        parts = [np.empty((total, head), dtype)] + ([np.empty((total, dims - head), dtype)] if head < dims else [])
        step, filled = max(1, block_bytes // file.row_bytes), 0
        for start in range(0, count, step):
            block = file[start:start + step]
            if keep is not None:
                block = block[keep[start:start + len(block)]]
            parts[0][filled:filled + len(block)] = block[:, :head]
            if len(parts) == 2:
                parts[1][filled:filled + len(block)] = block[:, head:]
            filled += len(block)
    return SplitCodes(*parts) if len(parts) == 2 else parts[0]


class IvfScan(ProjectedScan):
    """Range search and knn over a store of full vectors through the inverted file (module doc).

    ``codes`` (N, d) and ``offsets`` describe the lists of the rows this scan serves; ``rows``
    (N,) are their rows in ``store``. Results carry store rows as ids.
    """

    def __init__(self, projection: Projection, centroids: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                 codes: np.ndarray, radii: np.ndarray, eps: float, stored_error: float, store,
                 stats: SearchStats | None = None, recheck_bytes: int = 1 << 28, device="cpu"):
        self._setup(projection, device, store, stats, recheck_bytes)
        self.count = store.count
        self.centroids64 = np.asarray(centroids, np.float32).astype(np.float64)
        self.centroid_sq = np.einsum("ij,ij->i", self.centroids64, self.centroids64)
        self.offsets = np.asarray(offsets, np.int64)
        self.sizes = np.diff(self.offsets)
        self.rows = np.asarray(rows, np.int64)
        self.codes = codes
        self.radii = np.asarray(radii, np.float64)
        self.eps = float(eps)
        self._stored_error = float(stored_error)
        self.lists = len(self.sizes)
        self._nonempty = self.sizes > 0
        self.chunk_rows = block_rows(self.dims, self.device)
        # the head pass's coordinates (``head_dims``); may be changed (benchmarks, tests): its norms follow
        self.head_dims = codes.head.shape[1] if isinstance(codes, SplitCodes) else head_dims(self.dims)
        self.code_sq, head_sq = self._norms(self.dims, self.head_dims)
        self._head_sq = {self.dims: self.code_sq, self.head_dims: head_sq}

    def _norms(self, *heads: int) -> list[torch.Tensor]:
        """Squared norms of the codes' first k coordinates for each k in ``heads``, in one pass:
        computed in float64, stored in float32 (one rounding)."""
        out = [np.empty(len(self.rows), np.float32) for _ in heads]
        for start in range(0, len(self.rows), self.chunk_rows):
            block = torch.from_numpy(np.asarray(self.codes[start:start + self.chunk_rows, :max(heads)])).to(torch.float64) ** 2
            for k, sq in zip(heads, out):
                sq[start:start + len(block)] = block[:, :k].sum(1).numpy()
        return [torch.from_numpy(sq).to(self.device) for sq in out]

    def _head_norms(self) -> torch.Tensor:
        k = int(self.head_dims)
        if not 1 <= k <= self.dims:
            raise ValueError(f"head_dims must be in 1..{self.dims}, got {k}")
        if k not in self._head_sq:
            self._head_sq[k] = self._norms(k)[0]
        return self._head_sq[k]

    # -- which lists can hold a hit ------------------------------------------------------------

    # Small (batch x lists) float64 arithmetic runs in numpy with one BLAS thread: torch's thread
    # pool, and OpenBLAS's own threads, cost more than the work on a loaded machine (measured at
    # load 25 on 2 cores: probe 0.01-0.02 s with one OpenBLAS thread, 0.18-0.33 s with two).

    def _centroid_geometry(self, p64: np.ndarray):
        """float64 squared distances (B, lists) from projected queries to centroids, and their error bound."""
        qsq = np.einsum("ij,ij->i", p64, p64)
        d2 = np.maximum(qsq[:, None] + self.centroid_sq[None, :] - 2.0 * (p64 @ self.centroids64.T), 0.0)
        # The expanded float64 formula's own bound (``float32_margin``'s argument with float64's unit).
        err = 4.0 * gamma(self.dims + 3, FLOAT64_UNIT) * (qsq[:, None] + self.centroid_sq[None, :])
        return d2, err

    def probe(self, p64: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(B, lists) bool: the lists each query must scan (neither bound excludes them)."""
        with one_blas_thread():
            return self._probe(p64, t)

    def _probe(self, p64: np.ndarray, t: np.ndarray) -> np.ndarray:
        d2, err = self._centroid_geometry(p64)
        t64 = np.asarray(t, np.float64)[:, None] * (1 + SLACK64)
        # Covering radius: |p - mu_j| - R_j < t; |p - mu_j| >= sqrt(max(d2 - err, 0)).
        low = np.sqrt(np.maximum(d2 - err, 0.0))
        keep = (low - self.radii[None, :] * (1 + SLACK64) < t64) & self._nonempty[None, :]
        # Voronoi against each query's nearest centroids k: (f_jk - eps) / (2 |mu_j - mu_k|) < t,
        # only for the lists the covering radius keeps for some query, and each centroid k once:
        # one 2-D product (13 ms at 8,192 lists, all kept) where a (B, n, lists) batched product
        # took 39 (benchmarks/results/scan-kernels.json).
        count = min(VORONOI_NEIGHBOURS, int(self._nonempty.sum()))
        cols = np.flatnonzero(keep.any(0))
        if len(cols) == 0:
            return keep
        ranked = np.where(self._nonempty[None, :], d2, np.inf)
        near = np.argpartition(ranked, count - 1, axis=1)[:, :count]  # (B, n)
        centres, which = np.unique(near, return_inverse=True)
        rows = np.arange(len(d2))[:, None]
        d2c, errc = d2[:, cols], err[:, cols]
        f = d2c[:, None, :] - (d2[rows, near] + err[rows, near])[:, :, None] - errc[:, None, :] - self.eps
        # |mu_j - mu_k| overestimated (a smaller bound is the safe side when f > 0).
        ck_sq, cj_sq = self.centroid_sq[centres][:, None], self.centroid_sq[cols][None, :]
        others = self.centroids64 if len(cols) == self.lists else self.centroids64[cols]
        gap2 = ck_sq + cj_sq - 2.0 * (self.centroids64[centres] @ others.T)
        gap2_err = 4.0 * gamma(self.dims + 3, FLOAT64_UNIT) * (ck_sq + cj_sq)
        gap = np.sqrt(np.maximum(gap2, 0.0) + gap2_err) * (1 + SLACK64)  # (centres, cols)
        keep[:, cols] &= ~(f / (2.0 * gap[which.reshape(near.shape)]) >= t64[:, :, None]).any(1)
        return keep

    def _positions(self, lists: np.ndarray) -> np.ndarray:
        """Positions (in list order) of every row of ``lists``."""
        starts, sizes = self.offsets[lists], self.sizes[lists]
        total = int(sizes.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        base = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        return base + np.arange(total)

    def _blocks(self, lists: np.ndarray, step: int):
        """The rows of ``lists`` (sorted) in list order, ``step`` at a time: (positions, the list of
        each) per block, made block by block: at the suggested radius the union is all N rows, and
        whole (N,) position and owner arrays cost hundreds of MB at 10^7 rows."""
        sizes = self.sizes[lists]
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if len(ends) else 0
        for start in range(0, total, step):
            stop = min(start + step, total)
            first = int(np.searchsorted(ends, start, side="right"))
            last = int(np.searchsorted(ends, stop - 1, side="right")) + 1
            skip = start - int(ends[first] - sizes[first])  # rows of lists[first] in earlier blocks
            part = lists[first:last]
            yield (self._positions(part)[skip:skip + stop - start],
                   np.repeat(part, sizes[first:last])[skip:skip + stop - start])

    def candidates(self, q: torch.Tensor, radii: np.ndarray):
        """(query index, store row) pairs that may be hits, and the number of (query, list) pairs probed.

        The codes of the probed lists are compared with the float32 projected queries by float32
        GEMMs, widened by ``float32_margin`` (code norms computed in float64, stored in float32),
        block by block: first on their ``head_dims`` leading coordinates, then on all d for the
        rows some query keeps (``head_dims``' comment); a pair counts only when its list is probed
        for that query and both passes keep it.
        """
        p64, t = self.project_queries(q, radii)
        p32 = p64.to(torch.float32)
        keep_host = self.probe(p64.cpu().numpy(), t)
        probed = int(keep_host.sum())
        lists = np.flatnonzero(keep_host.any(0))
        keep = torch.from_numpy(np.ascontiguousarray(keep_host.T)).to(self.device)  # (lists, B)
        t2 = np.asarray(t, np.float64) ** 2
        k = int(self.head_dims)
        full = self._pass(p32, self.dims, self.code_sq, t2)
        head = full if k == self.dims else self._pass(p32, k, self._head_norms(), t2)
        step = self.chunk_rows if head is full else block_rows(k, self.device)
        pairs_q, pairs_p = [], []
        with full_precision_matmul():
            for pos, owner in self._blocks(lists, step):
                mask = head(pos)  # (rows, B)
                # the rows some query keeps; then each pair only if that query probes the row's list
                alive = torch.nonzero(rows_any(mask), as_tuple=True)[0]
                if len(alive) == 0:
                    continue
                alive_host = alive.cpu().numpy()
                pos = pos[alive_host]
                mask = mask[alive] & keep[torch.from_numpy(owner[alive_host]).to(self.device)]
                if head is not full:  # on all d
                    mask &= full(pos)
                local, qi = torch.nonzero(mask, as_tuple=True)
                pairs_q.append(qi.cpu())
                pairs_p.append(pos[local.cpu().numpy()])
        if not pairs_q:
            return torch.zeros(0, dtype=torch.long), np.zeros(0, np.int64), probed
        return torch.cat(pairs_q), self.rows[np.concatenate(pairs_p)], probed

    def _pass(self, p32: torch.Tensor, k: int, code_sq: torch.Tensor, t2: np.ndarray):
        """The test |p_q - c_z|^2 <= t^2 on the first k coordinates, as a function of sorted code
        positions: (len(pos), B) bool, the float32 distances widened by their rounding bound.

        One GEMM per block gives |c|^2 - 2 c.p, with the codes as the left factor: MKL makes an
        (rows, B) result faster than a (B, rows) one at B = 16 (16,384 rows: 0.34 against 0.46 ms
        on 64 coordinates, 2.1 against 3.5 ms on 256; benchmarks/results/scan-kernels.json).
        |p|^2 moves to the threshold's side in float64: one float32 rounding fewer than
        ``float32_margin`` allows for, so its bound still holds.
        The upcast codes and the distances go to buffers allocated once per pass, grown when a
        block is larger: with a fresh multi-MB tensor per block the C allocator's heap grew by
        6-8 GB within one batch at 10^7 rows (RESULTS.md, "Scale", 10^7).
        """
        p = p32[:, :k].contiguous()
        qsq = (p.to(torch.float64) ** 2).sum(1).cpu().numpy()
        buffers = {}

        def buffer(name: str, *shape: int) -> torch.Tensor:
            """A contiguous (shape) float32 tensor in a buffer kept between blocks."""
            size = math.prod(shape)
            held = buffers.get(name)
            if held is None or len(held) < size:
                held = buffers[name] = torch.empty(size, dtype=torch.float32, device=self.device)
            return held[:size].view(shape)

        def within(pos: np.ndarray) -> torch.Tensor:
            contiguous = pos[-1] - pos[0] + 1 == len(pos)
            zsq = code_sq[pos[0]:pos[-1] + 1] if contiguous else code_sq[torch.from_numpy(pos).to(self.device)]
            # |c|^2 - 2 c.p <= t^2 + margin - |p|^2, the right side in float64 and rounded up once
            thr = round_up_float32(t2 + float32_margin(k, qsq, float(zsq.max())) - qsq)
            codes = buffer("codes", len(pos), k)
            codes.copy_(self._codes_at(pos, k))  # float16 -> float32 is exact
            d2 = buffer("d2", len(pos), len(p))
            torch.addmm(zsq[:, None], codes, p.T, alpha=-2.0, out=d2)  # x -2 is exact
            return d2 <= torch.from_numpy(thr).to(self.device)[None, :]

        return within

    def _project64(self, q: torch.Tensor) -> np.ndarray:
        return ((q.to(torch.float64) - self.mean64) @ self.basis64.T).cpu().numpy()

    def _codes_at(self, pos: np.ndarray, k: int) -> torch.Tensor:
        """The first ``k`` coordinates of the codes at sorted positions, as stored, on the host
        (the caller upcasts into its buffer): a slice (no gather) when they are contiguous, as when
        most lists are probed."""
        if pos[-1] - pos[0] + 1 == len(pos):
            return torch.from_numpy(np.asarray(self.codes[pos[0]:pos[-1] + 1, :k]))
        return torch.from_numpy(np.asarray(self.codes[pos, :k]))

    # -- searches ------------------------------------------------------------------------------

    def range_search64(self, q: torch.Tensor, radii: np.ndarray, max_k: int | None = None):
        qi, rows, probed = self.candidates(q, radii)
        union = np.unique(rows)
        if len(union) > self.count // 2:
            out = self.store.full_scan(q, radii, max_k)
        else:
            out = self.recheck(q, union, radii, max_k)
        self.stats.add(len(q), len(qi), sum(len(i) for i, _ in out), probed)
        return out

    def knn64(self, q: torch.Tensor, k: int, take: bool = True):
        k = min(int(k), self.count)
        with one_blas_thread():
            d2, _ = self._centroid_geometry(self._project64(q))
        order = np.argsort(np.where(self._nonempty[None, :], d2, np.inf), axis=1)
        qi, seed_rows = [], []
        for i in range(len(q)):
            lists = order[i, : np.searchsorted(np.cumsum(self.sizes[order[i]]), k) + 1]
            rows = self.rows[self._positions(lists)]
            qi.append(np.full(len(rows), i))
            seed_rows.append(rows)
        qi, seed_rows = np.concatenate(qi), np.concatenate(seed_rows)
        dist = recheck_pairs(q, torch.from_numpy(qi).to(q.device), self.store.gather, torch.from_numpy(seed_rows))
        seeded = split_by_query(len(q), qi, seed_rows, dist.cpu().numpy(), None, k)
        radii = np.array([inclusive_radius(d[-1]) for _, d in seeded])
        return self.range_search64(q, radii, k if take else None)


class IvfShield(Shield):
    """The ``ivf`` backend over an index directory (module doc): reads, never trains."""

    backend = "ivf"

    def __init__(self, index_dir: str, manifest, device="cpu", shards=None, dims: int = 256, lists: int | None = None,
                 full: str = "disk", codes: str = "memory"):
        super().__init__(index_dir, manifest, shards, device)
        dims = min(int(dims), self.dim)
        ppath, pmeta = load_projection(index_dir, dims, create=False)
        path = self.locate(index_dir, dims, lists)
        meta = read_ivf(path, ppath)
        if meta.get("manifest_sha256") != manifest_hash(index_dir):
            raise IndexFormatError(f"{path} was built for another version of the index: rebuild it (project-index --lists)")
        subset = None if shards is None else selected_rows(manifest, shards)
        all_ids = np.load(os.path.join(ppath, "ids.npy"), mmap_mode="r")
        self.ids = np.asarray(all_ids if subset is None else all_ids[subset], np.int64)
        self.lookup = RowLookup(self.ids)
        vectors = np.load(os.path.join(ppath, "vectors.npy"), mmap_mode="r")
        if full == "disk":
            store = MemmapStore(vectors, subset, self.device)
        elif full == "memory":
            store = DeviceStore(torch.from_numpy(np.array(vectors if subset is None else vectors[subset])))
        else:
            raise ValueError(f"full must be 'disk' or 'memory', got {full!r}")
        offsets = np.load(os.path.join(path, "offsets.npy"))
        rows = np.load(os.path.join(path, "rows.npy"), mmap_mode="r")
        code_file = np.load(os.path.join(path, "codes.npy"), mmap_mode="r")
        if subset is None:
            keep = None
            rows = np.asarray(rows)
        else:  # this part's rows of every list, renumbered to the part's store rows
            local = np.full(int(pmeta["count"]), -1, np.int64)
            local[subset] = np.arange(len(subset))
            mapped = local[np.asarray(rows)]
            keep = mapped >= 0
            owner = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[keep]
            offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(offsets) - 1))])
            rows = mapped[keep]
        if codes == "memory":
            code_array = read_codes(os.path.join(path, "codes.npy"), head_dims(dims), keep)
        elif codes == "disk" and keep is None:
            code_array = code_file
        else:
            raise ValueError(f"codes must be 'memory' (or 'disk' for an unsharded shield), got {codes!r}")
        self.path = path
        self.meta = meta
        self.scan = IvfScan(read_projection(ppath, pmeta), np.load(os.path.join(path, "centroids.npy")), offsets, rows,
                            code_array, np.load(os.path.join(path, "radii.npy")), meta["eps"], meta["stored_error"],
                            store, self.stats, device=self.device)

    @staticmethod
    def locate(index_dir: str, dims: int = 256, lists: int | None = None) -> str:
        """The inverted file this shield would open; IndexFormatError (naming the command that builds
        it) when there is none, or several and no ``lists``."""
        if lists is not None:
            return ivf_dir(index_dir, dims, lists)
        base = projection_dir(index_dir, dims)
        found = sorted(n for n in os.listdir(base) if n.startswith("ivf-") and ".tmp-" not in n) if os.path.isdir(base) else []
        if len(found) != 1:
            what = "no inverted file" if not found else f"{len(found)} inverted files ({', '.join(found)}): pass lists="
            raise IndexFormatError(f"{index_dir} has {what} for its {dims}-dim projection: run "
                                   f"`spellshield project-index {index_dir} --dims {dims} --lists K`" if not found else
                                   f"{index_dir} has {what}")
        return os.path.join(base, found[0])

    def range_search64(self, queries, radii, max_k):
        return [order_results(self.ids[r], d, None, max_k) for r, d in self.scan.range_search64(queries, radii, None)]

    def knn64(self, queries, k):
        return [order_results(self.ids[r], d, None, k) for r, d in self.scan.knn64(queries, k, take=False)]

    def vectors(self, ids) -> torch.Tensor:
        return self.scan.vectors(self.lookup.rows(ids)).to(self.device)

