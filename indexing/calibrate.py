"""How far apart the corpus's own images are: the scale a shield radius is read against.

The 1-NN distance of each corpus latent to the rest of the corpus (itself excluded) says what
"near" means in this latent space. We record its quantiles in the manifest and suggest a radius
of half the median: balls around two typical neighbours then do not overlap, and a generated
sample inside a ball is closer to that image than half the usual gap between distinct images.
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


def nearest_neighbour_distances(shield, sample_size: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, distances) of up to ``sample_size`` corpus latents to their nearest other latent."""
    rng = np.random.default_rng(seed)
    count = shield.count
    ids = np.sort(rng.choice(count, size=min(sample_size, count), replace=False)).astype(np.int64)
    if count < 2:
        return ids, np.full(len(ids), np.nan)
    queries = shield.vectors(ids)
    distances = np.empty(len(ids))
    for start in range(0, len(ids), 256):
        batch = queries[start : start + 256]
        for j, (found_ids, found_d) in enumerate(shield.knn(batch, 2)):
            own = ids[start + j]
            others = found_d[found_ids != own]
            distances[start + j] = others[0] if len(others) else found_d[-1]
    return ids, distances


def calibrate(shield, sample_size: int = 2000, seed: int = 0) -> dict:
    ids, distances = nearest_neighbour_distances(shield, sample_size, seed)
    finite = distances[np.isfinite(distances)]
    if len(finite) == 0:
        return {"sample_size": int(len(ids)), "nn_distance_quantiles": {}, "suggested_radius": None}
    quantiles = {f"{q:g}": float(np.quantile(finite, q)) for q in QUANTILES}
    median = quantiles["0.5"]
    suggested = 0.5 * median if median > 0 else float(np.max(finite)) * 0.5 or None
    return {
        "sample_size": int(len(ids)),
        "nn_distance_quantiles": quantiles,
        "nn_distance_mean": float(finite.mean()),
        "suggested_radius": suggested,
        "rule": "half the median 1-NN distance of the corpus (self excluded)",
    }
