"""Small real index directories for search tests: float32 through IndexWriter, float16 in the
layout the build writes for ``--dtype float16`` (IndexIDMap2(IndexScalarQuantizer(QT_fp16))),
and real CIFAR-10 vectors from ../shared (pixels, or latents of a real VAE)."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np

from spellshield.indexing.encoders import PIXELS, LatentSpec
from spellshield.indexing.manifest import MANIFEST, file_sha256, write_json_atomic
from spellshield.indexing.writer import IndexWriter


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


def to_float16(index_dir: str) -> None:
    """Rewrite a float32 index's shards as float16 IndexScalarQuantizer shards (the build's layout)."""
    manifest_path = os.path.join(index_dir, MANIFEST)
    with open(manifest_path) as f:
        manifest = json.load(f)
    for shard in manifest["shards"]:
        path = os.path.join(index_dir, shard["file"])
        index = faiss.read_index(path)
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        flat = faiss.downcast_index(index.index)
        vectors = flat.reconstruct_n(0, flat.ntotal).astype(np.float16).astype(np.float32)
        sq = faiss.IndexScalarQuantizer(flat.d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        out = faiss.IndexIDMap2(sq)
        out.add_with_ids(vectors, ids)
        faiss.write_index(out, path + ".tmp")
        os.replace(path + ".tmp", path)
        shard["sha256"] = file_sha256(path)
    manifest["dtype"] = "float16"
    write_json_atomic(manifest_path, manifest)


def cifar_latents(shared_cifar_dir: str, count: int, start_shard: int = 0, encoder: str = PIXELS,
                  resolution: int = 32) -> np.ndarray:
    """The first ``count`` CIFAR-10 training images of ``start_shard`` on, encoded (N, D) float32.

    ``encoder`` is any encoder spec (``pixels``: the image in [-1, 1]; a VAE directory, e.g. the
    TAEF2 weights: its scaled latents), fed the images resized to ``resolution``.
    """
    from spellshield.indexing.corpus import Sample, decode_image, iter_shard
    from spellshield.indexing.encoders import Encoder

    images = []
    shard = start_shard
    while len(images) < count:
        for item in iter_shard(os.path.join(shared_cifar_dir, f"train-{shard:06d}.tar")):
            if isinstance(item, Sample):
                images.append(decode_image(item.image, resolution))
                if len(images) == count:
                    break
        shard += 1
    model = Encoder(encoder).init()
    batches = [model.encode(np.stack(images[i:i + 100])) for i in range(0, count, 100)]
    return np.concatenate([b.reshape(len(b), -1).numpy() for b in batches])


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
