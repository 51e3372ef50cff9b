"""``faiss``: one FAISS index per shard, searched with FAISS, each candidate decided in float64.

Three ways to run the fast pass, all complete:

- ``flat`` (default): the shard's own file (``IndexFlatL2`` or float16 ``IndexScalarQuantizer``)
  and its ``range_search`` with the squared radius widened by ``float32_margin``.
- ``ivf``: an inverted file built over the shard's vectors when the shield opens
  (``IndexIVFFlat``, or ``IndexIVFScalarQuantizer(QT_fp16, by_residual=False)`` for float16
  shards: its codes are the stored vectors exactly; never PQ, which would lose true hits). A list
  is skipped only when a proven lower bound on the distance from the query to every vector in
  it reaches the radius (``IvfProbe``), so ``nprobe`` is chosen per query and nothing is lost.
- on a GPU (``device="cuda"``, faiss-gpu importable): a GPU flat index per shard. GPU indexes
  have no range search, so ``range_by_topk`` asks for the top k and doubles k until the k-th
  fast distance exceeds the widened radius; past the GPU's largest k a query falls back to the
  shard's CPU index.

knn runs the fast search for k rows, takes U = the k-th float64 distance among them (an upper
bound on the true k-th distance) and answers with a range search of radius just above U.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .exactness import (
    EMPTY,
    float16_gemm_margin,
    float32_margin,
    inclusive_radius,
    merge,
    order_results,
    recheck_pairs,
    round_up_float32,
    split_by_query,
)
from .shield import Shield
from .store import RowLookup, read_shard_index, select_shards, shard_arrays, storage_dtype

INDEX_TYPES = ("flat", "ivf")
GPU_MAX_K = 2048  # the largest k FAISS's GPU top-k selection supports


def gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        return False


def range_by_topk(search, queries: np.ndarray, thresholds: np.ndarray, ntotal: int, k0: int = 64,
                  max_k: int = GPU_MAX_K):
    """Range search through a top-k search: all rows with fast squared distance <= threshold.

    ``search(queries, k) -> (D, I)`` is a FAISS-style k-NN search (ascending D, I = -1 when fewer
    than k exist). For each query, k doubles from ``k0`` until the k-th distance exceeds its
    threshold (every row at or below it is then in the list: a row left out has a distance >= the
    k-th) or k reaches ``ntotal``. Returns (rows per query, queries still open at ``max_k``): the
    caller answers those another way.
    """
    found: list[np.ndarray | None] = [None] * len(queries)
    pending = np.arange(len(queries))
    k = max(1, min(int(k0), ntotal))
    while len(pending):
        kk = min(k, ntotal, max_k)
        dist, rows = search(np.ascontiguousarray(queries[pending]), kk)
        complete = (dist[:, -1] > thresholds[pending]) | (rows[:, -1] < 0) | (kk == ntotal)
        for j in np.flatnonzero(complete):
            keep = (rows[j] >= 0) & (dist[j] <= thresholds[pending[j]])
            found[pending[j]] = rows[j][keep].astype(np.int64)
        pending = pending[~complete]
        if kk == max_k and kk < ntotal:
            break
        k *= 2
    return found, pending


class IvfProbe:
    """Which inverted lists can hold a hit: lists whose lower bound reaches the radius are skipped.

    For a list j with centroid c_j and members x, and any query q:
    - covering radius: |q - x| >= |q - c_j| - R_j, R_j = max |x - c_j| (triangle inequality);
    - Voronoi half-space: FAISS put x in list j because its float32 distance to c_j was not above
      that to any other centroid c_i, so |x - c_j|^2 <= |x - c_i|^2 + eps_j with eps_j twice the
      float32 margin of that assignment. f(y) = |y - c_j|^2 - |y - c_i|^2 is affine with gradient
      2 (c_i - c_j), hence |q - x| >= (f(q) - eps_j) / (2 |c_i - c_j|), tried for the few
      centroids c_i nearest to q.
    The larger bound is used, computed in float64 with a relative slack of 1e-9.
    """

    SLACK = 1e-9

    def __init__(self, centroids: np.ndarray, list_rows: list[np.ndarray], vectors: np.ndarray, voronoi: int = 4):
        self.centroids = centroids.astype(np.float64)
        nlist, dim = centroids.shape
        csq_max = float((self.centroids**2).sum(1).max())
        self.cover = np.zeros(nlist)
        self.eps = np.zeros(nlist)
        for j, rows in enumerate(list_rows):
            if len(rows):
                x = vectors[rows].astype(np.float64)
                self.cover[j] = np.sqrt(((x - self.centroids[j]) ** 2).sum(1).max())
                self.eps[j] = 2.0 * float(float32_margin(dim, (x * x).sum(1).max(), csq_max))
        self.empty = np.array([len(r) == 0 for r in list_rows])
        self.voronoi = min(voronoi, nlist - 1)
        # Centroid-to-centroid distances, direct differences in float64, one row at a time.
        self.gaps = np.stack([np.sqrt(((self.centroids - c) ** 2).sum(1)) for c in self.centroids])

    def lists(self, q64: np.ndarray, radius: float) -> np.ndarray:
        diff = self.centroids - q64[None, :]
        dq = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        bound = dq - self.cover * (1 + self.SLACK)
        for i in np.argsort(dq)[: self.voronoi]:
            gap = self.gaps[i]
            f = dq**2 - dq[i] ** 2
            with np.errstate(divide="ignore", invalid="ignore"):
                half = (f - self.eps - self.SLACK * (dq**2 + dq[i] ** 2)) / (2 * gap * (1 + self.SLACK))
            half[gap == 0] = -np.inf
            bound = np.maximum(bound, half)
        probe = (bound * (1 - self.SLACK) < radius) & ~self.empty
        return np.flatnonzero(probe)


@dataclass
class _Part:
    """One shard: its ids, stored vectors, CPU index (labels = rows), optional IVF and GPU index."""

    ids: np.ndarray
    vectors: np.ndarray
    lookup: RowLookup
    cpu: object
    sq_max: float
    owner: object = None  # the IndexIDMap2 that owns ``cpu``: freeing it would free ``cpu`` too
    ivf: object = None
    probe: IvfProbe | None = None
    gpu: object = None


class FaissShield(Shield):
    """The ``faiss`` backend (see module doc)."""

    backend = "faiss"

    def __init__(self, index_dir: str, manifest, device="cpu", shards=None, index_type: str = "flat",
                 nlist: int | None = None, k0: int = 64, seed: int = 0):
        import faiss

        super().__init__(index_dir, manifest, shards, device)
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self.use_gpu = self.device.type == "cuda"
        if self.use_gpu and not gpu_available():
            raise ValueError("the faiss backend on a GPU needs faiss-gpu and a visible GPU; use backend='exact'")
        if self.use_gpu and index_type != "flat":
            raise ValueError("on a GPU the faiss backend searches flat indexes only")
        self.index_type = index_type
        self.k0 = int(k0)
        self.lists_probed = 0  # IVF: lists searched, summed over queries and shards
        dtype = storage_dtype(manifest)
        self._gpu_resources = faiss.StandardGpuResources() if self.use_gpu else None
        self.parts: list[_Part] = []
        for info in select_shards(manifest, shards):
            index = read_shard_index(index_dir, info)
            ids, vectors = shard_arrays(index, dtype, info.file)
            cpu = faiss.downcast_index(index.index)
            sq_max = float((vectors.astype(np.float64) ** 2).sum(1).max())
            part = _Part(ids=ids, vectors=vectors, lookup=RowLookup(ids), cpu=cpu, sq_max=sq_max, owner=index)
            if index_type == "ivf":
                part.ivf, part.probe = self._build_ivf(vectors, dtype, nlist, seed)
            if self.use_gpu:
                options = faiss.GpuClonerOptions()
                options.useFloat16 = dtype == np.float16  # float16 storage holds the stored values exactly
                flat = faiss.IndexFlatL2(vectors.shape[1])
                flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
                part.gpu = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, flat, options)
            self.parts.append(part)

    @staticmethod
    def _build_ivf(vectors: np.ndarray, dtype, nlist: int | None, seed: int):
        import faiss

        n, dim = vectors.shape
        if nlist is None:
            nlist = max(1, min(int(round(math.sqrt(n))), n // 39))
        nlist = max(1, min(int(nlist), n))
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        quantizer = faiss.IndexFlatL2(dim)
        if dtype == np.float16:
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2, False)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist)
        ivf.cp.seed = seed
        ivf.train(x)
        ivf.add(x)  # labels are rows of the shard
        invlists = ivf.invlists
        list_rows = [faiss.rev_swig_ptr(invlists.get_ids(j), invlists.list_size(j)).copy() if invlists.list_size(j) else
                     np.empty(0, np.int64) for j in range(nlist)]
        return ivf, IvfProbe(faiss.vector_to_array(quantizer.codes).view(np.float32).reshape(nlist, dim), list_rows, vectors)

    # -- fast pass per shard -------------------------------------------------------------------

    def _margins(self, part: _Part, qsq: np.ndarray) -> np.ndarray:
        if self.use_gpu:  # TF32 or float16 inputs, float32 output: the float16 bound covers both
            return float16_gemm_margin(self.dim, np.sqrt(qsq), math.sqrt(part.sq_max), 1.0)
        return float32_margin(self.dim, qsq, part.sq_max)

    def _candidates(self, part: _Part, q: np.ndarray, q64: np.ndarray, radii: np.ndarray) -> list[np.ndarray]:
        qsq = (q64 * q64).sum(1)
        thresholds = round_up_float32(radii**2 + self._margins(part, qsq))
        if self.use_gpu:
            found, pending = range_by_topk(part.gpu.search, q, thresholds, part.gpu.ntotal, self.k0)
            if len(pending):  # beyond the GPU's largest k: the CPU copy's range search
                found_cpu = self._cpu_range(part, q[pending], q64[pending], radii[pending], thresholds[pending])
                for j, i in enumerate(pending):
                    found[i] = found_cpu[j]
            return found
        return self._cpu_range(part, q, q64, radii, thresholds)

    def _cpu_range(self, part: _Part, q, q64, radii, thresholds) -> list[np.ndarray]:
        threshold = float(thresholds.max())  # FAISS takes one radius per call: the re-check trims
        if part.ivf is None:
            lims, _, rows = part.cpu.range_search(q, threshold)
        else:
            probes = [part.probe.lists(q64[i], float(radii[i])) for i in range(len(q))]
            self.lists_probed += sum(len(p) for p in probes)
            width = max(1, max(len(p) for p in probes))
            assign = np.full((len(q), width), -1, np.int64)
            for i, p in enumerate(probes):
                assign[i, : len(p)] = p
            part.ivf.nprobe = width
            lims, _, rows = part.ivf.range_search_preassigned(q, threshold, assign, None)
        return [rows[lims[i] : lims[i + 1]].astype(np.int64) for i in range(len(q))]

    def _seed(self, part: _Part, q: np.ndarray, k: int) -> np.ndarray:
        """Any k distinct rows per query (nearer is better): the fast k-NN, padded if short."""
        if self.use_gpu:
            _, rows = part.gpu.search(q, min(k, GPU_MAX_K))
        elif part.ivf is not None:
            part.ivf.nprobe = min(part.ivf.nlist, 16)
            _, rows = part.ivf.search(q, k)
        else:
            _, rows = part.cpu.search(q, k)
        out = np.empty((len(q), k), np.int64)
        for i, r in enumerate(rows):
            r = r[r >= 0]
            extra = np.setdiff1d(np.arange(min(part.cpu.ntotal, k + len(r))), r)[: k - len(r)]
            out[i] = np.concatenate([r, extra])
        return out

    # -- searches ------------------------------------------------------------------------------

    def _recheck(self, part: _Part, qt: torch.Tensor, rows_per_query: list[np.ndarray], radii, k):
        qi = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(rows_per_query)])
        rows = np.concatenate(rows_per_query) if rows_per_query else np.empty(0, np.int64)
        if len(rows) == 0:
            return [EMPTY for _ in rows_per_query]
        dist = recheck_pairs(qt, torch.from_numpy(qi), lambda r: torch.from_numpy(part.vectors[r.numpy()]),
                             torch.from_numpy(rows)).numpy()
        return split_by_query(len(rows_per_query), qi, part.ids[rows], dist, radii, k)

    def _part_range(self, part, qt, q, q64, radii, max_k):
        rows = self._candidates(part, q, q64, radii)
        out = self._recheck(part, qt, rows, radii, max_k)
        self.stats.add(0, sum(len(r) for r in rows), sum(len(i) for i, _ in out))
        return out

    def range_search64(self, queries: torch.Tensor, radii: np.ndarray, max_k: int | None):
        qt = queries.cpu()
        q = qt.numpy()
        q64 = q.astype(np.float64)
        self.stats.add(len(q), 0, 0)
        return merge([self._part_range(p, qt, q, q64, radii, max_k) for p in self.parts], max_k)

    def knn64(self, queries: torch.Tensor, k: int):
        qt = queries.cpu()
        q = qt.numpy()
        q64 = q.astype(np.float64)
        self.stats.add(len(q), 0, 0)
        per_part = []
        for part in self.parts:
            kk = min(k, len(part.ids))
            seeded = self._recheck(part, qt, list(self._seed(part, q, kk)), None, kk)
            radii = np.array([inclusive_radius(d[-1]) for _, d in seeded])
            per_part.append([order_results(i, d, None, kk) for i, d in self._part_range(part, qt, q, q64, radii, kk)])
        return merge(per_part, k)

    def vectors(self, ids) -> torch.Tensor:
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), np.float32)
        done = np.zeros(len(ids), bool)
        for part in self.parts:
            mask = ~done & (ids >= part.ids.min()) & (ids <= part.ids.max())
            if mask.any():
                out[mask] = part.vectors[part.lookup.rows(ids[mask])]
                done |= mask
        if not done.all():
            raise KeyError(f"ids not in this index: {ids[~done][:5].tolist()}")
        return torch.from_numpy(out)
