"""Synthetic latents with the spectrum of real TAEF2 CIFAR-10 latents, plus near-duplicate clusters,
streamed into a memory-mappable float16 ``.npy`` of any size (bounded memory).

    python benchmarks/synthetic_latents.py --n 1000000 --out /work/scratch/vectors-1e6.npy
    python benchmarks/synthetic_latents.py --refresh-spectrum   # recompute the spectrum from ../shared

The spectrum (PCA variances, descending, and the mean) of the real latents (CIFAR-10 training
images at 64 px through the pretrained TAEF2 of ../shared: D = 2,048) is cached in
``benchmarks/taef2_cifar_spectrum.json`` so that the generator works without ../shared.

A vector is ``mean + Q (g * sqrt(var))``: g standard normal, Q a fixed random orthogonal map (16
blocks of 128 x 128, each rotating every 16th eigen-direction, a GEMM: cheap at 10^7 rows), so the
covariance has exactly the real eigenvalues while the variance is spread over all coordinates as
in real latents (which matters for float16 storage). A share ``--dup-share`` of the rows are near copies of
another row of the same chunk (clusters of 2+), offset by isotropic noise of norm about
``--dup-noise`` times the typical distance between two vectors: what a scraped corpus holds.
Everything is seeded per chunk: the same arguments give the same file.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPECTRUM = os.path.join(HERE, "taef2_cifar_spectrum.json")
CIFAR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10")
TAEF2 = os.path.join(os.path.dirname(ROOT), "shared", "models", "taef2")
CHUNK = 1 << 14


def spectrum_of(latents: np.ndarray) -> dict:
    """PCA variances (descending) and mean of real latents (N, D), in float64."""
    x = latents.astype(np.float64)
    mean = x.mean(0)
    centered = x - mean
    variances = np.linalg.eigvalsh(centered.T @ centered / (len(x) - 1))[::-1].clip(min=0)
    return {"source": f"{len(x)} CIFAR-10 training images, 64 px, pretrained TAEF2 latents (32 x 8 x 8)",
            "count": len(x), "dim": x.shape[1],
            "variances": [float(f"{v:.6g}") for v in variances], "mean": [float(f"{m:.6g}") for m in mean]}


def load_spectrum(dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(variances, mean) of the cached real spectrum, resampled to ``dim`` (same total variance per dim)."""
    with open(SPECTRUM) as f:
        spec = json.load(f)
    var, mean = np.array(spec["variances"]), np.array(spec["mean"])
    if dim is None or dim == len(var):
        return var, mean
    grid = np.linspace(0, len(var) - 1, dim)
    return np.interp(grid, np.arange(len(var)), var), np.interp(grid, np.arange(len(mean)), mean)


@functools.lru_cache(maxsize=4)
def rotation(dim: int, seed: int) -> torch.Tensor:
    """A fixed random orthogonal map as (blocks, k, k) matrices, k = dim / blocks (module doc)."""
    blocks = 16 if dim % 16 == 0 and dim >= 256 else 1
    k = dim // blocks
    rng = np.random.default_rng([seed, 1 << 41])
    return torch.from_numpy(np.stack([np.linalg.qr(rng.standard_normal((k, k)))[0] for _ in range(blocks)]).astype(np.float32))


def chunk_of(start: int, rows: int, var: np.ndarray, mean: np.ndarray, seed: int, dup_share: float,
             dup_noise: float) -> np.ndarray:
    """Rows ``start .. start + rows`` of the synthetic corpus, float32 (torch: all cores)."""
    dim = len(var)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
    g = torch.randn((rows, dim), generator=gen) * torch.from_numpy(np.sqrt(var).astype(np.float32))
    q = rotation(dim, seed)
    blocks, k, _ = q.shape
    # Block b rotates eigen-directions b, b + blocks, b + 2 blocks, ...: large and small variances mixed.
    x = torch.bmm(g.view(rows, k, blocks).permute(2, 0, 1), q.transpose(1, 2)).permute(1, 0, 2).reshape(rows, dim)
    copies = int(round(dup_share * rows))
    if copies and rows > copies:
        rng = np.random.default_rng([seed, start])
        targets = rng.choice(rows, copies, replace=False)
        sources = np.setdiff1d(np.arange(rows), targets)
        picked = sources[rng.integers(0, len(sources), copies)]
        spread = dup_noise * math.sqrt(2.0 * var.sum() / dim)  # per coordinate: |noise| ~ dup_noise x pair distance
        x[targets] = x[picked] + spread * torch.randn((copies, dim), generator=gen)
    return (x + torch.from_numpy(mean.astype(np.float32))).numpy()


def generate(out: str, n: int, dim: int | None = None, seed: int = 0, dup_share: float = 0.1, dup_noise: float = 0.05,
             dtype: str = "float16", log=print) -> str:
    """Stream ``n`` synthetic vectors into ``out`` (.npy); written to ``out.tmp`` and renamed."""
    var, mean = load_spectrum(dim)
    tmp = out + ".tmp.npy"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, len(var)))
    started = last = time.perf_counter()
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        chunk = torch.from_numpy(chunk_of(start, rows, var, mean, seed, dup_share, dup_noise))
        array[start:start + rows] = chunk.to(getattr(torch, dtype)).numpy()  # torch's float16 rounding: fast
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"  generated {start + rows:,} of {n:,} ({(start + rows) / (last - started):,.0f}/s)")
    array.flush()
    del array
    os.replace(tmp, out)
    return out


def refresh_spectrum(count: int, cache: str) -> dict:
    """Encode ``count`` CIFAR-10 images with TAEF2 (cached .npy under ``cache``) and write the spectrum JSON."""
    stored = os.path.join(cache, f"cifar-taef2-{count}-64px.npy")
    if os.path.isfile(stored):
        latents = np.load(stored)
    else:
        if not (os.path.isdir(CIFAR) and os.path.isdir(TAEF2)):
            raise SystemExit(f"{CIFAR} or {TAEF2} is absent: the cached {SPECTRUM} stays as it is")
        sys.path.insert(0, ROOT)
        from tests.index_helpers import cifar_latents

        latents = cifar_latents(CIFAR, count, encoder=TAEF2, resolution=64)
        os.makedirs(cache, exist_ok=True)
        np.save(stored, latents)
    spec = spectrum_of(latents)
    with open(SPECTRUM + ".tmp", "w") as f:
        json.dump(spec, f)
    os.replace(SPECTRUM + ".tmp", SPECTRUM)
    return spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100000)
    parser.add_argument("--dim", type=int, default=None, help="default: the real latents' 2,048")
    parser.add_argument("--out", help="the .npy to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dup-share", type=float, default=0.1)
    parser.add_argument("--dup-noise", type=float, default=0.05)
    parser.add_argument("--refresh-spectrum", action="store_true")
    parser.add_argument("--spectrum-count", type=int, default=10000)
    parser.add_argument("--cache", default="/tmp/spellshield-bench")
    args = parser.parse_args(argv)
    if args.refresh_spectrum:
        spec = refresh_spectrum(args.spectrum_count, args.cache)
        print(f"{SPECTRUM}: {spec['count']} latents, D = {spec['dim']}")
    if args.out:
        generate(args.out, args.n, args.dim, args.seed, args.dup_share, args.dup_noise)
        print(f"{args.out}: {args.n:,} synthetic vectors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
