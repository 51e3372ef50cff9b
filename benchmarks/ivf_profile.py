"""Where the ``ivf`` backend's per-batch time goes, on a structure ``benchmarks/scale.py`` built.

    python benchmarks/ivf_profile.py benchmarks/results/scale-1e6.json --scratch /work/scratch/issue10 \\
        --out benchmarks/results/ivf-profile-1e6.json

Reopens the vectors and the inverted file a ``scale.py`` run left under ``--scratch`` (the same
PCA projection, refitted from the same seeded draw), makes fresh queries of the same kind
(``make_queries``, another seed) and, at each radius factor, splits ``IvfScan.candidates``
into its steps, timed alone on the same batches: projecting and probing (the bounds), reading
the probed codes (a slice, or a gather, upcast to float32), the GEMM, and the rest (distances,
thresholds, the per-query list mask); with ``--chunk-rows A B ...`` once per block size of
that scan, the candidates checked equal. It also counts the rows the batch scans: the union of the
lists its 16 queries probe (``candidates`` does one GEMM over that union, masked per query)
against the sum of each query's own lists, the two ways of organising the scan. With
``--head-dims K ...`` the scan's first pass (``indexing.ivf.head_dims``) is measured on K leading
coordinates, the codes split in RAM after them as the shield holds them, the range search's
answers checked equal across heads, and the rows that pass the first pass counted; the step
times above are then those of the first pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scale import (RADIUS_FACTORS, check_reproduces, finish, fit_scale_projection, make_queries,  # noqa: E402
                   structure_dir, synthetic_path)


def main(argv=None) -> int:
    from spellshield.indexing.exactness import full_precision_matmul
    from spellshield.indexing.ivf import IvfScan, NpyRows, block_rows, head_dims, read_codes, read_ivf
    from spellshield.indexing.projected import MemmapStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scale_json", help="a benchmarks/scale.py result (synthetic data) whose structure is under --scratch")
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="the scale run's --seed")
    parser.add_argument("--fit-sample", type=int, default=10000, help="the scale run's --fit-sample")
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=None, metavar="ROWS",
                        help="rows of codes per block of the scan (default: the backend's own, indexing.ivf.block_rows); "
                        "several: each measured on the same batches, candidates checked equal")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None, metavar="K",
                        help="coordinates of the scan's first pass (default: the backend's own, indexing.ivf.head_dims; "
                        "d: one pass); several: each measured on the same batches, the range search's answers checked equal")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    with open(args.scale_json) as f:
        run = json.load(f)
    torch.set_num_threads(run["threads"])
    count, dim, lists = run["n"], run["dim"], run["build"]["lists"]
    path = synthetic_path(args.scratch, count, dim, args.seed)
    out = structure_dir(args.scratch, count, dim, run["dims"], lists, run["code_dtype"])
    projection = fit_scale_projection(NpyRows(path), run["dims"], args.fit_sample, args.seed)
    meta = read_ivf(out)
    check_reproduces(projection, out, path, meta)  # or the profile would measure another structure
    load = lambda name: np.load(os.path.join(out, name))  # noqa: E731

    def open_scan(head: int) -> IvfScan:
        """The scan as IvfShield opens it, its codes split in RAM after ``head`` coordinates."""
        scan = IvfScan(projection, load("centroids.npy"), load("offsets.npy"), load("rows.npy"),
                       read_codes(os.path.join(out, "codes.npy"), head), load("radii.npy"), meta["eps"],
                       meta["stored_error"], MemmapStore(np.load(path, mmap_mode="r"), None, "cpu"))
        scan.head_dims = head
        return scan

    scan = open_scan(head_dims(run["dims"]))
    radius = run["radius"]
    queries = make_queries(path, count, args.batches, run["batch"], radius, np.random.default_rng(args.seed + 7))
    result = {"scale_run": os.path.basename(args.scale_json), "n": count, "lists": lists, "radius": radius,
              "batches": args.batches, "batch": run["batch"], "load_average_start": os.getloadavg(), "rows": []}
    scan.range_search64(torch.from_numpy(queries[0]), np.full(run["batch"], radius))  # warm-up, not timed

    sizes = args.chunk_rows or [block_rows(scan.dims, "cpu")]
    heads = args.head_dims or [head_dims(scan.dims)]
    answers = {}  # (head, radius factor, batch) -> candidate pairs: the same whatever the block size
    results = {}  # (radius factor, batch) -> the range search's answers: the same whatever the head and block size
    for chunk_rows, head in [(c, k) for c in sizes for k in heads]:
        if scan.head_dims != head:
            scan = open_scan(head)
        scan.chunk_rows = chunk_rows
        step = chunk_rows if head == scan.dims else block_rows(head, "cpu")
        for factor in RADIUS_FACTORS:
            radii = np.full(run["batch"], radius * factor)
            ms = {k: [] for k in ("probe", "read_codes", "gemm", "candidates", "range_search")}
            union_rows, own_rows, head_rows = [], [], []
            for b in range(args.batches):
                q = torch.from_numpy(queries[b])
                t0 = time.perf_counter()
                p64, t = scan.project_queries(q, radii)
                keep = scan.probe(p64.cpu().numpy(), t)
                ms["probe"].append(time.perf_counter() - t0)
                blocks = list(scan._blocks(np.flatnonzero(keep.any(0)), step))  # the union's rows, as ``candidates`` makes them
                union_rows.append(sum(len(pos) for pos, _ in blocks))
                own_rows.append(int(sum(scan.sizes[row].sum() for row in keep)))
                p32 = p64.to(torch.float32)[:, :head].contiguous()
                read = gemm = 0.0
                upcast, dots = torch.empty((step, head)), torch.empty(len(p32) * step)  # reused, as in ``candidates``
                with full_precision_matmul():  # the first pass: reading ``head`` coordinates of the union's codes, the GEMM
                    for pos, _ in blocks:
                        t0 = time.perf_counter()
                        block = upcast[:len(pos)]
                        block.copy_(scan._codes_at(pos, head))
                        t1 = time.perf_counter()
                        torch.mm(block, p32.T, out=dots[:len(p32) * len(pos)].view(len(pos), len(p32)))
                        read, gemm = read + t1 - t0, gemm + time.perf_counter() - t1
                    # rows some query keeps after the first pass (its own lists, its head distance)
                    test = scan._pass(p64.to(torch.float32), head, scan._head_norms(), np.asarray(t, np.float64) ** 2)
                    head_rows.append(sum(int((torch.from_numpy(keep.T[owner]) & test(pos)).any(1).sum()) for pos, owner in blocks))
                ms["read_codes"].append(read)
                ms["gemm"].append(gemm)
                t0 = time.perf_counter()
                found = scan.candidates(q, radii)
                ms["candidates"].append(time.perf_counter() - t0)
                pairs = sorted(zip(found[0].tolist(), found[1].tolist()))
                if answers.setdefault((head, factor, b), pairs) != pairs:
                    print(f"blocks of {chunk_rows} rows found other candidates than blocks of {sizes[0]} (head {head}, "
                          f"r x {factor:g}, batch {b})", file=sys.stderr)
                    return 1
                t0 = time.perf_counter()
                got = scan.range_search64(q, radii)
                ms["range_search"].append(time.perf_counter() - t0)
                got = [(ids.tolist(), d.tolist()) for ids, d in got]
                if results.setdefault((factor, b), got) != got:
                    print(f"a first pass on {head} coordinates found other hits than on {heads[0]} (r x {factor:g}, batch {b})",
                          file=sys.stderr)
                    return 1
            row = {"chunk_rows": chunk_rows, "head_dims": head, "radius_factor": factor, **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in ms.items()},
                   "union_rows_per_batch": float(np.mean(union_rows)), "union_share": float(np.mean(union_rows)) / count,
                   "own_rows_per_batch": float(np.mean(own_rows)), "own_share_per_query": float(np.mean(own_rows)) / count / run["batch"],
                   "head_survivors_per_batch": float(np.mean(head_rows)), "head_survivor_share": float(np.mean(head_rows)) / count}
            row["rest_ms"] = row["candidates_ms"] - row["probe_ms"] - row["read_codes_ms"] - row["gemm_ms"]
            result["rows"].append(row)
            print(f"blocks of {chunk_rows} rows, head {head}, r x {factor:g}: range_search {row['range_search_ms']:.0f} ms = candidates {row['candidates_ms']:.0f} "
                  f"(probe {row['probe_ms']:.0f}, read codes {row['read_codes_ms']:.0f}, GEMM {row['gemm_ms']:.0f}, "
                  f"rest {row['rest_ms']:.0f}) + re-check; scans {row['union_rows_per_batch']:,.0f} rows "
                  f"({100 * row['union_share']:.1f}% of N) for the batch's union, the queries' own lists "
                  f"{row['own_rows_per_batch']:,.0f} ({100 * row['own_share_per_query']:.1f}% of N each); "
                  f"{row['head_survivors_per_batch']:,.0f} rows pass the first pass", flush=True)
    return finish(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
