"""Two versions of the ``ivf`` scan on one structure, in one process, alternating batch by batch.

    python benchmarks/ivf_ab.py benchmarks/results/scale-1e7.json --scratch /work/scratch/issue10 \\
        --against b40d86e --out benchmarks/results/ivf-ab-1e7.json

The latencies of separate runs on this shared VM differ by more than most changes to the scan
(the same GEMM took 9.6 to 22.8 s at 10^7 on different hours at similar load; RESULTS.md,
"Scale"), so a change is measured here against ``--against``: that commit's
``indexing/ivf.py`` (``git show``) is imported beside the working tree's, both scans are built on
the very arrays a ``benchmarks/scale.py`` run left under ``--scratch`` (the codes read once,
shared), and every batch is searched by both, in alternating order, ``--rounds`` times: the
median range-search time per radius factor for each, and their answers checked equal (ids and
float64 distances; a difference exits 1). Queries are fresh ones of the scale run's kind
(``make_queries``, another seed), as in ``benchmarks/ivf_profile.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scale import RADIUS_FACTORS, finish, fit_scale_projection, make_queries, structure_dir, synthetic_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_at(commit: str, folder: str):
    """``indexing/ivf.py`` as of ``commit``, imported inside the package (its relative imports
    resolve to the working tree's other modules)."""
    source = subprocess.run(["git", "show", f"{commit}:indexing/ivf.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode != 0:
        raise SystemExit(f"no indexing/ivf.py at {commit}: {source.stderr.strip()}")
    path = os.path.join(folder, "ivf_at_commit.py")
    with open(path, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location("spellshield.indexing._ivf_at_commit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    import spellshield.indexing.ivf as current
    from spellshield.indexing.projected import MemmapStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scale_json", help="a benchmarks/scale.py result (synthetic data) whose structure is under --scratch")
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--against", required=True, metavar="COMMIT", help="the commit whose indexing/ivf.py is compared")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="times each batch is searched by each version")
    parser.add_argument("--seed", type=int, default=0, help="the scale run's --seed")
    parser.add_argument("--fit-sample", type=int, default=10000, help="the scale run's --fit-sample")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    with open(args.scale_json) as f:
        run = json.load(f)
    torch.set_num_threads(run["threads"])
    count, lists = run["n"], run["build"]["lists"]
    path = synthetic_path(args.scratch, count, run["dim"], args.seed)
    out = structure_dir(args.scratch, count, run["dim"], run["dims"], lists, run["code_dtype"])
    commit = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as folder:
        before = module_at(args.against, folder)
        with current.NpyRows(path) as reader:
            projection = fit_scale_projection(reader, run["dims"], args.fit_sample, args.seed)
        meta = current.read_ivf(out)
        load = lambda name: np.load(os.path.join(out, name))  # noqa: E731
        codes = current.read_codes(os.path.join(out, "codes.npy"), current.head_dims(run["dims"]))
        parts = (projection, load("centroids.npy"), load("offsets.npy"), load("rows.npy"), codes, load("radii.npy"),
                 meta["eps"], meta["stored_error"], MemmapStore(np.load(path, mmap_mode="r"), None, "cpu"))
        scans = {"before": before.IvfScan(*parts), "now": current.IvfScan(*parts)}
        queries = make_queries(path, count, args.batches, run["batch"], run["radius"], np.random.default_rng(args.seed + 7))
        for scan in scans.values():  # warm-up, not timed
            scan.range_search64(torch.from_numpy(queries[0]), np.full(run["batch"], run["radius"]))
        result = {"scale_run": os.path.basename(args.scale_json), "n": count, "lists": lists, "radius": run["radius"],
                  "against": commit, "batches": args.batches, "rounds": args.rounds,
                  "load_average_start": os.getloadavg(), "rows": []}
        for factor in RADIUS_FACTORS:
            radii = np.full(run["batch"], run["radius"] * factor)
            seconds = {name: [] for name in scans}
            for turn in range(args.rounds * args.batches):
                q = torch.from_numpy(queries[turn % args.batches])
                answers = {}
                for name in (("before", "now") if turn % 2 == 0 else ("now", "before")):
                    start = time.perf_counter()
                    found = scans[name].range_search64(q, radii)
                    seconds[name].append(time.perf_counter() - start)
                    answers[name] = [(ids.tolist(), d.tolist()) for ids, d in found]
                if answers["before"] != answers["now"]:
                    print(f"{commit} and the working tree found other hits (r x {factor:g}, batch {turn % args.batches})",
                          file=sys.stderr)
                    return 1
            row = {"radius_factor": factor, **{f"{name}_ms": 1e3 * float(np.median(v)) for name, v in seconds.items()}}
            row["speedup"] = row["before_ms"] / row["now_ms"]
            result["rows"].append(row)
            print(f"r x {factor:g}: {commit} {row['before_ms']:.0f} ms, now {row['now_ms']:.0f} ms per batch "
                  f"(x {row['speedup']:.2f}; {len(seconds['now'])} searches each, the same hits)", flush=True)
    return finish(result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
