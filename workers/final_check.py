"""The exact check of finished images against the shield: what is written is what is checked.

Images are taken as the uint8 pixels that go into the PNG, encoded with the index's own
encoder and searched exactly: the nearest corpus latent (knn, k = 1) and, when a radius is
given, whether any protected latent lies strictly inside it (range search, decided in float64).
The generation worker runs it on every sample before writing; the auditor runs it again from
the image files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FinalCheck:
    ids: np.ndarray  # int64 (B,): nearest corpus latent
    keys: list[str]
    distances: np.ndarray  # float64 (B,)
    inside: np.ndarray | None  # bool (B,): some protected latent strictly within the radius


def check_images(images_uint8: np.ndarray, encoder, shield, radius: float | None = None) -> FinalCheck:
    """Exact nearest corpus latent of each image (B, H, W, 3) uint8, and the inside-shield flag."""
    resolution = shield.manifest.latent.resolution
    if images_uint8.shape[1:3] != (resolution, resolution):
        raise ValueError(
            f"images are {images_uint8.shape[1]}x{images_uint8.shape[2]}, the index was built at {resolution}x{resolution}"
        )
    latents = encoder.encode(images_uint8).reshape(len(images_uint8), -1)
    found = shield.knn(latents, 1)
    ids = np.array([f[0][0] for f in found], dtype=np.int64)
    distances = np.array([float(f[1][0]) for f in found], dtype=np.float64)
    inside = None
    if radius is not None:
        inside = np.array([len(hit_ids) > 0 for hit_ids, _ in shield.range_search(latents, radius)], dtype=bool)
    return FinalCheck(ids=ids, keys=shield.keys(ids), distances=distances, inside=inside)
