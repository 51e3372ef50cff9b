"""The ``ivf`` backend at scale on synthetic latents with the spectrum of real TAEF2 CIFAR-10 latents.

    nice -n 10 python benchmarks/scale.py --n 1000000 --scratch /work/scratch/issue10 \
        --out benchmarks/results/scale-1e6.json
    SPELLSHIELD_SHARED=/work/shared nice -n 10 python benchmarks/scale.py --cifar-taef2 50000 --lists 512 \
        --scratch /work/scratch/issue10 --out benchmarks/results/scale-cifar-taef2-50k.json

Data: ``benchmarks/synthetic_latents.py`` streams N vectors (D = 2,048, float16, the real
latents' PCA variances, 10% near-duplicate rows) into a memory-mapped .npy under ``--scratch``
(reused when present). Or real latents: ``--cifar-taef2 N`` encodes the first N CIFAR-10 training
images with the TAEF2 at 64 px (``benchmarks/search.py``'s encoding and cache, kept under
``--scratch``); ``--vectors`` takes any (N, D) .npy. The radius is the index's suggested one:
half the median 1-NN distance of 200 corpus vectors (self excluded), from a streaming float32 scan.

Queries, like a sampler's x0_hat, in ``--batches`` batches of ``--batch``: half are corpus
vectors moved by 10-50% of the radius (each has hits), half midpoints of two corpus vectors.
The truth for every query is a streaming float32 scan of all N, widened by 1%, decided in
float64: recall and precision of the backend are measured against it on every batch.

Build: the PCA projection (``--dims``) fitted on 10,000 vectors, then ``indexing.ivf.build_ivf``
streaming the vectors (read with ``pread``, not memory-mapped, so that the peak RSS is the
build's own memory); wall time and peak RSS (VmHWM, reset before the phase).
Search: codes in memory, full vectors memory-mapped; per batch the latency (median over the
batches, after one warm-up batch), lists probed and candidates per query (``stats``), peak RSS of
the search phase. Then the same at 1/2, 1/4 and 1/8 of the radius: how the probed fraction depends
on the radius, which the data's geometry decides.

Baseline, in the same run: a plain float32 GEMM scan of all N vectors for one batch (the file
read in chunks, upcast to float32, ``|q|^2 + |z|^2 - 2 q.z`` with the norms computed beforehand,
threshold): the ``exact`` backend's CPU path for float16 storage, the work every current backend
does per batch; its wall time, and its arithmetic alone (what it costs with the vectors in RAM).
The machine's load average is recorded at start, after every phase and at the end; the JSON is
rewritten after every phase, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from synthetic_latents import generate  # noqa: E402

SCAN_BYTES = 256 << 20  # float16 bytes read per chunk of the streaming scans
RADIUS_FACTORS = (1.0, 0.5, 0.25, 0.125)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def proc_status_gb(*keys: str) -> dict:
    """Memory fields of /proc/self/status (kB there), in GB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in keys:
                out[key] = int(line.split()[1]) / 2**20
    return out


def peak_rss_gb() -> float:
    return proc_status_gb("VmHWM").get("VmHWM", float("nan"))


def memory_gb() -> dict:
    """The process's resident memory now, in GB: all of it, and its anonymous (heap) and
    file-backed (mapped file pages) parts."""
    return proc_status_gb("VmRSS", "RssAnon", "RssFile")


def scan(path: str, fn) -> None:
    """Call ``fn(start, float32 block)`` over the vectors of a .npy, read in chunks (no memory map)."""
    array = np.load(path, mmap_mode="r")
    count, dim = array.shape
    offset, dtype = array.offset, array.dtype
    del array
    step = max(1, SCAN_BYTES // (dim * dtype.itemsize))
    with open(path, "rb") as f:
        for start in range(0, count, step):
            rows = min(step, count - start)
            f.seek(offset + start * dim * dtype.itemsize)
            block = np.fromfile(f, dtype=dtype, count=rows * dim).reshape(rows, dim)
            fn(start, torch.from_numpy(block).to(torch.float32))  # torch's conversion (numpy's float16 one is slow)


def finish(result: dict, out: str | None) -> int:
    """The end of a script that measures on a scale run's structure (``ivf_profile.py``,
    ``ivf_ab.py``): the load average recorded, the JSON written whole or not at all; exit 0."""
    from spellshield.indexing.manifest import write_json_atomic

    result["load_average_end"] = os.getloadavg()
    if out:
        write_json_atomic(out, result)
    return 0


def synthetic_path(scratch: str, count: int, dim: int, seed: int) -> str:
    """Where the run's synthetic vectors are written (and found again by later runs)."""
    return os.path.join(scratch, f"synthetic-{count}x{dim}-s{seed}.npy")


def structure_dir(scratch: str, count: int, dim: int, dims: int, lists: int, code_dtype: str) -> str:
    """Where the run's inverted file is built (benchmarks/ivf_profile.py opens it there)."""
    return os.path.join(scratch, f"ivf-{count}x{dim}-d{dims}-l{lists}-{code_dtype}")


def fit_scale_projection(reader, dims: int, fit_sample: int, seed: int, rng=None):
    """The run's PCA projection, fitted on ``fit_sample`` rows of ``reader`` (an
    ``indexing.ivf.NpyRows``) drawn by ``rng`` (the run's generator, ``default_rng(seed + 1)``,
    whose first draw this is): deterministic, so that benchmarks/ivf_profile.py refits the very
    projection the structure was built with."""
    from spellshield.indexing.projected import fit_projection

    rng = np.random.default_rng(seed + 1) if rng is None else rng
    count, dim = reader.shape
    fit_rows = np.sort(rng.choice(count, size=min(fit_sample, count), replace=False))
    return fit_projection(torch.from_numpy(reader[fit_rows].astype(np.float32)), min(dims, dim), seed)


def check_reproduces(projection, structure: str, path: str, meta: dict, rows: int = 64) -> None:
    """Exit unless ``projection`` is the one ``structure`` was built with: |c_z - P(z - m)| <= E
    (the stored error bound, ivf module doc) on its first stored rows; else a run would measure
    another structure than it names."""
    from spellshield.indexing.projected import project

    sample = np.load(os.path.join(structure, "rows.npy"), mmap_mode="r")[:rows]
    vectors = torch.from_numpy(np.asarray(np.load(path, mmap_mode="r")[np.asarray(sample)], np.float32))
    p64 = project(vectors, torch.from_numpy(projection.basis).to(torch.float64),
                  torch.from_numpy(projection.mean).to(torch.float64)).numpy()
    codes = np.asarray(np.load(os.path.join(structure, "codes.npy"), mmap_mode="r")[:rows], np.float64)
    off = float(np.linalg.norm(p64 - codes, axis=1).max())
    if off > meta["stored_error"] * (1 + 1e-6):
        print(f"the projection refitted from this run's seed does not reproduce the codes in {structure} (off by "
              f"{off:.3g} > {meta['stored_error']:.3g}): give the --seed and --fit-sample it was built with", file=sys.stderr)
        raise SystemExit(2)


def gemm_sq(q: torch.Tensor, block: torch.Tensor, block_sq: torch.Tensor | None = None) -> torch.Tensor:
    block_sq = (block * block).sum(1) if block_sq is None else block_sq
    return (q * q).sum(1)[:, None] + block_sq[None, :] - 2.0 * (q @ block.T)


def suggested_radius(path: str, count: int, rng, norms: list) -> tuple[float, float]:
    """Half the median 1-NN distance of 200 corpus vectors, self excluded; and that median. The
    vectors' squared norms are appended to ``norms`` (the GEMM baseline's, computed in this pass)."""
    rows = np.sort(rng.choice(count, size=min(200, count - 1), replace=False))
    sample = torch.from_numpy(np.asarray(np.load(path, mmap_mode="r")[rows], np.float32))
    best = torch.full((len(rows),), math.inf, dtype=torch.float64)

    def step(start, block):
        norms.append((block * block).sum(1))
        d2 = gemm_sq(sample, block, norms[-1])
        own = torch.from_numpy(rows[(rows >= start) & (rows < start + len(block))])
        if len(own):  # self excluded
            d2[torch.searchsorted(torch.from_numpy(rows), own), own - start] = math.inf
        best.copy_(torch.minimum(best, d2.min(1).values.to(torch.float64)))

    scan(path, step)
    median = float(np.median(np.sqrt(best.clamp_min(0).numpy())))
    return 0.5 * median, median


def make_queries(path: str, count: int, batches: int, batch: int, radius: float, rng) -> np.ndarray:
    vectors = np.load(path, mmap_mode="r")
    dim = vectors.shape[1]
    out = []
    for _ in range(batches):
        half = batch // 2
        pick = np.sort(rng.choice(count, size=batch + batch - half, replace=False))
        rng.shuffle(pick)
        base = np.asarray(vectors[np.sort(pick[:half])], np.float64)
        noise = rng.standard_normal((half, dim))
        noise *= (rng.uniform(0.1, 0.5, half) * radius / np.linalg.norm(noise, axis=1))[:, None]
        a = np.asarray(vectors[np.sort(pick[half:batch])], np.float64)
        b = np.asarray(vectors[np.sort(pick[batch:])], np.float64)
        out.append(np.concatenate([base + noise, 0.5 * (a + b)]).astype(np.float32))
    return np.stack(out)


def truth(path: str, queries: np.ndarray, radius: float) -> list[dict]:
    """Every stored vector strictly within ``radius`` of each query, with its float64 distance."""
    q = torch.from_numpy(queries)
    pairs = []

    def step(start, block):
        d2 = gemm_sq(q, block)
        qi, row = torch.nonzero(d2 <= (1.01 * radius) ** 2, as_tuple=True)  # 2% wider than any float32 error
        pairs.append((qi.numpy(), row.numpy() + start))

    scan(path, step)
    qi = np.concatenate([p[0] for p in pairs])
    rows = np.concatenate([p[1] for p in pairs])
    vectors = np.load(path, mmap_mode="r")
    out = [{} for _ in range(len(queries))]
    for i, r in zip(qi, rows):
        diff = np.asarray(vectors[r], np.float64) - queries[i].astype(np.float64)
        distance = math.sqrt(float(diff @ diff))
        if distance < radius:
            out[i][int(r)] = distance
    return out


def gemm_baseline(path: str, q: np.ndarray, radius: float, norms: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Seconds of a plain float32 GEMM scan of every vector for one batch (median of ``repeats``):
    the ``exact`` backend's CPU path for float16 storage (chunks read and upcast, norms computed
    beforehand); and of its arithmetic alone (the GEMM and threshold, without reading the file),
    which is what the scan costs when the vectors are in memory."""
    qt = torch.from_numpy(q)
    qsq = (qt * qt).sum(1)[:, None]
    walls, computes = [], []
    for _ in range(repeats):
        hits, compute = [], [0.0]

        def step(start, block):
            t0 = time.perf_counter()
            d2 = qsq + norms[None, start:start + len(block)] - 2.0 * (qt @ block.T)
            hits.append(torch.nonzero(d2 < radius * radius))
            compute[0] += time.perf_counter() - t0

        started = time.perf_counter()
        scan(path, step)
        walls.append(time.perf_counter() - started)
        computes.append(compute[0])
    return float(np.median(walls)), float(np.median(computes))


def tables(paths: list[str]) -> str:
    """The RESULTS.md rows of the scale JSON files (phases a stopped run did not reach are '-'),
    and, given exactly two files, the growth from the first's N to the second's."""
    runs = [json.load(open(p)) for p in paths]
    label = lambda d: "synthetic" if "synthetic" in d["data"] else "real TAEF2" if "taef2" in d["data"].lower() else "real"  # noqa: E731
    fmt = lambda v, f="{:,.0f}": "-" if v is None else f.format(v)  # noqa: E731
    out = ["| data | N | lists | r | r x | lists probed / query (share) | candidates / query | hits | recall | precision "
           "| ms / batch | GEMM scan ms / batch (arithmetic alone) | ivf / GEMM |", "|---" * 13 + "|"]
    for d in runs:
        lists = (d.get("build") or {}).get("lists")
        gemm = fmt(d.get("gemm_scan_ms")) + (f" ({d['gemm_compute_ms']:,.0f})" if "gemm_compute_ms" in d else "")
        for r in d.get("search") or []:
            out.append(f"| {label(d)} | {d['n']:,} | {lists} | {d['radius']:.2f} "
                       f"| {r['radius_factor']:g} | {r['lists_per_query']:.0f} ({100 * r['probed_fraction']:.1f}%) "
                       f"| {r['candidates_per_query']:.1f} | {fmt(r.get('hits'))} | {fmt(r.get('recall'), '{:g}')} "
                       f"| {fmt(r.get('precision'), '{:g}')} | {r['median_ms']:,.0f} | {gemm} | {r['vs_gemm_scan']:.2f} |")
    out += ["", "| N | build (s) | build peak RSS (GB) | structure on disk | open, sha256 included (s) | search peak RSS (GB) "
                "| load average start / after the search / end |", "|---" * 7 + "|"]
    for d in runs:
        b = d.get("build") or {}
        end = d.get("load_average_end") or d.get("load_average_now") or [None]
        searched = (d.get("load_average_after") or {}).get("search") or [None]  # older files: '-'
        real = "" if label(d) == "synthetic" else f" ({label(d)})"
        out.append(f"| {d['n']:,}{real} | {fmt(b.get('seconds'))} | {fmt(b.get('peak_rss_gb'), '{:.2f}')} "
                   f"| {fmt(b['structure_gb'] * 1024 if b else None)} MB | {fmt(d.get('open_s'), '{:.1f}')} "
                   f"| {fmt(d.get('search_peak_rss_gb'), '{:.2f}')} | {d['load_average_start'][0]:.0f} / {fmt(searched[0])} / {fmt(end[0])} |")
    first, last = runs[0], runs[-1]
    if len(runs) == 2 and first.get("search") and last.get("search"):
        out.append("")
        for a, b in zip(first["search"], last["search"]):
            out.append(f"- r x {a['radius_factor']:g}, N x {last['n'] / first['n']:g}: time x {b['median_ms'] / a['median_ms']:.1f}, "
                       f"lists probed x {b['lists_per_query'] / a['lists_per_query']:.1f}, candidates x "
                       f"{b['candidates_per_query'] / max(a['candidates_per_query'], 1e-9):.1f}")
    if len(runs) == 2 and "search_peak_rss_gb" in first and "search_peak_rss_gb" in last:
        out.append(f"- build time x {last['build']['seconds'] / first['build']['seconds']:.1f}, build peak RSS x "
                   f"{last['build']['peak_rss_gb'] / first['build']['peak_rss_gb']:.1f}, search peak RSS x "
                   f"{last['search_peak_rss_gb'] / first['search_peak_rss_gb']:.1f}")
    return "\n".join(out)


def main(argv=None) -> int:
    from spellshield.indexing.ivf import IvfScan, NpyRows, build_ivf, default_lists, head_dims, read_codes, read_ivf
    from spellshield.indexing.manifest import write_json_atomic
    from spellshield.indexing.projected import MemmapStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100000)
    parser.add_argument("--dim", type=int, default=None, help="default: the real latents' 2,048")
    parser.add_argument("--dims", type=int, default=256, help="projected dimensions of the inverted file")
    parser.add_argument("--lists", type=int, default=None, help="default: about 2 sqrt(N)")
    parser.add_argument("--code-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--fit-sample", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-repeats", type=int, default=None, help="default 3 up to 10^6 vectors, else 1")
    parser.add_argument("--scratch", default="/tmp/spellshield-scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--reuse-structure", action="store_true",
                        help="reopen the inverted file an earlier run built under --scratch (every sha256 checked, and the "
                        "refitted projection checked against its codes) instead of building it again; the build figures "
                        "are then kept from --out's earlier JSON, marked reused")
    parser.add_argument("--vectors", default=None, help="an existing (N, D) .npy instead of synthetic data "
                        "(e.g. real TAEF2 CIFAR-10 latents cached by benchmarks/search.py)")
    parser.add_argument("--cifar-taef2", type=int, default=None, metavar="N",
                        help="real data: the first N CIFAR-10 training images through TAEF2 at 64 px, encoded once "
                        "and cached under --scratch (CIFAR-10 and TAEF2 from $SPELLSHIELD_SHARED, see benchmarks/search.py)")
    parser.add_argument("--tables", nargs="+", default=None, metavar="JSON",
                        help="print the RESULTS.md rows of these result files (smallest N first; given two, their growth) and exit")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(args.tables))
        return 0
    if args.vectors and args.cifar_taef2:
        parser.error("--vectors and --cifar-taef2 are two sources of vectors: give one")
    torch.set_num_threads(args.threads)
    os.makedirs(args.scratch, exist_ok=True)
    rng = np.random.default_rng(args.seed + 1)
    result = {"n": args.n, "dims": args.dims, "batch": args.batch, "batches": args.batches, "threads": args.threads,
              "code_dtype": args.code_dtype, "load_average_start": os.getloadavg(), "machine": platform.platform(),
              "cpus": os.cpu_count(), "data": "synthetic, spectrum of 10,000 real TAEF2 CIFAR-10 latents, 10% near-duplicates"}

    path = args.vectors or synthetic_path(args.scratch, args.n, args.dim or 2048, args.seed)
    if args.cifar_taef2:
        from search import load_vectors, taef2_cache_path

        path = taef2_cache_path(args.scratch, args.cifar_taef2)
        started = time.perf_counter()
        if not os.path.isfile(path):
            load_vectors("cifar-taef2", args.cifar_taef2, 0, args.scratch)  # writes ``path``
            result["encode_s"] = time.perf_counter() - started
        result["data"] = f"real: the first {args.cifar_taef2:,} CIFAR-10 training images through TAEF2 at 64 px ({path})"
    elif args.vectors:
        result["data"] = f"{args.vectors} (given)"
    elif not os.path.isfile(path):
        started = time.perf_counter()
        generate(path, args.n, args.dim, args.seed)
        result["generate_s"] = time.perf_counter() - started
        print(f"generated {path} in {result['generate_s']:.0f} s", flush=True)
    vectors = np.load(path, mmap_mode="r")
    count, dim = vectors.shape
    result.update(n=count, dim=dim, vectors_file_gb=os.path.getsize(path) / 2**30)
    del vectors

    def save(phase: str) -> None:  # after every phase: a run stopped half-way leaves what it measured
        result["load_average_now"] = os.getloadavg()
        result.setdefault("load_average_after", {})[phase] = result["load_average_now"]  # the load each phase saw
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            write_json_atomic(args.out, result)

    # Phases in the order of what they are worth if the run is stopped (at 10^7 on a loaded machine
    # each takes an hour or more): build, radius, baseline, search, then the brute-force truth that
    # turns the search's answers into recall and precision.
    # -- build --------------------------------------------------------------------------------------
    lists = args.lists or default_lists(count)
    out = structure_dir(args.scratch, count, dim, args.dims, lists, args.code_dtype)
    reset_peak()
    base_rss = peak_rss_gb()
    started = time.perf_counter()
    reader = NpyRows(path)
    projection = fit_scale_projection(reader, args.dims, args.fit_sample, args.seed, rng)
    if args.reuse_structure:
        earlier = {}
        if args.out and os.path.isfile(args.out):
            with open(args.out) as f:
                earlier = json.load(f).get("build", {})
        meta = read_ivf(out)  # refuses a missing or changed file
        check_reproduces(projection, out, path, meta)
        result["build"] = {**earlier, "reused": True, "reused_structure": out}
        print(f"reusing {out} (built earlier: {earlier.get('seconds', float('nan')):.0f} s)", flush=True)
    else:
        meta = build_ivf(out, reader, projection, lists, code_dtype=args.code_dtype, seed=args.seed,
                         log=lambda m: print("  " + m, flush=True))
        result["build"] = {"seconds": time.perf_counter() - started, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": base_rss,
                           "lists": lists, "list_sizes": meta["list_sizes"], "explained_variance": projection.explained_variance,
                           "stored_error": meta["stored_error"], "eps": meta["eps"],
                           "structure_gb": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**30}
        print(f"built {lists} lists in {result['build']['seconds']:.0f} s, peak RSS {result['build']['peak_rss_gb']:.2f} GB", flush=True)
    del reader
    save("build")

    # -- radius, queries and the GEMM scan baseline ---------------------------------------------------
    started = time.perf_counter()
    norms = []
    radius, median_nn = suggested_radius(path, count, rng, norms)
    norms = torch.cat(norms)
    result.update(radius=radius, median_1nn=median_nn, radius_s=time.perf_counter() - started)
    print(f"radius {radius:.3f} (median 1-NN {median_nn:.3f}) in {result['radius_s']:.0f} s", flush=True)
    queries = make_queries(path, count, args.batches, args.batch, radius, rng)
    save("radius")

    reps = args.baseline_repeats or (3 if count <= 1_000_000 else 1)
    wall, compute = gemm_baseline(path, queries[0], radius, norms, reps)
    result.update(gemm_scan_ms=1e3 * wall, gemm_compute_ms=1e3 * compute, gemm_scan_repeats=reps)
    del norms
    print(f"plain float32 GEMM scan of {count:,} vectors: {result['gemm_scan_ms']:.0f} ms per batch "
          f"({result['gemm_compute_ms']:.0f} ms of it arithmetic, the rest reading the file)", flush=True)
    save("gemm_scan")

    # -- search -------------------------------------------------------------------------------------
    reset_peak()
    memory = result["search_memory_gb"] = {"at_start": memory_gb()}  # what the earlier phases left resident
    started = time.perf_counter()
    meta = read_ivf(out)  # every sha256 checked, as on open
    load = lambda name: np.load(os.path.join(out, name))  # noqa: E731
    store = MemmapStore(np.load(path, mmap_mode="r"), None, "cpu")
    codes = read_codes(os.path.join(out, "codes.npy"), head_dims(args.dims))  # as IvfShield reads them
    scan_ = IvfScan(projection, load("centroids.npy"), load("offsets.npy"), load("rows.npy"), codes,
                    load("radii.npy"), meta["eps"], meta["stored_error"], store)
    del codes
    result["open_s"] = time.perf_counter() - started
    memory["after_open"] = memory_gb()
    rows, answers = [], {}
    for factor in RADIUS_FACTORS:
        r = radius * factor
        times, lists_q, cands_q = [], [], []
        for b in range(-1 if factor == RADIUS_FACTORS[0] else 0, args.batches):  # -1: one warm-up, not timed
            q = torch.from_numpy(queries[max(b, 0)])
            scan_.stats.reset()
            t0 = time.perf_counter()
            res = scan_.range_search64(q, np.full(len(q), r))
            elapsed = time.perf_counter() - t0
            if b < 0:
                continue
            times.append(elapsed)
            lists_q.append(scan_.stats.lists_per_query)
            cands_q.append(scan_.stats.candidates_per_query)
            answers[factor, b] = [set(ids.tolist()) for ids, _ in res]
        row = {"radius_factor": factor, "radius": r, "median_ms": 1e3 * float(np.median(times)),
               "ms": [1e3 * t for t in times], "lists_per_query": float(np.mean(lists_q)),
               "probed_fraction": float(np.mean(lists_q)) / lists, "candidates_per_query": float(np.mean(cands_q)),
               "vs_gemm_scan": 1e3 * float(np.median(times)) / result["gemm_scan_ms"]}
        rows.append(row)
        result["search"] = rows
        save(f"search r x {factor:g}")
        print(f"  r x {factor}: {row['median_ms']:.1f} ms/batch ({row['vs_gemm_scan']:.2f} x GEMM scan), "
              f"{row['lists_per_query']:.0f}/{lists} lists, {row['candidates_per_query']:.1f} candidates/query", flush=True)
    result["search_peak_rss_gb"] = peak_rss_gb()
    memory["end"] = memory_gb()
    print(f"search peak RSS {result['search_peak_rss_gb']:.2f} GB (resident at its start {memory['at_start']['VmRSS']:.2f}, "
          f"after opening {memory['after_open']['VmRSS']:.2f}, at its end {memory['end']['VmRSS']:.2f} GB)", flush=True)
    save("search")

    # -- truth: recall and precision against brute force --------------------------------------------
    started = time.perf_counter()
    widest = truth(path, queries.reshape(-1, dim), radius * max(RADIUS_FACTORS))  # one scan; the rest are subsets
    result["truth_s"] = time.perf_counter() - started
    for row in rows:
        found = missed = extra = 0
        for b in range(args.batches):
            for i, got in enumerate(answers[row["radius_factor"], b]):
                hits = widest[b * args.batch + i]
                want = {r for r, d in hits.items() if d < row["radius"]}
                found += len(got & want)
                missed += len(want - got)
                extra += len(got - want)
        row.update(hits=found + missed, recall=found / (found + missed) if found + missed else 1.0,
                   precision=found / (found + extra) if found + extra else 1.0)
        print(f"  r x {row['radius_factor']}: recall {row['recall']:.3f} precision {row['precision']:.3f} "
              f"({row['hits']} hits)", flush=True)
    result["load_average_end"] = os.getloadavg()
    print(f"truth in {result['truth_s']:.0f} s", flush=True)
    save("truth")
    return 0 if all(r["recall"] == 1.0 and r["precision"] == 1.0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
