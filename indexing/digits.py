"""A small real corpus that needs no network: scikit-learn's 8x8 handwritten digits.

scikit-learn ships the 1,797 images of the UCI optical digits set inside its wheel. We write
them as WebDataset shards (``<key>.png``, ``<key>.cls``, ``<key>.json``) so that the demo and
the tests exercise exactly the reading path a real corpus takes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import webdataset as wds

from .corpus import encode_png


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8), labels (N,)) in the order scikit-learn ships them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_corpus(out_dir: str, num_shards: int = 8, limit: int | None = None) -> list[str]:
    """Write the digits as ``digits-000000.tar`` ... and return the shard paths."""
    images, labels = digits_images()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for number, idx in enumerate(np.array_split(np.arange(len(images)), num_shards)):
        path = os.path.join(out_dir, f"digits-{number:06d}.tar")
        tmp = path + ".tmp"
        with wds.TarWriter(tmp) as sink:
            for i in idx:
                key = f"digit{labels[i]}_{i:04d}"
                sink.write(
                    {
                        "__key__": key,
                        "png": encode_png(images[i]),
                        "cls": str(int(labels[i])).encode(),
                        "json": json.dumps({"label": int(labels[i]), "index": int(i)}).encode(),
                    }
                )
        os.replace(tmp, path)
        paths.append(path)
    return paths
