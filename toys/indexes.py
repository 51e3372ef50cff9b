"""Real CIFAR-10 vectors from ../shared, and float16 index shards, for tests and benchmarks."""

from __future__ import annotations

import json
import os

import numpy as np

from spellshield.indexing.encoders import PIXELS
from spellshield.indexing.manifest import MANIFEST, file_sha256, write_json_atomic


def to_float16(index_dir: str) -> None:
    """Rewrite a float32 index's shards as float16 IndexScalarQuantizer shards (the build's layout)."""
    import faiss

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


def cifar_images(shared_cifar_dir: str, count: int, start_shard: int = 0, resolution: int = 32) -> np.ndarray:
    """The first ``count`` CIFAR-10 training images of ``start_shard`` on, (N, H, W, 3) uint8 at ``resolution``."""
    from spellshield.indexing.corpus import Sample, decode_image, iter_shard

    images = []
    shard = start_shard
    while len(images) < count:
        for item in iter_shard(os.path.join(shared_cifar_dir, f"train-{shard:06d}.tar")):
            if isinstance(item, Sample):
                images.append(decode_image(item.image, resolution))
                if len(images) == count:
                    break
        shard += 1
    return np.stack(images)


def cifar_latents(shared_cifar_dir: str, count: int, start_shard: int = 0, encoder: str = PIXELS,
                  resolution: int = 32) -> np.ndarray:
    """The first ``count`` CIFAR-10 training images of ``start_shard`` on, encoded (N, D) float32.

    ``encoder`` is any encoder spec (``pixels``: the image in [-1, 1]; a VAE directory, e.g. the
    TAEF2 weights: its scaled latents), fed the images resized to ``resolution``.
    """
    from spellshield.indexing.encoders import Encoder

    images = cifar_images(shared_cifar_dir, count, start_shard, resolution)
    model = Encoder(encoder).init()
    batches = [model.encode(images[i:i + 100]) for i in range(0, count, 100)]
    return np.concatenate([b.reshape(len(b), -1).numpy() for b in batches])
