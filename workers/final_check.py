"""The exact check of finished images against the shield: what is written is what is checked.

Images are taken as the uint8 pixels that go into the PNG, encoded with the index's own
encoder and searched exactly: the nearest corpus latent (knn, k = 1) and, when a radius is
given, whether any protected latent lies strictly inside it (range search, decided in float64).
The generation worker runs it on every sample before writing; the auditor runs it again from
the image files. With ``judges`` (``prepare_judges``) it also runs the two judges of
pipeline.judges on the same pixels: off-manifold (far from the corpus, or rough as noise) and
the perceptual copy judge (low-pass L2 and SSIM against the nearest protected images, taken
from the exact knn of the L2 check and decoded from the index).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from spellshield.pipeline import judges as judge_math

# The perceptual judge compares each image with this many of its nearest protected latents (the
# exact knn of the L2 check): a protected image under noise keeps its original as the L2-nearest
# (noise adds about the same to every distance), so the original is among them.
PERCEPTUAL_CANDIDATES = 8
# Protected images the perceptual thresholds are calibrated on (all of them below this count):
# drawn with a fixed seed, so the generator and the audit compute the same thresholds. A sample
# of a larger corpus has larger 1-NN distances than the corpus: the radius errs on the strict side.
CALIBRATION_SAMPLE = 1000


@dataclass(frozen=True)
class Judges:
    """What the final check judges besides the L2 ball (pipeline.judges), calibrated once."""

    perceptual: judge_math.PerceptualThresholds
    corpus_nn_quantile: float | None  # the index's corpus 1-NN distance quantile (off-manifold scale)
    roughness_limit: float  # off-manifold above this roughness (from the same corpus sample)


@dataclass(frozen=True)
class FinalCheck:
    ids: np.ndarray  # int64 (B,): nearest corpus latent
    keys: list[str]
    distances: np.ndarray  # float64 (B,)
    inside: np.ndarray | None  # bool (B,): some protected latent strictly within the radius
    # pipeline.judges, when check_images was given judges (else None):
    off_manifold: np.ndarray | None = None  # bool (B,)
    roughness: np.ndarray | None = None  # float64 (B,)
    perceptual_keys: list[str] | None = None  # corpus key of the closest protected image, low-pass space
    perceptual_distances: np.ndarray | None = None  # float64 (B,): low-pass L2 to it
    perceptual_ssim: np.ndarray | None = None  # float64 (B,): best SSIM over the candidates
    perceptual_copy: np.ndarray | None = None  # bool (B,)


def corpus_images(shield, encoder, ids: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) of indexed latents as the model would write them (the pixel encoder:
    the images exactly; an autoencoder: decoded)."""
    shape = tuple(shield.manifest.latent.shape)
    vectors = shield.vectors(np.asarray(ids, dtype=np.int64))
    return np.asarray(encoder.decode(vectors.reshape(-1, *shape)), dtype=np.uint8)


def prepare_judges(shield, encoder, sample_size: int = CALIBRATION_SAMPLE, seed: int = 0) -> Judges:
    """Calibrate the perceptual judge on protected images and read the off-manifold scale."""
    count = int(shield.manifest.count)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(count, size=min(sample_size, count), replace=False)).astype(np.int64)
    images = np.concatenate([corpus_images(shield, encoder, ids[i : i + 256]) for i in range(0, len(ids), 256)])
    quantiles = (shield.manifest.calibration or {}).get("nn_distance_quantiles") or {}
    scale = quantiles.get(judge_math.DISTANCE_QUANTILE)
    return Judges(perceptual=judge_math.calibrate(images), corpus_nn_quantile=float(scale) if scale else None,
                  roughness_limit=judge_math.roughness_limit(images))


def check_images(images_uint8: np.ndarray, encoder, shield, radius: float | None = None,
                 judges: Judges | None = None) -> FinalCheck:
    """Exact nearest corpus latent of each image (B, H, W, 3) uint8, and the inside-shield flag;
    with ``judges`` also the off-manifold and perceptual-copy verdicts (pipeline.judges)."""
    resolution = shield.manifest.latent.resolution
    if images_uint8.shape[1:3] != (resolution, resolution):
        raise ValueError(
            f"images are {images_uint8.shape[1]}x{images_uint8.shape[2]}, the index was built at {resolution}x{resolution}"
        )
    latents = encoder.encode(images_uint8).reshape(len(images_uint8), -1)
    found = shield.knn(latents, PERCEPTUAL_CANDIDATES if judges is not None else 1)
    ids = np.array([f[0][0] for f in found], dtype=np.int64)
    distances = np.array([float(f[1][0]) for f in found], dtype=np.float64)
    inside = None
    if radius is not None:
        inside = np.array([len(hit_ids) > 0 for hit_ids, _ in shield.range_search(latents, radius)], dtype=bool)
    check = FinalCheck(ids=ids, keys=shield.keys(ids), distances=distances, inside=inside)
    if judges is None:
        return check
    # every image gets K candidates (an index smaller than K: its last one repeated)
    k = max(len(f[0]) for f in found)
    cand_ids = np.array([[int(f[0][min(j, len(f[0]) - 1)]) for j in range(k)] for f in found], dtype=np.int64)
    candidates = corpus_images(shield, encoder, cand_ids.reshape(-1)).reshape(len(found), k, *images_uint8.shape[1:])
    verdict = judge_math.judge(images_uint8, candidates, judges.perceptual)
    closest = cand_ids[np.arange(len(found)), verdict.index]
    return dataclasses.replace(
        check, off_manifold=judge_math.off_manifold(images_uint8, distances, judges.corpus_nn_quantile, judges.roughness_limit),
        roughness=judge_math.roughness(images_uint8), perceptual_keys=shield.keys(closest),
        perceptual_distances=verdict.distance, perceptual_ssim=verdict.ssim, perceptual_copy=verdict.copy,
    )
