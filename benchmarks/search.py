"""range_search latency per query batch, every backend against FAISS IndexFlatL2 on the same data.

    python benchmarks/search.py --dataset cifar --n 50000 --batch 16 --out benchmarks/results/search-cifar.json
    python benchmarks/search.py --dataset random --n 50000 --dim 3072
    python benchmarks/search.py --dataset cifar-taef2 --n 10000 --shard-size 2500

Data: ``cifar`` is the CIFAR-10 training set from ../shared in pixel space (3072-d, [-1, 1]);
``cifar-taef2`` the same images upscaled to ``--resolution`` and encoded by the real pretrained
TAEF2 of ../shared (latents 32 x R/8 x R/8: 2048-d at 64 px; cached as .npy under ``--cache``);
``random`` is isotropic Gaussian (the worst case for the projection filter). The index is
written once with IndexWriter (float32, shards of ``--shard-size``) and converted to float16
for the float16 rows; both are cached under ``--cache``.

Queries (a batch of ``--batch``): half are corpus vectors plus small noise (each has hits), the
other half midpoints of two corpus vectors (CIFAR) or fresh Gaussian vectors (random), i.e.
mostly misses, like the x0 predictions of a sampler. The radius is the index's suggested one:
half the median 1-NN distance of 200 corpus vectors (self excluded).

Baseline: one ``faiss.IndexFlatL2`` over all vectors, ``range_search`` with the squared radius,
no re-check: what the skeleton's FAISS path cost before. Every backend row reports the median
of ``--repeats`` timed batches after one warm-up, the ratio to the baseline, and candidates per
query from the backend's stats (and lists probed per query for ``ivf``, whose projection and
inverted file of about 2 sqrt(N) lists are built once, untimed, and cached with the index). Torch and FAISS use the same thread count (``--threads``); the
machine's load average is recorded, since other work on a shared 2-core machine skews timings
(OpenMP barriers with 2 threads suffer most).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SPELLSHIELD_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")  # a worktree: set it
CIFAR = os.path.join(SHARED, "data", "cifar10")
TAEF2 = os.path.join(SHARED, "models", "taef2")

BACKENDS = {
    "exact": dict(backend="exact"),
    "faiss (flat)": dict(backend="faiss"),
    "faiss (ivf, complete probing)": dict(backend="faiss", index_type="ivf"),
    "projected d=256 (full vectors on disk)": dict(backend="projected", dims=256, full="disk"),
    "projected d=256 (full vectors in memory)": dict(backend="projected", dims=256, full="memory"),
    "sharded (exact per shard, threads)": dict(backend="sharded"),
    "ivf d=256 (codes in memory, full vectors on disk)": dict(backend="ivf", dims=256),
}
FLOAT16_BACKENDS = {
    "exact, float16 storage": dict(backend="exact"),
    "exact, float16 storage, float16 GEMM": dict(backend="exact", compute="float16"),
}


def taef2_cache_path(cache: str, n: int, resolution: int = 64) -> str:
    """Where ``load_vectors`` keeps the TAEF2 latents of the first ``n`` CIFAR-10 training images."""
    return os.path.join(cache, f"cifar-taef2-{n}-{resolution}px.npy")


def load_vectors(dataset: str, n: int, dim: int, cache: str, resolution: int = 64) -> np.ndarray:
    if dataset == "random":
        return np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    if not os.path.isdir(CIFAR):
        raise SystemExit(f"{CIFAR} is absent: use --dataset random")
    from spellshield.toys.indexes import cifar_latents

    if dataset == "cifar":
        return cifar_latents(CIFAR, n)  # the pixel encoder's latents
    if not os.path.isdir(TAEF2):
        raise SystemExit(f"{TAEF2} is absent: use --dataset cifar or random")
    stored = taef2_cache_path(cache, n, resolution)  # encoding is the slow part on a CPU
    if os.path.isfile(stored):
        return np.load(stored)
    started = time.perf_counter()
    print(f"  encoding {n} CIFAR-10 images with TAEF2 at {resolution} px (cached in {stored})", flush=True)
    vectors = cifar_latents(CIFAR, n, encoder=TAEF2, resolution=resolution)
    print(f"  encoded in {time.perf_counter() - started:.0f} s", flush=True)
    os.makedirs(cache, exist_ok=True)
    np.save(stored + ".tmp.npy", vectors)
    os.replace(stored + ".tmp.npy", stored)
    return vectors


def cached_index(cache: str, dataset: str, vectors: np.ndarray, shard_size: int, dtype: str) -> str:
    from spellshield.indexing.encoders import PIXELS, LatentSpec
    from spellshield.indexing.writer import IndexWriter

    path = os.path.join(cache, f"{dataset}-{len(vectors)}x{vectors.shape[1]}-{shard_size}-{dtype}")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    spec = LatentSpec(PIXELS, "pixels", PIXELS, 32, (vectors.shape[1], 1, 1), 1.0, 0.0)
    writer = IndexWriter(path, spec, shard_size)
    n = len(vectors)
    writer.add([f"k{i}" for i in range(n)], ["bench.tar"] * n, ["0"] * n, vectors)
    writer.finish({"benchmark": dataset})
    if dtype == "float16":
        from spellshield.toys.indexes import to_float16

        to_float16(path)
    return path


def prepare_ivf(path: str, dims: int) -> None:
    """The projection and inverted file ``ivf`` opens (it never trains): built once per cached index."""
    from spellshield.indexing.ivf import IvfShield, write_ivf
    from spellshield.indexing.manifest import IndexFormatError
    from spellshield.indexing.projected import load_projection

    try:
        IvfShield.locate(path, dims)
    except IndexFormatError:
        load_projection(path, dims)  # written when absent
        write_ivf(path, dims)


def make_queries(dataset: str, vectors: np.ndarray, batch: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    half = batch // 2
    pick = rng.choice(len(vectors), size=batch + half, replace=False)
    near = vectors[pick[:half]] + 0.02 * vectors.std() * rng.standard_normal((half, vectors.shape[1]))
    if dataset.startswith("cifar"):
        far = 0.5 * (vectors[pick[half:batch]] + vectors[pick[batch:]])
    else:
        far = rng.standard_normal((batch - half, vectors.shape[1]))
    return np.concatenate([near, far]).astype(np.float32)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["cifar", "cifar-taef2", "random"], default="cifar")
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--dim", type=int, default=3072, help="random data only")
    parser.add_argument("--resolution", type=int, default=64, help="cifar-taef2 only: images upscaled to N x N (latents 32 x N/8 x N/8)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shard-size", type=int, default=12500)
    parser.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: torch's)")
    parser.add_argument("--cache", default="/tmp/spellshield-bench")
    parser.add_argument("--skip", default="", help="comma-separated row names to leave out")
    parser.add_argument("--only", default="", help="comma-separated prefixes: run only the rows whose name starts "
                        "with one of them (e.g. 'ivf,projected'; row names hold commas, --skip cannot name those)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import faiss

    from spellshield.indexing.search import open_index

    vectors = load_vectors(args.dataset, args.n, args.dim, args.cache, args.resolution)  # untimed: every thread
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    load_before = os.getloadavg()
    queries = make_queries(args.dataset, vectors, args.batch)
    path32 = cached_index(args.cache, args.dataset, vectors, args.shard_size, "float32")
    exact = open_index(path32)
    sample = np.random.default_rng(2).choice(len(vectors), 200, replace=False)
    nn = [d[1] for _, d in exact.knn(vectors[sample], 2)]
    radius = 0.5 * float(np.median(nn))

    flat = faiss.IndexFlatL2(vectors.shape[1])
    flat.add(vectors)
    baseline = timed(lambda: flat.range_search(queries, radius * radius), args.repeats)
    lims, _, _ = flat.range_search(queries, radius * radius)
    rows = [{"backend": "FAISS IndexFlatL2 (baseline, no re-check)", "seconds": baseline, "ratio": 1.0,
             "hits_per_query": float(lims[-1]) / len(queries)}]
    print(f"{args.dataset}: {len(vectors)} x {vectors.shape[1]}, batch {len(queries)}, radius {radius:.4f}, {threads} threads")
    print(f"  {rows[0]['backend']:<48} {baseline * 1e3:9.1f} ms")

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if only:
        skip |= {name for name in [*BACKENDS, *FLOAT16_BACKENDS] if not name.startswith(only)}
    plans = [(name, path32, opts) for name, opts in BACKENDS.items()]
    if any(name not in skip for name in FLOAT16_BACKENDS):
        path16 = cached_index(args.cache, args.dataset, vectors, args.shard_size, "float16")
        plans += [(name, path16, opts) for name, opts in FLOAT16_BACKENDS.items()]
    for name, path, options in plans:
        if name in skip:
            continue
        if options["backend"] == "ivf":
            prepare_ivf(path, options["dims"])
        started = time.perf_counter()
        shield = open_index(path, **options)
        opened = time.perf_counter() - started
        found = shield.range_search(queries, radius)
        shield.stats.reset()
        seconds = timed(lambda: shield.range_search(queries, radius), args.repeats)
        stats = shield.stats.to_json()
        if hasattr(shield, "candidates_per_query"):
            stats["candidates_per_query"] = shield.candidates_per_query()
        row = {"backend": name, "options": options, "seconds": seconds, "ratio": seconds / baseline,
               "open_seconds": opened, "hits_per_query": sum(len(i) for i, _ in found) / len(queries),
               "candidates_per_query": stats["candidates_per_query"]}
        if stats["lists_probed"]:
            row["lists_probed_per_query"] = stats["lists_per_query"]
        if getattr(shield, "lists_probed", 0):
            row["ivf_lists_probed_per_query_and_shard"] = shield.lists_probed / (
                (args.repeats + 2) * len(queries) * len(shield.parts))
        rows.append(row)
        lists = f"  lists/query {row['lists_probed_per_query']:.1f}" if "lists_probed_per_query" in row else ""
        print(f"  {name:<48} {seconds * 1e3:9.1f} ms  ratio {row['ratio']:.3f}  "
              f"candidates/query {row['candidates_per_query']:.1f}  hits/query {row['hits_per_query']:.2f}{lists}  (open {opened:.1f} s)")
        del shield
    result = {
        "benchmark": "range_search latency per batch", "dataset": args.dataset, "n": len(vectors),
        "dim": int(vectors.shape[1]), "batch": len(queries), "radius": radius, "repeats": args.repeats,
        "shard_size": args.shard_size, "threads": threads, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "torch": torch.__version__, "faiss": faiss.__version__, "rows": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
