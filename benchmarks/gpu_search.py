"""Per-step range_search latency on a GPU: 1.2 million 16,384-dim float16 vectors, batch 16.

    python benchmarks/gpu_search.py --out $OUT/gpu_search.json                 # H100 / H200, ~2-4 min
    python benchmarks/gpu_search.py --n 20000 --dim 256 --device cpu --out /tmp/gpu_search.json   # toy

Backends: ``exact`` (``indexing.exact.ExactScan``: one float16 GEMM per chunk, float32
accumulation, float64 re-check near the radius) and ``projected`` (``indexing.projected``: a
PCA filter on ``--dims`` dims, float32, then the exact kernel on the candidates, whose full
vectors stay in GPU memory). Targets: projected under 2 ms per step, exact about 10 ms (it reads
all N x D x 2 bytes once per step: memory bandwidth). Also timed: the bare float16 GEMM over the
whole matrix (the bandwidth floor the exact scan is held against) and the projection filter
alone.

Data, generated on the device (never on the host: ~40 GB): a rank-``--rank`` signal with a
variance falling as j^-``--decay`` plus isotropic noise, the signal carrying ``--signal-share`` of
the variance: latents of real images have such a spectrum, and without one no projection can
filter (a d-dim projection of isotropic data keeps d/D of every distance). ``--isotropic``
adds a second round on pure Gaussian data, where the projected backend must fall back to one
exact scan. Queries per step: 8 stored vectors plus small noise (hits) and 8 fresh draws from
the data distribution (misses), like the x0 predictions of a sampler; a new batch every step.
The radius is the suggested one: half the median 1-NN distance of 64 stored vectors.

Correctness at scale: every step's exact and projected answers are compared, and two queries
are checked against a float64 brute force over all vectors.

Only torch, numpy and the project's ``indexing.exact`` / ``indexing.projected`` (no FAISS, Ray or
diffusers). Writes one JSON with every number (``--out``) and prints a summary.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spellshield.indexing.exact import ExactScan  # noqa: E402
from spellshield.indexing.exactness import full_precision_matmul  # noqa: E402
from spellshield.indexing.projected import DeviceStore, ProjectedScan, fit_projection, project  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Distribution:
    """A rank-``rank`` signal whose j-th direction has variance ~ j^-decay, plus isotropic noise
    (or pure noise), unit variance per coordinate on average; all draws happen on ``device``."""

    def __init__(self, dim: int, rank: int, signal_share: float, device, seed: int, isotropic: bool, decay: float = 0.5):
        self.dim, self.isotropic = dim, isotropic
        self.effective_rank = None
        if not isotropic:
            g = torch.Generator(device=device).manual_seed(seed)
            self.basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, device=device))
            variance = (1.0 + torch.arange(rank, device=device, dtype=torch.float64)) ** -decay
            self.effective_rank = float(variance.sum() ** 2 / (variance**2).sum())
            self.spectrum = (variance.sqrt() * math.sqrt(signal_share * dim / float(variance.sum()))).to(torch.float32)
            self.noise = math.sqrt(1.0 - signal_share)

    def sample(self, rows: int, g: torch.Generator) -> torch.Tensor:
        device = g.device
        chunk = torch.randn(rows, self.dim, generator=g, device=device)
        if not self.isotropic:
            coefficients = torch.randn(rows, len(self.spectrum), generator=g, device=device) * self.spectrum
            chunk.mul_(self.noise).addmm_(coefficients, self.basis.T)
        return chunk


def generate(n: int, dist: Distribution, device, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, dim) float16 draws of ``dist`` on ``device``, written in ~1 GB chunks."""
    g = torch.Generator(device=device).manual_seed(seed)
    data = out if out is not None else torch.empty((n, dist.dim), dtype=torch.float16, device=device)
    step = max(1, (1 << 30) // (4 * dist.dim))
    for start in range(0, n, step):
        rows = min(step, n - start)
        data[start : start + rows] = dist.sample(rows, g).to(torch.float16)
    return data


def query_batches(data: torch.Tensor, steps: int, batch: int, seed: int, fresh) -> list[torch.Tensor]:
    g = torch.Generator(device=data.device).manual_seed(seed)
    out = []
    for _ in range(steps):
        half = batch // 2
        pick = torch.randint(0, len(data), (half,), generator=g, device=data.device)
        near = data[pick].to(torch.float32) + 0.01 * torch.randn(half, data.shape[1], generator=g, device=data.device)
        out.append(torch.cat([near, fresh(batch - half, g)]).contiguous())
    return out


def per_step(fn, batches, device, warmup: int = 3) -> dict:
    for q in batches[:warmup]:
        fn(q)
    sync(device)
    times = []
    for q in batches:
        start = time.perf_counter()
        fn(q)
        sync(device)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "steps": len(ms)}


def brute_force_ids(data: torch.Tensor, q: torch.Tensor, radius: float) -> list[int]:
    q64 = q.to(torch.float64)
    hits = []
    step = max(1, (1 << 30) // (8 * data.shape[1]))
    for start in range(0, len(data), step):
        diff = data[start : start + step].to(torch.float64) - q64
        d = torch.sqrt((diff * diff).sum(1))
        hits += (torch.nonzero(d < radius).flatten() + start).tolist()
    return sorted(hits)


def run_round(args, device, data: torch.Tensor, dist: Distribution, started: float) -> dict:
    isotropic = dist.isotropic
    label = "isotropic" if isotropic else f"rank-{args.rank} signal + noise"
    result = {"data": label, "signal_share": None if isotropic else args.signal_share}
    t0 = time.perf_counter()
    exact = ExactScan(data)
    sync(device)
    result["exact_setup_s"] = time.perf_counter() - t0
    result["exact_compute"] = exact.compute

    def fresh(rows, g):  # new draws of the data's distribution, from the queries' own generator
        return dist.sample(rows, g)

    # Radius: half the median 1-NN distance (self excluded) of 64 stored vectors.
    sample = data[torch.arange(0, len(data), max(1, len(data) // 64), device=device)[:64]].to(torch.float32)
    nn = []
    for start in range(0, len(sample), args.batch):
        for _, found in exact.knn64(sample[start : start + args.batch], 2):
            nn.append(float(found[1]))
    radius = 0.5 * float(np.median(nn))
    result["radius"] = radius
    result["median_1nn"] = 2 * radius
    steps = args.steps if not isotropic else min(args.steps, 20)  # the worst case: fewer steps
    batches = query_batches(data, steps, args.batch, args.seed + 1, fresh)
    radii = np.full(args.batch, radius)

    # The bandwidth floor: the float16 GEMM over every chunk, nothing else.
    operand = batches[0].to(data.dtype)

    def bare(q):
        with full_precision_matmul():
            for start in range(0, len(data), exact.chunk_rows):
                operand @ data[start : start + exact.chunk_rows].T

    result["bare_gemm"] = per_step(bare, batches[:10], device)
    gb = data.numel() * data.element_size() / 1e9
    result["bare_gemm"]["GB_per_s"] = gb / (result["bare_gemm"]["median_ms"] / 1e3)

    exact_answers = []

    def run_exact(q):
        exact_answers.append(exact.range_search64(q, radii, None))

    exact.stats.reset()
    result["exact"] = per_step(run_exact, batches, device)
    result["exact"]["GB_per_s"] = gb / (result["exact"]["median_ms"] / 1e3)
    result["exact"].update(candidates_per_query=exact.stats.candidates_per_query,
                           hits_per_query=exact.stats.hits / max(exact.stats.queries, 1))
    print(f"[{label}] radius {radius:.3f}; bare GEMM {result['bare_gemm']['median_ms']:.2f} ms "
          f"({result['bare_gemm']['GB_per_s']:.0f} GB/s); exact {result['exact']['median_ms']:.2f} ms "
          f"({result['exact']['GB_per_s']:.0f} GB/s), {result['exact']['hits_per_query']:.2f} hits/query", flush=True)
    if time.perf_counter() - started > args.budget_s:
        result["skipped"] = "projected: time budget spent"
        return result

    # Projected: fit on a sample, project every stored vector (float64, then float32), filter + re-check.
    t0 = time.perf_counter()
    fit_rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.fit_sample].to(device)
    projection = fit_projection(data[fit_rows].to(torch.float32), args.dims, args.seed)
    basis64 = torch.from_numpy(projection.basis).to(device, torch.float64)
    mean64 = torch.from_numpy(projection.mean).to(device, torch.float64)
    projected = torch.empty((len(data), projection.dims), dtype=torch.float32, device=device)
    centered_max = projected_max = 0.0
    step = max(1, (1 << 31) // (8 * data.shape[1]))
    for start in range(0, len(data), step):
        chunk = data[start : start + step]
        centered_max = max(centered_max, float(torch.linalg.vector_norm(chunk.to(torch.float64) - mean64, dim=1).max()))
        p = project(chunk, basis64, mean64).to(torch.float32)
        projected_max = max(projected_max, float(torch.linalg.vector_norm(p.to(torch.float64), dim=1).max()))
        projected[start : start + step] = p
    scan = ProjectedScan(projection, projected, DeviceStore(data), centered_max, projected_max)
    sync(device)
    result["projected_setup_s"] = time.perf_counter() - t0
    result["dims"] = projection.dims
    result["explained_variance"] = projection.explained_variance
    result["sigma"] = projection.sigma

    def run_filter(q):
        p, t = scan.filter_radii(q, radii)
        scan.filter.candidates(p, t)

    result["projection_filter_only"] = per_step(run_filter, batches, device)
    projected_answers = []

    def run_projected(q):
        projected_answers.append(scan.range_search64(q, radii, None))

    scan.stats.reset()
    result["projected"] = per_step(run_projected, batches, device)
    result["projected"].update(candidates_per_query=scan.stats.candidates_per_query,
                               hits_per_query=scan.stats.hits / max(scan.stats.queries, 1))
    # The last len(batches) answers of each are the timed steps, same batches in the same order.
    agree = all(
        [a[0].tolist() for a in x] == [b[0].tolist() for b in y]
        for x, y in zip(exact_answers[-len(batches):], projected_answers[-len(batches):])
    )
    result["exact_and_projected_agree_on_every_step"] = agree
    checks = []
    for row in (0, args.batch - 1):  # one near query (hits), one fresh (usually none)
        expected = brute_force_ids(data, batches[-1][row], radius)
        checks.append(expected == sorted(exact_answers[-1][row][0].tolist())
                      and expected == sorted(projected_answers[-1][row][0].tolist()))
        result.setdefault("brute_force_hits", []).append(len(expected))
    result["brute_force_float64_agrees"] = all(checks)
    print(f"[{label}] projected d={projection.dims} ({100 * projection.explained_variance:.1f}% variance): "
          f"{result['projected']['median_ms']:.2f} ms/step (filter alone {result['projection_filter_only']['median_ms']:.2f} ms), "
          f"{result['projected']['candidates_per_query']:.1f} candidates/query; agree {agree}, "
          f"float64 brute force agrees {result['brute_force_float64_agrees']}", flush=True)
    del scan, projected, exact
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_200_000)
    parser.add_argument("--dim", type=int, default=16384)
    parser.add_argument("--dims", type=int, default=256, help="projected dims (at most dim / 4)")
    parser.add_argument("--rank", type=int, default=None, help="rank of the signal (default: --dims)")
    parser.add_argument("--signal-share", type=float, default=0.5, help="share of the variance in the signal")
    parser.add_argument("--decay", type=float, default=0.5, help="signal variance of direction j ~ j^-decay")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="timed steps (a new query batch each)")
    parser.add_argument("--fit-sample", type=int, default=20000, help="vectors the PCA is fitted on")
    parser.add_argument("--isotropic", action=argparse.BooleanOptionalAction, default=True,
                        help="also run on isotropic data (default: yes, when time is left)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip what is left after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON results (default: print only)")
    args = parser.parse_args(argv)
    args.dims = max(1, min(args.dims, args.dim // 4))
    args.rank = args.rank or args.dims
    device = torch.device(args.device)
    started = time.perf_counter()
    info = {
        "benchmark": "per-step range_search latency", "n": args.n, "dim": args.dim, "batch": args.batch,
        "steps": args.steps, "storage": "float16", "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "gigabytes": args.n * args.dim * 2 / 1e9, "rounds": [],
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda

    def write():
        info["seconds"] = time.perf_counter() - started
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(info, f, indent=2)
            os.replace(args.out + ".tmp", args.out)

    print(f"{info['device_name']}: {args.n} x {args.dim} float16 ({info['gigabytes']:.1f} GB), batch {args.batch}", flush=True)
    t0 = time.perf_counter()
    signal = Distribution(args.dim, args.rank, args.signal_share, device, args.seed, isotropic=False, decay=args.decay)
    info["signal"] = {"rank": args.rank, "share": args.signal_share, "decay": args.decay,
                      "effective_rank": signal.effective_rank}
    data = generate(args.n, signal, device, args.seed + 1)
    sync(device)
    info["generate_s"] = time.perf_counter() - t0
    for dist in [signal] + ([Distribution(args.dim, 0, 0.0, device, 0, isotropic=True)] if args.isotropic else []):
        if info["rounds"] and time.perf_counter() - started > args.budget_s:
            info["rounds"].append({"data": "isotropic", "skipped": "time budget spent"})
            break
        if dist.isotropic:
            generate(args.n, dist, device, args.seed + 2, out=data)
        try:
            info["rounds"].append(run_round(args, device, data, dist, started))
        except torch.OutOfMemoryError as exc:  # report what ran rather than nothing
            info["rounds"].append({"data": "isotropic" if dist.isotropic else "signal", "error": f"out of memory: {exc}"})
        write()
    if device.type == "cuda":
        info["max_memory_allocated_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    write()
    print(f"done in {time.perf_counter() - started:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
