"""How far apart images are in the index's latent space: the scale a shield radius is read against.

Two distributions, both of 1-NN L2 distances to the indexed corpus:

- the corpus's own: a random sample of indexed latents, each to its nearest *other* latent
  (itself excluded). Half its median is a radius at which balls around two typical neighbours do
  not overlap.
- a held-out sample's (``--holdout``): images that are not in the index, encoded with the index's
  encoder, to their nearest indexed latent. These are what "new, not a copy" looks like; a
  radius above their low quantiles would flag genuinely new images as copies.

The suggested radius is half the corpus median, lowered to the held-out 1% quantile when a
held-out sample is given: then at most about 1% of new images fall inside a ball.

Everything streams shard by shard (two passes: pick the sampled vectors, then search every
shard for them), so memory is one shard plus the samples, whatever the index size.
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from .corpus import Reject, decode_image, expand_shards, iter_shard
from .manifest import IndexFormatError, Manifest

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
CORPUS_RULE = "half the median 1-NN distance of the corpus (self excluded)"
HOLDOUT_RULE = CORPUS_RULE + ", lowered to the 1% quantile of the held-out sample's 1-NN distance to the corpus"


def _read_shard(index_dir: str, file: str):
    path = os.path.join(index_dir, file)
    if not os.path.isfile(path):
        raise IndexFormatError(f"index shard {path} is missing")
    return faiss.read_index(path)


def sample_ids(count: int, sample_size: int, seed: int = 0) -> np.ndarray:
    """Sorted int64 ids of ``min(sample_size, count)`` of ``count`` indexed latents, without replacement."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(sample_size, count), replace=False)).astype(np.int64)


def sample_corpus(index_dir: str, manifest: Manifest, sample_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of ``min(sample_size, count)`` indexed latents drawn without replacement."""
    ids = sample_ids(manifest.count, sample_size, seed)
    vectors = np.empty((len(ids), manifest.latent.dim), np.float32)
    for shard in manifest.shards:
        inside = np.flatnonzero((ids >= shard.first_id) & (ids <= shard.last_id))
        if len(inside):
            index = _read_shard(index_dir, shard.file)
            for row in inside:
                vectors[row] = index.reconstruct(int(ids[row]))
    return ids, vectors


def nearest_distances(index_dir: str, manifest: Manifest, queries: np.ndarray, own_ids: np.ndarray | None = None) -> np.ndarray:
    """L2 distance of each query to its nearest indexed latent, skipping ``own_ids[i]`` for query i."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = np.full(len(queries), np.inf)
    k = 1 if own_ids is None else 2
    for shard in manifest.shards:
        index = _read_shard(index_dir, shard.file)
        d2, found = index.search(queries, min(k, index.ntotal))
        if own_ids is not None:
            d2 = np.where(found == own_ids[:, None], np.inf, d2)
        best = np.minimum(best, d2.min(axis=1))
    return np.sqrt(np.maximum(best, 0.0))


def summarise(distances: np.ndarray) -> dict:
    finite = distances[np.isfinite(distances)]
    if len(finite) == 0:
        return {"sample_size": int(len(distances)), "nn_distance_quantiles": {}}
    return {
        "sample_size": int(len(distances)),
        "nn_distance_quantiles": {f"{q:g}": float(np.quantile(finite, q)) for q in QUANTILES},
        "nn_distance_mean": float(finite.mean()),
    }


def calibrate_index(index_dir: str, manifest: Manifest, sample_size: int = 2000, seed: int = 0,
                    holdout: np.ndarray | None = None, holdout_info: dict | None = None) -> dict:
    """The manifest's ``calibration`` entry (see the module doc for the rule)."""
    ids, vectors = sample_corpus(index_dir, manifest, sample_size, seed)
    corpus = summarise(nearest_distances(index_dir, manifest, vectors, ids) if manifest.count > 1 else np.full(len(ids), np.nan))
    median = corpus["nn_distance_quantiles"].get("0.5")
    suggested = 0.5 * median if median else None
    result = {**corpus, "seed": seed, "suggested_radius": suggested, "rule": CORPUS_RULE}
    if holdout is not None and len(holdout):
        held = summarise(nearest_distances(index_dir, manifest, holdout.reshape(len(holdout), -1)))
        result["holdout"] = {**(holdout_info or {}), **held}
        low = held["nn_distance_quantiles"].get("0.01")
        if low and (suggested is None or low < suggested):
            suggested = low
        result["suggested_radius"] = suggested
        result["rule"] = HOLDOUT_RULE
    return result


def encode_holdout(shards: str, encoder, resolution: int, limit: int, batch_size: int = 64,
                   min_size: int = 8) -> tuple[np.ndarray, dict]:
    """Up to ``limit`` decodable images of ``shards``, in corpus order, encoded (N, D) float32."""
    paths = expand_shards(shards)
    latents, batch, rejects, seen = [], [], 0, 0
    for path in paths:
        for item in iter_shard(path):
            if seen >= limit:
                break
            if isinstance(item, Reject):
                rejects += 1
                continue
            try:
                batch.append(decode_image(item.image, resolution, min_size))
            except ValueError:
                rejects += 1
                continue
            seen += 1
            if len(batch) == batch_size:
                latents.append(encoder.encode(np.stack(batch)).reshape(len(batch), -1).cpu().numpy())
                batch = []
    if batch:
        latents.append(encoder.encode(np.stack(batch)).reshape(len(batch), -1).cpu().numpy())
    out = np.concatenate(latents).astype(np.float32) if latents else np.empty((0, 0), np.float32)
    return out, {"corpus": shards, "rejects": rejects}
