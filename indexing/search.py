"""Searching a shield index without ever missing a hit.

``open_index(path, backend=...)`` returns a shield with

    range_search(queries, radius, max_k=None) -> [(ids, distances)]   one pair per query row
    knn(queries, k)                          -> [(ids, distances)]
    vectors(ids) -> torch.Tensor (K, D)      the stored latents, for the repellency term
    keys(ids)    -> list[str]                corpus keys, for the audit log

``queries`` is a float tensor (B, D) in the index's latent space (flattened C, H, W). ids are
the global int64 ids of ``ids-*.parquet``; distances are float32 L2 (not squared), nearest
first. Ties are broken by id.

Exactness. Fast distance code computes ``||q||^2 + ||z||^2 - 2 q.z`` in float32, whose rounding
error is at most ``2 D u (||q||^2 + ||z||^2)`` (u = 2^-24; Higham's bound on a D-term dot
product, applied to the three sums). Every backend therefore searches with the squared radius
widened by that bound, then re-checks each candidate by computing ``||q - z||`` in float64 and
keeps it only if it is strictly below the radius. A hit inside the ball can never be lost to
rounding; what the fast pass adds is only work for the re-check.

Backends here: ``exact`` (torch, all shards in one matrix, chunked) and ``faiss`` (one CPU
FAISS index per shard, range_search on each, merged here: FAISS has no range search over
``IndexShards``).
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import torch

from .manifest import IndexFormatError, Manifest, read_manifest

UNIT_ROUNDOFF = 2.0**-24


def rounding_margin(dim: int, query_sq_norms: np.ndarray, max_base_sq_norm: float) -> np.ndarray:
    """Upper bound on the float32 error of an expanded squared distance (see module doc)."""
    gamma = 2.0 * dim * UNIT_ROUNDOFF / (1.0 - dim * UNIT_ROUNDOFF)
    return gamma * (query_sq_norms + max_base_sq_norm) * 1.01 + 1e-30


def _as_numpy_queries(queries, dim: int) -> np.ndarray:
    if torch.is_tensor(queries):
        queries = queries.detach().to("cpu", torch.float32).numpy()
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (B, {dim}), got {q.shape}")
    return q


def _exact_filter(q: np.ndarray, cand_ids: np.ndarray, cand_vectors: np.ndarray, radius: float | None, k: int | None):
    """float64 re-check of one query's candidates: strictly inside ``radius`` and/or k nearest."""
    if len(cand_ids) == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    diff = cand_vectors.astype(np.float64) - q.astype(np.float64)[None, :]
    dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    order = np.lexsort((cand_ids, dist))
    if radius is not None:
        order = order[dist[order] < radius]
    if k is not None:
        order = order[:k]
    return cand_ids[order].astype(np.int64), dist[order].astype(np.float32)


class Shield:
    """Common parts: manifest, id -> key table, argument checks."""

    def __init__(self, index_dir: str, manifest: Manifest):
        self.index_dir = index_dir
        self.manifest = manifest
        self.dim = manifest.latent.dim
        self.count = manifest.count
        self._keys: np.ndarray | None = None

    def keys(self, ids) -> list[str]:
        if self._keys is None:
            tables = [pq.read_table(os.path.join(self.index_dir, s.ids_file), columns=["id", "key"]) for s in self.manifest.shards]
            keys = np.empty(self.count, dtype=object)
            for t in tables:
                keys[t.column("id").to_numpy()] = t.column("key").to_pylist()
            self._keys = keys
        return [self._keys[int(i)] for i in np.asarray(ids).reshape(-1)]

    @staticmethod
    def _check_radius(radius: float) -> float:
        radius = float(radius)
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        return radius

    def range_search(self, queries, radius: float, max_k: int | None = None):
        raise NotImplementedError

    def knn(self, queries, k: int):
        raise NotImplementedError

    def vectors(self, ids) -> torch.Tensor:
        raise NotImplementedError


def _load_shard(index_dir: str, file: str):
    path = os.path.join(index_dir, file)
    if not os.path.isfile(path):
        raise IndexFormatError(f"index shard {path} is missing")
    return faiss.read_index(path)


def _shard_vectors(index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of a shard, in insertion order.

    A shard is ``IndexIDMap2(IndexFlatL2)`` (manifest dtype float32) or
    ``IndexIDMap2(IndexScalarQuantizer(QT_fp16))`` (dtype float16), whose codes are the stored
    latents as IEEE half floats: read as such and widened exactly, so the float32 values returned
    are the fp16-rounded latents, the stored truth.
    """
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexScalarQuantizer):
        if inner.sq.qtype != faiss.ScalarQuantizer.QT_fp16:
            raise IndexFormatError(f"unsupported scalar quantizer type {inner.sq.qtype} (only QT_fp16 is stored)")
        codes = faiss.vector_to_array(inner.codes).view(np.float16).reshape(inner.ntotal, inner.d)
        return ids, codes.astype(np.float32)
    return ids, inner.reconstruct_n(0, inner.ntotal)


class ExactShield(Shield):
    """Every vector in one torch matrix (CPU or GPU), searched in chunks of rows."""

    def __init__(self, index_dir: str, manifest: Manifest, device: str = "cpu", chunk_rows: int = 65536):
        super().__init__(index_dir, manifest)
        ids, vectors = [], []
        for shard in manifest.shards:
            shard_ids, shard_vectors = _shard_vectors(_load_shard(index_dir, shard.file))
            ids.append(shard_ids)
            vectors.append(shard_vectors)
        self.ids = np.concatenate(ids)
        self._host = np.concatenate(vectors)  # float32 (N, D), for the float64 re-check
        self._row_of_id = np.empty(int(self.ids.max()) + 1, dtype=np.int64)
        self._row_of_id[self.ids] = np.arange(len(self.ids))
        self.device = device
        self.base = torch.from_numpy(self._host).to(device)
        self.base_sq = (self.base * self.base).sum(1)
        self.max_base_sq = float(self.base_sq.max())
        self.chunk_rows = chunk_rows

    def _candidates(self, q: np.ndarray, threshold_sq: np.ndarray) -> list[np.ndarray]:
        """Rows whose float32 squared distance is within ``threshold_sq`` of each query."""
        qt = torch.from_numpy(q).to(self.device)
        q_sq = (qt * qt).sum(1, keepdim=True)
        thr = torch.from_numpy(threshold_sq.astype(np.float32)).to(self.device).unsqueeze(1)
        rows: list[list[np.ndarray]] = [[] for _ in range(len(q))]
        for start in range(0, self.base.shape[0], self.chunk_rows):
            chunk = self.base[start : start + self.chunk_rows]
            d2 = q_sq + self.base_sq[start : start + self.chunk_rows].unsqueeze(0) - 2.0 * (qt @ chunk.T)
            hit_q, hit_r = torch.nonzero(d2 <= thr, as_tuple=True)
            hit_q, hit_r = hit_q.cpu().numpy(), hit_r.cpu().numpy() + start
            for i in np.unique(hit_q):
                rows[i].append(hit_r[hit_q == i])
        return [np.concatenate(r) if r else np.empty(0, np.int64) for r in rows]

    def range_search(self, queries, radius: float, max_k: int | None = None):
        radius = self._check_radius(radius)
        q = _as_numpy_queries(queries, self.dim)
        q_sq = (q.astype(np.float64) ** 2).sum(1)
        threshold = radius * radius + rounding_margin(self.dim, q_sq, self.max_base_sq)
        out = []
        for i, rows in enumerate(self._candidates(q, threshold)):
            out.append(_exact_filter(q[i], self.ids[rows], self._host[rows], radius, max_k))
        return out

    def knn(self, queries, k: int):
        q = _as_numpy_queries(queries, self.dim)
        k = min(int(k), self.count)
        qt = torch.from_numpy(q).to(self.device)
        q_sq = (qt * qt).sum(1, keepdim=True)
        best_d, best_r = None, None
        # Over-fetch so that float32 ties and near-ties are settled by the float64 re-check.
        fetch = min(self.count, k + 16)
        for start in range(0, self.base.shape[0], self.chunk_rows):
            chunk = self.base[start : start + self.chunk_rows]
            d2 = q_sq + self.base_sq[start : start + self.chunk_rows].unsqueeze(0) - 2.0 * (qt @ chunk.T)
            d, r = torch.topk(d2, min(fetch, d2.shape[1]), dim=1, largest=False)
            r = r + start
            if best_d is None:
                best_d, best_r = d, r
            else:
                best_d, idx = torch.topk(torch.cat([best_d, d], 1), fetch, dim=1, largest=False)
                best_r = torch.gather(torch.cat([best_r, r], 1), 1, idx)
        # Anything whose float32 distance could beat the k-th must be re-checked too.
        kth = best_d[:, k - 1].cpu().numpy().astype(np.float64)
        margin = rounding_margin(self.dim, (q.astype(np.float64) ** 2).sum(1), self.max_base_sq)
        out = []
        rows_all = best_r.cpu().numpy()
        d_all = best_d.cpu().numpy()
        for i in range(len(q)):
            rows = rows_all[i]
            if d_all[i, -1] <= kth[i] + 2 * margin[i] and fetch < self.count:
                # Too many near-ties to trust the top list: fall back to a range search.
                rows = self._candidates(q[i : i + 1], np.array([kth[i] + 2 * margin[i]]))[0]
            out.append(_exact_filter(q[i], self.ids[rows], self._host[rows], None, k))
        return out

    def vectors(self, ids) -> torch.Tensor:
        rows = self._row_of_id[np.asarray(ids, dtype=np.int64).reshape(-1)]
        return torch.from_numpy(self._host[rows])


class FaissShield(Shield):
    """One CPU FAISS flat index per shard; each query's hits merged across shards here."""

    def __init__(self, index_dir: str, manifest: Manifest):
        super().__init__(index_dir, manifest)
        self.shards = []
        for shard in manifest.shards:
            index = _load_shard(index_dir, shard.file)
            ids, vectors = _shard_vectors(index)
            self.shards.append((index, ids, vectors, float((vectors.astype(np.float64) ** 2).sum(1).max())))

    def range_search(self, queries, radius: float, max_k: int | None = None):
        radius = self._check_radius(radius)
        q = _as_numpy_queries(queries, self.dim)
        q_sq = (q.astype(np.float64) ** 2).sum(1)
        cand_ids = [[] for _ in range(len(q))]
        cand_vec = [[] for _ in range(len(q))]
        for index, ids, vectors, max_sq in self.shards:
            # FAISS takes one radius for the batch: use the widest margin; the re-check trims.
            threshold = float(radius * radius + rounding_margin(self.dim, q_sq, max_sq).max())
            lims, _, found = index.range_search(q, threshold)
            for i in range(len(q)):
                hit = found[lims[i] : lims[i + 1]]
                if len(hit):
                    cand_ids[i].append(hit)
                    cand_vec[i].append(self._lookup(ids, vectors, hit))
        return [
            _exact_filter(q[i], np.concatenate(cand_ids[i]) if cand_ids[i] else np.empty(0, np.int64),
                          np.concatenate(cand_vec[i]) if cand_vec[i] else np.empty((0, self.dim), np.float32), radius, max_k)
            for i in range(len(q))
        ]

    def knn(self, queries, k: int):
        q = _as_numpy_queries(queries, self.dim)
        k = min(int(k), self.count)
        cand_ids = [[] for _ in range(len(q))]
        cand_vec = [[] for _ in range(len(q))]
        for index, ids, vectors, _ in self.shards:
            fetch = min(index.ntotal, k + 16)
            _, found = index.search(q, fetch)
            for i in range(len(q)):
                hit = found[i][found[i] >= 0]
                cand_ids[i].append(hit)
                cand_vec[i].append(self._lookup(ids, vectors, hit))
        return [_exact_filter(q[i], np.concatenate(cand_ids[i]), np.concatenate(cand_vec[i]), None, k) for i in range(len(q))]

    @staticmethod
    def _lookup(ids: np.ndarray, vectors: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        if _contiguous(ids):
            return vectors[wanted - ids[0]]
        order = np.argsort(ids)
        return vectors[order[np.searchsorted(ids[order], wanted)]]

    def vectors(self, ids) -> torch.Tensor:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for _, shard_ids, vectors, _ in self.shards:
            mask = (ids >= shard_ids.min()) & (ids <= shard_ids.max())
            if mask.any():
                out[mask] = self._lookup(shard_ids, vectors, ids[mask])
        return torch.from_numpy(out)


def _contiguous(ids: np.ndarray) -> bool:
    return len(ids) > 0 and ids[-1] - ids[0] == len(ids) - 1 and bool(np.all(np.diff(ids) == 1))


BACKENDS = {"exact": ExactShield, "faiss": FaissShield}


def open_index(index_dir: str, backend: str = "exact", device: str = "cpu") -> Shield:
    """Open a finished index directory with one of the search backends."""
    manifest = read_manifest(index_dir)
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "exact":
        return ExactShield(index_dir, manifest, device=device)
    if device != "cpu":
        raise ValueError("the faiss backend searches on the CPU; use backend='exact' on a GPU")
    return FaissShield(index_dir, manifest)
