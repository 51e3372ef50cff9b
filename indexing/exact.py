"""``exact``: every stored vector in one torch matrix (CPU or GPU, float16 or float32), scanned in
row chunks with one GEMM per chunk, then a float64 re-check of the candidates.

The fast pass computes ``|q|^2 + |z|^2 - 2 q.z`` for a whole chunk at once:

- float32 storage, or float16 storage on the CPU: in float32 (float16 chunks are upcast, which
  is exact), bound ``float32_margin``;
- float16 storage on a GPU: one float16 GEMM per chunk with float32 accumulation, the query
  scaled by a power of two against overflow, bound ``float16_gemm_margin``. This reads the
  index once per batch at memory bandwidth, which is what bounds the exact scan on a GPU.

A pair is a candidate when its fast squared distance is within radius^2 + bound (the bound
evaluated with the largest norm of the chunk); candidates are decided in float64
(``indexing.exactness``), so a hit within rounding of the radius is neither lost nor invented.

``ExactScan`` is the kernel over a tensor (the projected backend and the GPU benchmark use it
directly); ``ExactShield`` is the backend over an index directory.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .exactness import (
    EMPTY,
    float16_gemm_accumulates_in_float32,
    float16_gemm_margin,
    float16_query_scale,
    float32_margin,
    full_precision_matmul,
    inclusive_radius,
    recheck_pairs,
    round_up_float32,
    split_by_query,
)
from .shield import SearchStats, Shield
from .store import RowLookup, load_vectors

COMPUTE = ("auto", "float32", "float16")
MASK_ELEMENTS = 1 << 27  # (queries x rows) booleans gathered before one nonzero(): one sync per batch


class ExactScan:
    """Exact search over the rows of ``vectors`` (N, D), float16 or float32, on its device."""

    def __init__(self, vectors: torch.Tensor, ids: np.ndarray | None = None, compute: str = "auto",
                 chunk_rows: int | None = None, stats: SearchStats | None = None):
        if vectors.ndim != 2 or vectors.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"vectors must be a (N, D) float16 or float32 tensor, got {vectors.dtype} {tuple(vectors.shape)}")
        if len(vectors) == 0:
            raise ValueError("cannot search an empty set of vectors")
        if compute not in COMPUTE:
            raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
        self.base = vectors.contiguous()
        self.device = vectors.device
        self.count, self.dim = vectors.shape
        self.ids = np.arange(self.count, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if len(self.ids) != self.count:
            raise ValueError(f"{len(self.ids)} ids for {self.count} vectors")
        self.lookup = RowLookup(self.ids)
        if compute == "auto":
            on_gpu = vectors.dtype == torch.float16 and vectors.device.type == "cuda"
            compute = "float16" if on_gpu and float16_gemm_accumulates_in_float32(vectors.device) else "float32"
        if compute == "float16" and vectors.dtype != torch.float16:
            raise ValueError("compute='float16' needs float16 storage (a float32 index would lose its truth)")
        if compute == "float16" and not float16_gemm_accumulates_in_float32(vectors.device):
            raise ValueError(f"the float16 GEMM on {vectors.device} does not accumulate in float32: use compute='float32'")
        self.compute = compute
        if chunk_rows is None:
            # Views cost nothing (bigger chunks, fewer kernel launches); an upcast float16 ->
            # float32 chunk is a copy, keep it ~64 MB.
            upcast = compute == "float32" and vectors.dtype == torch.float16
            budget = (64 << 20) // 4 if upcast else (2 << 30) // vectors.element_size()
            chunk_rows = max(1024, budget // self.dim)
        self.chunk_rows = int(chunk_rows)
        self.stats = stats if stats is not None else SearchStats()
        self._upcast: torch.Tensor | None = None  # reused float32 copy of a float16 chunk
        self._lock = threading.Lock()  # the buffer is shared: one scan at a time per ExactScan
        self._starts = list(range(0, self.count, self.chunk_rows))
        sq = torch.empty(self.count, dtype=torch.float64, device=self.device)
        norm_rows = max(1, (256 << 20) // (8 * self.dim))  # float64 copies of ~256 MB at a time
        for start in range(0, self.count, norm_rows):
            chunk = self.base[start : start + norm_rows].to(torch.float64)
            sq[start : start + norm_rows] = (chunk * chunk).sum(1)
        self.base_sq = sq.to(torch.float32)  # one rounding: counted in the margins
        chunk_max = torch.stack([sq[s : s + self.chunk_rows].max() for s in self._starts]).cpu().numpy()
        self.chunk_sq_max = chunk_max  # float64 (chunks,)
        self.sq_max = float(chunk_max.max())

    # -- fast pass -----------------------------------------------------------------------------

    def _prepare(self, q: torch.Tensor):
        """Per-query norms (float64 on the host), the float32 norms, and the GEMM operand."""
        q64 = q.to(torch.float64)
        qsq = (q64 * q64).sum(1)
        qsq_host = qsq.cpu().numpy()
        qsq32 = qsq.to(torch.float32)
        if self.compute == "float16":
            scale = float16_query_scale(np.sqrt(qsq_host), np.sqrt(self.sq_max))
            return qsq_host, qsq32, (q * scale).to(torch.float16), scale
        return qsq_host, qsq32, q, 1.0

    def _margins(self, qsq_host: np.ndarray, sq_max: float, scale: float) -> np.ndarray:
        if self.compute == "float16":
            return float16_gemm_margin(self.dim, np.sqrt(qsq_host), np.sqrt(sq_max), scale)
        return float32_margin(self.dim, qsq_host, sq_max)

    def _fast_sq(self, operand: torch.Tensor, qsq32: torch.Tensor, start: int, scale: float) -> torch.Tensor:
        """Fast squared distances (B, rows) of one chunk, in float32."""
        chunk = self.base[start : start + self.chunk_rows]
        if self.compute == "float16":
            dots = (operand @ chunk.T).to(torch.float32) * (2.0 / scale)  # power of two: exact
        elif chunk.dtype == torch.float32:
            dots = 2.0 * (operand @ chunk.T)
        else:  # float16 storage, float32 arithmetic: upcast (exact) into a buffer kept between chunks
            if self._upcast is None or self._upcast.device != chunk.device:
                self._upcast = torch.empty((self.chunk_rows, self.dim), dtype=torch.float32, device=chunk.device)
            upcast = self._upcast[: len(chunk)]
            upcast.copy_(chunk)
            dots = 2.0 * (operand @ upcast.T)
        return qsq32[:, None] + self.base_sq[None, start : start + self.chunk_rows] - dots

    def candidates(self, q: torch.Tensor, radii: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(query index, row) pairs whose fast squared distance is within radius^2 + bound."""
        qsq_host, qsq32, operand, scale = self._prepare(q)
        r2 = np.asarray(radii, np.float64) ** 2
        thresholds = np.stack([round_up_float32(r2 + self._margins(qsq_host, m, scale)) for m in self.chunk_sq_max])
        thresholds = torch.from_numpy(thresholds).to(self.device)  # (chunks, B) float32
        batch = len(q)
        flush_rows = max(self.chunk_rows, MASK_ELEMENTS // max(batch, 1))
        pairs_q, pairs_r = [], []
        mask, mask_start = None, 0
        with self._lock, full_precision_matmul():
            for c, start in enumerate(self._starts):
                if mask is None:
                    mask_start = start
                    mask = torch.empty((batch, min(flush_rows, self.count - start)), dtype=torch.bool, device=self.device)
                d2 = self._fast_sq(operand, qsq32, start, scale)
                local = start - mask_start
                torch.le(d2, thresholds[c][:, None], out=mask[:, local : local + d2.shape[1]])
                end = local + d2.shape[1]
                if end + self.chunk_rows > mask.shape[1] or c == len(self._starts) - 1:
                    qi, rows = torch.nonzero(mask[:, :end], as_tuple=True)
                    pairs_q.append(qi)
                    pairs_r.append(rows + mask_start)
                    mask = None
        return torch.cat(pairs_q), torch.cat(pairs_r)

    # -- searches ------------------------------------------------------------------------------

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.base[rows.to(self.device)]

    def recheck(self, q: torch.Tensor, qi: torch.Tensor, rows: torch.Tensor, radii, k: int | None):
        """Decide (query, row) pairs in float64 and group them per query."""
        if len(qi) == 0:
            return [EMPTY for _ in range(len(q))]
        dist = recheck_pairs(q, qi.to(q.device), self.gather, rows)
        qi_h, rows_h, dist_h = qi.cpu().numpy(), rows.cpu().numpy(), dist.cpu().numpy()
        return split_by_query(len(q), qi_h, self.ids[rows_h], dist_h, radii, k)

    def range_search64(self, q: torch.Tensor, radii: np.ndarray, max_k: int | None = None):
        qi, rows = self.candidates(q, radii)
        out = self.recheck(q, qi, rows, radii, max_k)
        self.stats.add(len(q), len(qi), sum(len(ids) for ids, _ in out))
        return out

    def knn64(self, q: torch.Tensor, k: int):
        """One scan keeping the k + 16 fast-nearest rows of each query, decided in float64.

        Let U be the k-th float64 distance among them and F the smallest fast distance left out.
        Every row left out has true squared distance >= F - bound; if that exceeds U^2, no row
        left out can enter the top k (nor tie with it), so the answer is exact. Otherwise that
        query is answered by a range search of radius just above U (rare: near-ties).
        """
        k = min(int(k), self.count)
        fetch = min(self.count, k + 16)
        qsq_host, qsq32, operand, scale = self._prepare(q)
        best_d = best_r = None
        with self._lock, full_precision_matmul():
            for start in self._starts:
                d2 = self._fast_sq(operand, qsq32, start, scale)
                d, r = torch.topk(d2, min(fetch, d2.shape[1]), dim=1, largest=False)
                r = r + start
                if best_d is not None:
                    d, idx = torch.topk(torch.cat([best_d, d], 1), fetch, dim=1, largest=False)
                    r = torch.gather(torch.cat([best_r, r], 1), 1, idx)
                best_d, best_r = d, r
        batch = len(q)
        qi = torch.arange(batch, device=self.device).repeat_interleave(fetch)
        found = self.recheck(q, qi, best_r.reshape(-1), None, k)
        upper = np.array([dist[-1] for _, dist in found])
        if fetch == self.count:
            return found
        left_out = best_d[:, -1].cpu().numpy().astype(np.float64)
        bound = self._margins(qsq_host, self.sq_max, scale)
        unsure = np.flatnonzero(~(left_out - bound > upper * upper * (1 + 1e-12)))
        if len(unsure):
            radii = np.array([inclusive_radius(u) for u in upper[unsure]])
            again = self.range_search64(q[torch.as_tensor(unsure, device=q.device)], radii, k)
            for j, i in enumerate(unsure):
                found[i] = again[j]
        return found

    def vectors(self, ids) -> torch.Tensor:
        rows = torch.from_numpy(self.lookup.rows(ids))
        return self.base[rows.to(self.device)].to(torch.float32)


class ExactShield(Shield):
    """The ``exact`` backend: the selected shards of an index directory in one ``ExactScan``."""

    backend = "exact"

    def __init__(self, index_dir: str, manifest, device="cpu", shards=None, compute: str = "auto",
                 chunk_rows: int | None = None):
        super().__init__(index_dir, manifest, shards, device)
        ids, vectors = load_vectors(index_dir, manifest, shards)
        self.scan = ExactScan(torch.from_numpy(vectors).to(self.device), ids, compute, chunk_rows, self.stats)
        self.ids = self.scan.ids

    def range_search64(self, queries, radii, max_k):
        return self.scan.range_search64(queries, radii, max_k)

    def knn64(self, queries, k):
        return self.scan.knn64(queries, k)

    def vectors(self, ids) -> torch.Tensor:
        return self.scan.vectors(ids)
