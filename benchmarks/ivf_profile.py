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
against the sum of each query's own lists, the two ways of organising the scan.
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

from scale import RADIUS_FACTORS, NpyRows, fit_scale_projection, make_queries, structure_dir, synthetic_path  # noqa: E402


def main(argv=None) -> int:
    from spellshield.indexing.exactness import full_precision_matmul
    from spellshield.indexing.ivf import IvfScan, block_rows, read_ivf
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
    load = lambda name: np.load(os.path.join(out, name))  # noqa: E731
    scan = IvfScan(projection, load("centroids.npy"), load("offsets.npy"), load("rows.npy"), load("codes.npy"),
                   load("radii.npy"), meta["eps"], meta["stored_error"], MemmapStore(np.load(path, mmap_mode="r"), None, "cpu"))
    # The refitted projection must be the one the structure was built with: |c_z - P(z - m)| <= E
    # (the stored error bound, ivf module doc) on a few stored rows, or the profile would measure
    # another structure.
    sample = np.asarray(scan.rows[:64])
    p64 = scan._project64(torch.from_numpy(np.asarray(np.load(path, mmap_mode="r")[sample], np.float32)))
    off = np.linalg.norm(p64 - np.asarray(scan.codes[:64], np.float64), axis=1).max()
    if off > meta["stored_error"] * (1 + 1e-6):
        parser.error(f"the projection refitted from seed {args.seed} does not reproduce the codes in {out} "
                     f"(off by {off:.3g} > {meta['stored_error']:.3g}): give the scale run's --seed and --fit-sample")
    radius = run["radius"]
    queries = make_queries(path, count, args.batches, run["batch"], radius, np.random.default_rng(args.seed + 7))
    result = {"scale_run": os.path.basename(args.scale_json), "n": count, "lists": lists, "radius": radius,
              "batches": args.batches, "batch": run["batch"], "load_average_start": os.getloadavg(), "rows": []}
    scan.range_search64(torch.from_numpy(queries[0]), np.full(run["batch"], radius))  # warm-up, not timed

    sizes = args.chunk_rows or [block_rows(scan.dims, "cpu")]
    answers = {}  # (radius factor, batch) -> candidate pairs: the same whatever the block size
    for chunk_rows in sizes:
        scan.chunk_rows = chunk_rows
        for factor in RADIUS_FACTORS:
            radii = np.full(run["batch"], radius * factor)
            ms = {k: [] for k in ("probe", "read_codes", "gemm", "candidates", "range_search")}
            union_rows, own_rows = [], []
            for b in range(args.batches):
                q = torch.from_numpy(queries[b])
                t0 = time.perf_counter()
                p64, t = scan.project_queries(q, radii)
                keep = scan.probe(p64.cpu().numpy(), t)
                ms["probe"].append(time.perf_counter() - t0)
                positions = scan._positions(np.flatnonzero(keep.any(0)))
                union_rows.append(len(positions))
                own_rows.append(int(sum(scan.sizes[row].sum() for row in keep)))
                p32 = p64.to(torch.float32)
                read = gemm = 0.0
                with full_precision_matmul():
                    for start in range(0, len(positions), scan.chunk_rows):
                        t0 = time.perf_counter()
                        block = scan._codes_at(positions[start:start + scan.chunk_rows])
                        t1 = time.perf_counter()
                        p32 @ block.T
                        read, gemm = read + t1 - t0, gemm + time.perf_counter() - t1
                ms["read_codes"].append(read)
                ms["gemm"].append(gemm)
                t0 = time.perf_counter()
                found = scan.candidates(q, radii)
                ms["candidates"].append(time.perf_counter() - t0)
                pairs = sorted(zip(found[0].tolist(), found[1].tolist()))
                if answers.setdefault((factor, b), pairs) != pairs:
                    print(f"blocks of {chunk_rows} rows found other candidates than blocks of {sizes[0]} (r x {factor:g}, "
                          f"batch {b})", file=sys.stderr)
                    return 1
                t0 = time.perf_counter()
                scan.range_search64(q, radii)
                ms["range_search"].append(time.perf_counter() - t0)
            row = {"chunk_rows": chunk_rows, "radius_factor": factor, **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in ms.items()},
                   "union_rows_per_batch": float(np.mean(union_rows)), "union_share": float(np.mean(union_rows)) / count,
                   "own_rows_per_batch": float(np.mean(own_rows)), "own_share_per_query": float(np.mean(own_rows)) / count / run["batch"]}
            row["rest_ms"] = row["candidates_ms"] - row["probe_ms"] - row["read_codes_ms"] - row["gemm_ms"]
            result["rows"].append(row)
            print(f"blocks of {chunk_rows} rows, r x {factor:g}: range_search {row['range_search_ms']:.0f} ms = candidates {row['candidates_ms']:.0f} "
                  f"(probe {row['probe_ms']:.0f}, read codes {row['read_codes_ms']:.0f}, GEMM {row['gemm_ms']:.0f}, "
                  f"rest {row['rest_ms']:.0f}) + re-check; scans {row['union_rows_per_batch']:,.0f} rows "
                  f"({100 * row['union_share']:.1f}% of N) for the batch's union, the queries' own lists "
                  f"{row['own_rows_per_batch']:,.0f} ({100 * row['own_share_per_query']:.1f}% of N each)", flush=True)
    result["load_average_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
