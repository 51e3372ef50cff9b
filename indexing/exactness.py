"""The arithmetic that lets a fast search never miss a hit: rounding bounds and the float64 re-check.

Every backend runs a fast pass (float32, or float16 on a GPU) that may be wrong by rounding, then
decides every candidate in float64. The fast pass is made a superset by widening the squared
radius by a proven bound on its rounding error; this module holds those bounds, the re-check and
the merge of per-part results. Only numpy and torch: the GPU benchmark imports it without FAISS.

Notation: ``u`` is a unit roundoff (float32: 2^-24, float16: 2^-11), ``gamma(n, u) = n u / (1 - n u)``
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1: the relative
error of n chained roundings), q a query, z a stored vector, D the dimension.

float32 (``float32_margin``). A squared distance computed either directly, ``sum (q_i - z_i)^2``
(D subtractions, D squarings, D-1 additions, in any order: FAISS's SIMD kernels), or expanded,
``|q|^2 + |z|^2 - 2 q.z`` (three D-term sums and two more additions: BLAS and our torch scan, in
any blocking or FMA order), is off by at most

    2 gamma(D + 3) (1 + gamma(D)) (|q|^2 + |z|^2)  +  4 u (|q|^2 + |z|^2)

The first term is Higham's dot-product bound (eq. 3.5) applied to each sum, bounded with
``|q.z| <= (|q|^2 + |z|^2) / 2`` and ``(q_i - z_i)^2 <= 2 (q_i^2 + z_i^2)``; the second covers
norms computed once in float64 and stored in float32 (one rounding each) and the threshold
itself. We multiply by 1 + 2^-20 and add ``D * 2^-126`` for underflow of tiny terms.

float16 GEMM (``float16_gemm_margin``), the GPU path for float16 storage. The stored vectors z
are float16 and exact (they are the index's truth). The query is scaled by a power of two s
(exact) so that no product or sum can overflow float16's 65504, and rounded to float16:
``|q16_i - s q_i| <= u16 |s q_i| + eta`` (eta = 2^-14 covers subnormals flushed to zero).
Products of two float16 numbers are exact in float32; the D-term sum is accumulated in float32
(we switch off torch's reduced-precision fp16 reductions for the call) with error at most
``gamma(D, u_acc) sum |q16_i z_i|``, where u_acc = 2^-22, twice float32's 2^-23 ulp: tensor cores
align and truncate instead of rounding (Fasi, Higham, Mikaitis, Pranesh, 2021); z subnormals
flushed to zero add at most ``eta sqrt(D) |q16|``; the result is rounded to float16 (``u16 |s| +
eta``). Divided back by s, the error of q.z is bounded by

    [ (u16 |s q| + eta sqrt(D)) |z| + (gamma(D, u_acc) (1 + u16) + u16 + eta sqrt(D)/|z|) |q16| |z| + eta ] / s

and the squared distance by twice that plus the float32 terms of the final additions.

The re-check computes ``sqrt(sum (q_i - z_i)^2)`` in float64 from the float32 query and the
stored vector (float16 values are exact in float64) and keeps a point iff it is strictly below
the radius: the same formula as a float64 numpy brute force, so the two agree.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np
import torch

FLOAT32_UNIT = 2.0**-24
FLOAT16_UNIT = 2.0**-11
FLOAT16_TINY = 2.0**-14  # smallest normal float16: bounds the error of a subnormal flushed to zero
FLOAT16_SAFE_MAX = 2.0**14  # products and sums of the scaled GEMM stay below this (float16 max: 65504)
ACCUMULATE_UNIT = 2.0**-22  # float32 accumulation on tensor cores, with truncation (see module doc)
SAFETY = 1.0 + 2.0**-20


def gamma(n: int, unit: float) -> float:
    """Higham's gamma_n: the relative error bound of n chained roundings with unit roundoff ``unit``."""
    if n * unit >= 1.0:
        raise ValueError(f"no rounding bound for {n} terms at unit roundoff {unit}: use float64")
    return n * unit / (1.0 - n * unit)


def float32_margin(dim: int, query_sq: np.ndarray, base_sq_max: float) -> np.ndarray:
    """Bound on |fast - true| squared distance computed in float32 (module doc), per query."""
    query_sq = np.asarray(query_sq, dtype=np.float64)
    scale = query_sq + float(base_sq_max)
    coef = 2.0 * gamma(dim + 3, FLOAT32_UNIT) * (1.0 + gamma(dim, FLOAT32_UNIT)) + 4.0 * FLOAT32_UNIT
    return coef * scale * SAFETY + dim * 2.0**-126


def float16_query_scale(query_norm: np.ndarray | float, base_norm_max: float) -> float:
    """A power of two s with s |q| |z| <= 2^14 and s |q| <= 2^14 for every query, so that neither
    the float16 query nor any float16 dot product of the GEMM can overflow (float16 max: 65504)."""
    qmax = float(np.max(query_norm)) if np.size(query_norm) else 0.0
    limit = qmax * max(float(base_norm_max), 1.0)
    if limit <= 0.0 or not math.isfinite(limit):
        return 1.0
    return 2.0 ** math.floor(math.log2(FLOAT16_SAFE_MAX / limit))


def float16_gemm_margin(dim: int, query_norm: np.ndarray, base_norm_max: float, scale: float) -> np.ndarray:
    """Bound on |fast - true| squared distance from a float16 GEMM with float32 accumulation."""
    qn = np.asarray(query_norm, dtype=np.float64) * scale  # |s q|
    zn = float(base_norm_max)
    root = math.sqrt(dim)
    q16n = (1.0 + FLOAT16_UNIT) * qn + FLOAT16_TINY * root  # bound on |q16|
    dot_error = (
        (FLOAT16_UNIT * qn + FLOAT16_TINY * root) * zn  # query rounding
        + gamma(dim, ACCUMULATE_UNIT) * q16n * zn  # float32 accumulation of exact products
        + FLOAT16_TINY * root * q16n  # stored subnormals flushed to zero
        + FLOAT16_UNIT * (1.0 + gamma(dim, ACCUMULATE_UNIT)) * q16n * zn  # float16 output
        + FLOAT16_TINY  # output underflow
    ) / scale
    qsq = (np.asarray(query_norm, dtype=np.float64)) ** 2
    dot = q16n * zn / scale
    # |q|^2 + |z|^2 - 2 q.z in float32 from float32-stored norms: two roundings each, two additions.
    tail = 6.0 * FLOAT32_UNIT * (qsq + zn * zn + 2.0 * dot)
    return (2.0 * dot_error + tail) * SAFETY + dim * 2.0**-126


def round_up_float32(values) -> np.ndarray:
    """The smallest float32 >= each float64 value: thresholds must never shrink when cast."""
    values = np.asarray(values, dtype=np.float64)
    down = values.astype(np.float32)
    return np.where(down.astype(np.float64) < values, np.nextafter(down, np.float32(np.inf)), down)


def check_radius(radius) -> float:
    radius = float(radius)
    if not radius > 0 or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number > 0, got {radius}")
    return radius


def check_k(k) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def check_max_k(max_k) -> int | None:
    if max_k is None:
        return None
    max_k = int(max_k)
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1 or None, got {max_k}")
    return max_k


EMPTY = (np.empty(0, np.int64), np.empty(0, np.float64))


def order_results(ids: np.ndarray, distances: np.ndarray, radius: float | None, k: int | None):
    """Keep ``distances < radius`` (if given), nearest first with ties by id, at most ``k``."""
    order = np.lexsort((ids, distances))
    if radius is not None:
        order = order[distances[order] < radius]
    if k is not None:
        order = order[:k]
    return ids[order].astype(np.int64, copy=False), distances[order].astype(np.float64, copy=False)


def recheck_numpy(query64: np.ndarray, ids: np.ndarray, vectors: np.ndarray, radius: float | None, k: int | None):
    """float64 re-check of one query's candidates (rows of ``vectors``), on the host."""
    if len(ids) == 0:
        return EMPTY
    diff = vectors.astype(np.float64) - query64[None, :]
    return order_results(np.asarray(ids, np.int64), np.sqrt(np.einsum("ij,ij->i", diff, diff)), radius, k)


def recheck_pairs(queries: torch.Tensor, query_index: torch.Tensor, gather, pair_rows: torch.Tensor,
                  max_bytes: int = 1 << 28) -> torch.Tensor:
    """float64 distances of (query, row) pairs, in bounded chunks, on the queries' device.

    ``gather(rows) -> (len(rows), D) tensor`` fetches stored vectors (from device memory or a
    memory-mapped file); ``queries`` is float32 (B, D).
    """
    dim = queries.shape[1]
    step = max(1, max_bytes // (8 * dim))
    out = torch.empty(len(pair_rows), dtype=torch.float64, device=queries.device)
    for start in range(0, len(pair_rows), step):
        rows = gather(pair_rows[start : start + step]).to(queries.device, torch.float64)
        diff = rows - queries[query_index[start : start + step]].to(torch.float64)
        out[start : start + step] = torch.sqrt((diff * diff).sum(1))
    return out


def split_by_query(num_queries: int, query_index: np.ndarray, ids: np.ndarray, distances: np.ndarray,
                   radii: np.ndarray | None, k: int | None):
    """Group re-checked pairs by query; keep < radius, nearest first, ties by id, at most k."""
    out = []
    order = np.argsort(query_index, kind="stable")
    bounds = np.searchsorted(query_index[order], np.arange(num_queries + 1))
    for i in range(num_queries):
        sel = order[bounds[i] : bounds[i + 1]]
        out.append(order_results(ids[sel], distances[sel], None if radii is None else float(radii[i]), k))
    return out


def merge(per_part: list[list[tuple[np.ndarray, np.ndarray]]], k: int | None):
    """Merge each query's (ids, float64 distances) across parts: nearest first, ties by id, at most k."""
    if not per_part:
        return []
    out = []
    for pieces in zip(*per_part):
        ids = np.concatenate([p[0] for p in pieces]).astype(np.int64, copy=False)
        dist = np.concatenate([p[1] for p in pieces]).astype(np.float64, copy=False)
        out.append(order_results(ids, dist, None, k))
    return out


def inclusive_radius(distance: float) -> float:
    """The smallest float64 above ``distance``: a strict < search with it keeps ``distance`` itself."""
    return float(np.nextafter(np.float64(distance), np.float64(np.inf)))


def public(results):
    """(ids int64, float32 distances) pairs, as the shield interface promises."""
    return [(ids.astype(np.int64, copy=False), dist.astype(np.float32)) for ids, dist in results]


# torch's global matmul precision switches are process-wide: hold them for the duration of any
# search GEMM in any thread, and restore them when the last search leaves.
_precision_lock = threading.Lock()
_precision_users = 0
_precision_saved: tuple | None = None


@contextmanager
def full_precision_matmul():
    """float32 GEMMs in IEEE float32 (no TF32 or bf16 shortcuts) and fp16 GEMMs accumulated in
    float32, which the margins above assume. Restores the previous settings afterwards."""
    global _precision_users, _precision_saved
    with _precision_lock:
        if _precision_users == 0:
            _precision_saved = (
                torch.get_float32_matmul_precision(),
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                _cpu_fp16_reduction(None),
            )
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            _cpu_fp16_reduction(False)
        _precision_users += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_users -= 1
            if _precision_users == 0 and _precision_saved is not None:
                torch.set_float32_matmul_precision(_precision_saved[0])
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = _precision_saved[1]
                _cpu_fp16_reduction(_precision_saved[2])
                _precision_saved = None


def _cpu_fp16_reduction(value: bool | None):
    """Read (None) or set torch's CPU switch for reduced-precision fp16 GEMM reductions, where it exists."""
    if not hasattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction"):
        return None
    if value is None:
        return torch._C._get_cpu_allow_fp16_reduced_precision_reduction()
    torch._C._set_cpu_allow_fp16_reduced_precision_reduction(bool(value))
    return value


_fp16_checked: dict = {}


def float16_gemm_accumulates_in_float32(device) -> bool:
    """Probe the device's float16 GEMM: 2048 + 4095 ones is 6143, which float16 rounds to 6144;
    a float16 accumulator stalls at 2048 (2048 + 1 rounds back to 2048). The float16 bound
    assumes float32 accumulation, so a device that fails this is searched in float32."""
    key = str(torch.device(device))
    if key not in _fp16_checked:
        dim = 4096
        a = torch.ones((16, dim), dtype=torch.float16, device=device)
        b = torch.ones((64, dim), dtype=torch.float16, device=device)
        b[:, 0] = 2048
        with full_precision_matmul():
            out = (a @ b.T).to(torch.float32)
        _fp16_checked[key] = bool(torch.all(out == 6144.0))
    return _fp16_checked[key]
