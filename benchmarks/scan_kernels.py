"""The ``ivf`` scan's per-block kernels, each timed alone on random data in RAM, in the ways the
scan could be written: which layout and which steps ``indexing.ivf.IvfScan`` uses, and why.

    python benchmarks/scan_kernels.py --out benchmarks/results/scan-kernels.json

For a block of ``--rows`` codes (float16 in RAM, as the shield holds them) and a batch of
``--batch`` queries, on ``--dims`` coordinates (the head pass's 64 and all 256):

- ``upcast``: the float16 -> float32 copy into a reused buffer (the block from cache);
- ``gemm_queries_by_rows``: ``torch.mm(p, c.T)``, a (B, rows) result, then ``distances_in_place``:
  ``|p|^2 + |c|^2 - 2 p.c`` summed in place, ``test_queries_by_rows`` (the threshold test) and
  ``any_queries_by_rows`` (the rows some query keeps): the scan before 3 December, second session;
- ``gemm_rows_by_queries``: ``torch.mm(c, p.T)``, a (rows, B) result; ``addmm_rows_by_queries``:
  ``|c|^2 - 2 c.p`` in the same call (``torch.addmm``, |p|^2 moved to the threshold), then
  ``test_rows_by_queries`` and the rows kept, by torch's ``any(1)`` (``any_rows_by_queries``) or
  by reading each row's B bools as int64 words (``words_rows_by_queries``,
  ``indexing.ivf.rows_any``): the scan now. ``before`` and ``now`` sum the steps of each.

And the probe's Voronoi bound at ``--lists`` centroids of d = 256 with 8 nearest centroids per
query: the centroid gaps as one batched (B, 8, lists) float64 product (before) and as one 2-D
product over the distinct nearest centroids (now), one BLAS thread as the probe runs.
The tests run on the true distances with thresholds that keep 0.2% of the pairs. Times are the
best of ``--repeats`` rounds of ``--loops`` calls: kernels, not the scan (the scan's own figures:
benchmarks/scale.py and benchmarks/ivf_profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def best_ms(fn, loops: int, repeats: int) -> float:
    """The best of ``repeats`` rounds of the mean time of ``loops`` calls, in ms (after one warm call)."""
    fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        rounds.append((time.perf_counter() - start) / loops * 1e3)
    return min(rounds)


def block_kernels(rows: int, dims: int, batch: int, loops: int, repeats: int) -> dict:
    from spellshield.indexing.ivf import rows_any

    rng = np.random.default_rng(0)
    stored = torch.from_numpy(rng.standard_normal((rows, dims)).astype(np.float16))
    codes = torch.empty(rows, dims)
    codes.copy_(stored)
    p = torch.from_numpy(rng.standard_normal((batch, dims)).astype(np.float32))
    zsq, qsq = (codes.double() ** 2).sum(1).float(), (p.double() ** 2).sum(1).float()
    # the tests on the true distances, thresholds keeping 0.2% of the pairs (3% of the rows pass the
    # head pass at r at 10^7, a handful at r/2 and below)
    distances = qsq[:, None] + zsq[None, :] - 2.0 * (p @ codes.T)  # (B, rows)
    thr = torch.quantile(distances, 0.002, dim=1)
    moved = (distances - qsq[:, None]).T.contiguous()  # (rows, B): |c|^2 - 2 c.p, the threshold minus |p|^2
    thr_moved = thr - qsq
    by_rows, by_queries = torch.empty(batch, rows), torch.empty(rows, batch)
    mask_by_rows, mask_by_queries = distances <= thr[:, None], moved <= thr_moved[None, :]
    ms = {
        "upcast": best_ms(lambda: codes.copy_(stored), loops, repeats),
        "gemm_queries_by_rows": best_ms(lambda: torch.mm(p, codes.T, out=by_rows), loops, repeats),
        "distances_in_place": best_ms(lambda: by_rows.mul_(-2.0).add_(zsq[None, :]).add_(qsq[:, None]), loops, repeats),
        "test_queries_by_rows": best_ms(lambda: distances <= thr[:, None], loops, repeats),
        "any_queries_by_rows": best_ms(lambda: mask_by_rows.any(0), loops, repeats),
        "gemm_rows_by_queries": best_ms(lambda: torch.mm(codes, p.T, out=by_queries), loops, repeats),
        "addmm_rows_by_queries": best_ms(lambda: torch.addmm(zsq[:, None], codes, p.T, alpha=-2.0, out=by_queries), loops, repeats),
        "test_rows_by_queries": best_ms(lambda: moved <= thr_moved[None, :], loops, repeats),
        "any_rows_by_queries": best_ms(lambda: mask_by_queries.any(1), loops, repeats),
        "words_rows_by_queries": best_ms(lambda: rows_any(mask_by_queries), loops, repeats),
    }
    ms["before"] = sum(ms[k] for k in ("gemm_queries_by_rows", "distances_in_place", "test_queries_by_rows", "any_queries_by_rows"))
    ms["now"] = sum(ms[k] for k in ("addmm_rows_by_queries", "test_rows_by_queries", "words_rows_by_queries"))
    return {"rows": rows, "dims": dims, "batch": batch, "ms": ms,
            "gflops": {k: 2.0 * rows * dims * batch / (ms[k] * 1e6) for k in ("gemm_queries_by_rows", "gemm_rows_by_queries")}}


def gap_kernels(lists: int, batch: int, neighbours: int, loops: int, repeats: int) -> dict:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(1)
    centroids = rng.standard_normal((lists, 256)).astype(np.float32).astype(np.float64)
    near = rng.integers(0, lists, (batch, neighbours))
    centres = np.unique(near)
    with threadpool_limits(1, "blas"):
        ms = {"batched": best_ms(lambda: centroids[near] @ centroids.T, loops, repeats),
              "distinct_2d": best_ms(lambda: centroids[centres] @ centroids.T, loops, repeats)}
    return {"lists": lists, "batch": batch, "neighbours": neighbours, "distinct_centres": len(centres), "ms": ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384, help="codes per block (the CPU scan's head-pass block at d = 64)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lists", type=int, default=8192, help="centroids for the probe's gaps (the 10^7 structure's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loops", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "load_average_start": os.getloadavg(),
              "blocks": [block_kernels(args.rows, d, args.batch, args.loops, args.repeats) for d in args.dims],
              "gaps": gap_kernels(args.lists, args.batch, 8, max(1, args.loops // 10), args.repeats)}
    result["load_average_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    for block in result["blocks"]:
        ms = block["ms"]
        print(f"{block['rows']} rows x {block['dims']} dims, batch {block['batch']}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()) + " ms", flush=True)
    gaps = result["gaps"]
    print(f"Voronoi gaps at {gaps['lists']} lists ({gaps['distinct_centres']} distinct nearest centroids): "
          f"batched {gaps['ms']['batched']:.1f} ms, distinct 2-D {gaps['ms']['distinct_2d']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
