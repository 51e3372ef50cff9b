"""Judges of a finished image beyond the shield's L2 ball: pure math on pixels (numpy only).

The shield's own judge is the L2 distance in the index's latent space (pixels or an
autoencoder's latents): inside the radius of a protected latent means a copy. Two ways to fool
it that a memorizing model finds by itself (benchmarks/RESULTS.md, "Noise and perceptual
copies"), and the two judges here that catch them, both computed from the written uint8 image:

- **Off-manifold**: an output far from everything the model knows, e.g. saturated RGB noise.
  ``off_manifold`` flags an image whose nearest corpus distance is more than
  ``DISTANCE_FACTOR`` times the corpus's own 0.9 quantile of 1-NN distances (the index's
  calibration), or whose ``roughness`` (mean absolute difference of neighbouring pixels, in
  units of the full range) exceeds ``ROUGHNESS_FACTOR`` times the corpus's 0.99 quantile of
  it. Measured on 2,000 held-out CIFAR-10 images (shard 1) against 500 protected ones (shard 0,
  pixels, 32 px): nearest distance at most 1.43 x the 0.9 quantile, roughness at most 0.144
  (limit: 2 x 0.10); the saturated noise SPELL wrote at lam 10 before the late-step gate:
  1.8 x and about 0.5. What it misses: a smooth image that is
  simply new, which is what it should miss; in a small index (a rights holder's handful of
  images) "far from the corpus" says little and only the roughness test is meaningful.
- **Perceptual copy**: a protected image under high-frequency noise is 1.4-1.6 r away in L2
  ("not a copy") while the object is plainly visible. The judge compares low-passed images
  (``low_pass``: a Gaussian blur of ``sigma = resolution / 16`` pixels), where white noise
  loses most of its energy (by about 4 pi sigma^2 = 50x in power at 32 px) and image content
  little: ``perceptual_distance`` is the L2 distance of the blurred images in the index's pixel
  units ([-1, 1]), and ``ssim`` the structural similarity (Wang et al. 2004) of the blurred
  images. A copy is ``distance < radius`` or ``ssim > ssim_threshold``, both calibrated on the
  protected corpus by ``calibrate`` with the same rule as the shield radius: half the median
  1-NN distance of corpus images in the blurred space, and the 0.99 quantile of the SSIM of
  each corpus image with its blurred-space nearest neighbour. What it misses: a copy altered at
  low frequencies (recoloured, shifted, cropped, mirrored) - an SSCD-like descriptor would be
  the judge for those; and it needs the protected image's pixels (decoded from the index for an
  autoencoder space, so only as exact as the decoder).
- **Descriptor copy** (optional, where the user has a copy-detection model's weights, e.g.
  SSCD exported to TorchScript): ``unit_rows`` of the model's descriptors, cosine similarity
  with every protected image's, a copy above ``descriptor_threshold`` (the 0.99 quantile of
  the corpus's own 1-NN similarity, the SSIM threshold's rule). It catches what such a model
  was trained to: copies recoloured, cropped, shifted, mirrored; it misses what its training
  augmentations did not cover, and it is only as good as the model the user brings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DISTANCE_FACTOR = 1.6  # off-manifold: nearest distance > this x corpus 0.9 quantile of 1-NN distance
DISTANCE_QUANTILE = "0.9"  # the calibration quantile it multiplies (indexing.calibrate.QUANTILES)
ROUGHNESS_FACTOR = 2.0  # off-manifold: roughness above this x the corpus's 0.99 quantile of roughness
ROUGHNESS_QUANTILE = 0.99
BLUR_FRACTION = 1 / 16  # low-pass sigma = resolution * BLUR_FRACTION pixels
SSIM_WINDOW = 7  # uniform SSIM window (pixels), as in skimage's default
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004
DATA_RANGE = 2.0  # pixels in [-1, 1]
RADIUS_RULE = "half the median 1-NN distance of the corpus in the low-pass space"
SSIM_QUANTILE = 0.99  # ssim_threshold: this quantile of corpus 1-NN SSIM


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
    """(B, H, W, C) uint8 -> float64 in [-1, 1], the pixel encoder's scale."""
    return np.asarray(images_uint8, dtype=np.float64) / 127.5 - 1.0


def roughness(images_uint8: np.ndarray) -> np.ndarray:
    """Mean absolute difference of horizontally and vertically neighbouring values / 255, (B,)."""
    x = np.asarray(images_uint8, dtype=np.float64)
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
    return (dx + dy) / 2 / 255.0


def saturated_share(images_uint8: np.ndarray) -> np.ndarray:
    """Share of channel values at 0 or 255, (B,) (reported; too common in natural images to judge by)."""
    x = np.asarray(images_uint8)
    return ((x == 0) | (x == 255)).mean(axis=(1, 2, 3))


def roughness_limit(corpus_uint8: np.ndarray) -> float:
    """ROUGHNESS_FACTOR x the corpus's 0.99 quantile of roughness: roughness depends on the
    resolution and the kind of image (8 px digits: median 0.24; 32 px CIFAR: 0.06), so the
    limit is read off the corpus itself."""
    return ROUGHNESS_FACTOR * float(np.quantile(roughness(corpus_uint8), ROUGHNESS_QUANTILE))


def off_manifold(images_uint8: np.ndarray, nearest_distances: np.ndarray | None,
                 corpus_nn_quantile: float | None, rough_limit: float) -> np.ndarray:
    """Far beyond the corpus's own 1-NN distances, or rougher than the corpus (bool (B,))."""
    flags = roughness(images_uint8) > rough_limit
    if nearest_distances is not None and corpus_nn_quantile:
        flags |= np.asarray(nearest_distances, dtype=np.float64) > DISTANCE_FACTOR * corpus_nn_quantile
    return flags


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """Separable correlation of (B, H, W, C) with ``kernel`` along H and W.

    mode "reflect": same size (edges mirrored); "valid": only full windows."""
    r = len(kernel) // 2
    if mode == "reflect":
        x = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    h, w = x.shape[1] - len(kernel) + 1, x.shape[2] - len(kernel) + 1
    rows = sum(kernel[i] * x[:, i : i + h] for i in range(len(kernel)))
    return sum(kernel[i] * rows[:, :, i : i + w] for i in range(len(kernel)))


def low_pass(images: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Gaussian blur of (B, H, W, C) float images; sigma defaults to resolution * BLUR_FRACTION."""
    images = np.asarray(images, dtype=np.float64)
    sigma = sigma if sigma is not None else images.shape[1] * BLUR_FRACTION
    return _filter(images, gaussian_kernel(sigma), "reflect")


def ssim(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW, data_range: float = DATA_RANGE) -> np.ndarray:
    """Mean SSIM of image pairs (B, H, W, C) over channels and full windows (Wang et al. 2004,
    uniform window, sample covariances as in skimage), (B,)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    window = min(window, a.shape[1], a.shape[2])
    kernel = np.full(window, 1.0 / window)
    mean = lambda x: _filter(x, kernel, "valid")  # noqa: E731
    n = window * window
    unbias = n / (n - 1) if n > 1 else 1.0
    ma, mb = mean(a), mean(b)
    va = (mean(a * a) - ma * ma) * unbias
    vb = (mean(b * b) - mb * mb) * unbias
    cov = (mean(a * b) - ma * mb) * unbias
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return s.mean(axis=(1, 2, 3))


def perceptual_distance(a: np.ndarray, b: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """L2 distance of the low-passed images (B, H, W, C) in [-1, 1] units, (B,)."""
    diff = low_pass(a, sigma) - low_pass(b, sigma)
    return np.sqrt((diff * diff).reshape(len(diff), -1).sum(axis=1))


@dataclass(frozen=True)
class PerceptualThresholds:
    """When the perceptual judge calls a pair a copy; from ``calibrate``."""

    radius: float  # low-pass L2 below this: a copy
    ssim_threshold: float  # SSIM of the low-passed images above this: a copy
    sample_size: int
    rule: str = RADIUS_RULE

    def __post_init__(self):
        if not (self.radius > 0 and math.isfinite(self.radius)):
            raise ValueError(f"perceptual radius must be finite and > 0, got {self.radius!r}")
        if not -1 <= self.ssim_threshold <= 1:
            raise ValueError(f"ssim_threshold must be in [-1, 1], got {self.ssim_threshold!r}")


@dataclass(frozen=True)
class Verdict:
    """The perceptual judge's view of each image (B,): its closest candidate and the call."""

    index: np.ndarray  # int64: which candidate (position in the candidate list) is closest
    distance: np.ndarray  # float64: low-pass L2 to it
    ssim: np.ndarray  # float64: largest SSIM over the candidates
    copy: np.ndarray  # bool


def calibrate(corpus_uint8: np.ndarray, sigma: float | None = None, chunk: int = 256) -> PerceptualThresholds:
    """Thresholds from corpus images (N, H, W, C) uint8, N >= 2: each image's nearest *other*
    image in the low-pass space gives the 1-NN distance (radius = half their median, the shield
    radius's rule) and the SSIM with it (threshold = its 0.99 quantile)."""
    n = len(corpus_uint8)
    if n < 2:
        raise ValueError("perceptual calibration needs at least 2 corpus images")
    blurred = low_pass(to_unit(corpus_uint8), sigma)
    flat = blurred.reshape(n, -1)
    sq = (flat * flat).sum(axis=1)
    nearest = np.empty(n, dtype=np.int64)
    dist = np.empty(n)
    for start in range(0, n, chunk):
        d2 = sq[start : start + chunk, None] - 2 * flat[start : start + chunk] @ flat.T + sq[None]
        d2[np.arange(len(d2)), np.arange(start, start + len(d2))] = np.inf
        nearest[start : start + chunk] = d2.argmin(axis=1)
        dist[start : start + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    similarity = ssim(blurred, blurred[nearest])
    return PerceptualThresholds(radius=float(np.median(dist)) / 2, ssim_threshold=float(np.quantile(similarity, SSIM_QUANTILE)),
                                sample_size=n)


def judge(images_uint8: np.ndarray, candidates_uint8: np.ndarray, thresholds: PerceptualThresholds,
          sigma: float | None = None) -> Verdict:
    """Each image (B, H, W, C) against its own candidates (B, K, H, W, C), K >= 1: the closest
    candidate in the low-pass space, the best SSIM, and whether either judge calls it a copy."""
    b, k = candidates_uint8.shape[:2]
    images = low_pass(to_unit(images_uint8), sigma)
    cands = low_pass(to_unit(candidates_uint8.reshape(b * k, *candidates_uint8.shape[2:])), sigma)
    repeated = np.repeat(images, k, axis=0)
    diff = (repeated - cands).reshape(b, k, -1)
    dist = np.sqrt((diff * diff).sum(axis=2))
    sims = ssim(repeated, cands).reshape(b, k)
    index = dist.argmin(axis=1)
    best = dist[np.arange(b), index]
    best_ssim = sims.max(axis=1)
    return Verdict(index=index.astype(np.int64), distance=best, ssim=best_ssim,
                   copy=(best < thresholds.radius) | (best_ssim > thresholds.ssim_threshold))


# -- a pluggable copy-detection descriptor (an SSCD-like model, where the user has its weights) ---
DESCRIPTOR_QUANTILE = 0.99  # descriptor threshold: this quantile of the corpus's 1-NN cosine similarity


def unit_rows(descriptors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32): cosine similarity is then a dot product."""
    d = np.asarray(descriptors, dtype=np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def descriptor_threshold(corpus_unit: np.ndarray, chunk: int = 1024) -> float:
    """The descriptor judge's threshold, by the SSIM threshold's rule: the DESCRIPTOR_QUANTILE
    quantile of each corpus image's cosine similarity with its most similar *other* image
    (N >= 2 unit rows). A generated image more similar than that to a protected one is a copy."""
    n = len(corpus_unit)
    if n < 2:
        raise ValueError("descriptor calibration needs at least 2 corpus images")
    best = np.empty(n)
    for start in range(0, n, chunk):
        sims = corpus_unit[start : start + chunk] @ corpus_unit.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        best[start : start + chunk] = sims.max(axis=1)
    return float(np.quantile(best, DESCRIPTOR_QUANTILE))
