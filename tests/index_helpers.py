"""Small real index directories for search tests: float32 through IndexWriter, float16 in the
layout the build writes for ``--dtype float16`` (IndexIDMap2(IndexScalarQuantizer(QT_fp16))),
and real CIFAR-10 vectors from ../shared (pixels, or latents of a real VAE)."""

from __future__ import annotations

import numpy as np

from spellshield.indexing.encoders import PIXELS, LatentSpec
from spellshield.indexing.writer import IndexWriter
from spellshield.toys.indexes import cifar_latents, to_float16


def write_index(path, vectors: np.ndarray, shard_size: int, dtype: str = "float32", shape=None) -> str:
    """An index directory holding ``vectors`` (ids 0..N-1, keys k0..), in ``dtype`` storage.

    For float16 the stored truth is ``vectors.astype(float16)``: brute force against that.
    """
    n, d = vectors.shape
    spec = LatentSpec(PIXELS, "pixels", PIXELS, 1, tuple(shape or (d, 1, 1)), 1.0, 0.0)
    writer = IndexWriter(str(path), spec, shard_size)
    writer.add([f"k{i}" for i in range(n)], ["s.tar"] * n, ["0"] * n, vectors)
    writer.finish({})
    if dtype == "float16":
        to_float16(str(path))
    return str(path)


def cifar_pixels(shared_cifar_dir: str, count: int, start_shard: int = 0) -> np.ndarray:
    """The first ``count`` CIFAR-10 training images as pixel latents (N, 3072) in [-1, 1]."""
    return cifar_latents(shared_cifar_dir, count, start_shard)


def brute_force(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """float64 distances (Q, N), computed the direct way."""
    base = base.astype(np.float64)
    out = np.empty((len(queries), len(base)))
    for i, q in enumerate(queries.astype(np.float64)):
        diff = base - q
        out[i] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out
