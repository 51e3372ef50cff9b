"""The steps of the corpus-encoding dataflow, as plain functions and a plain class.

Ray Data schedules them (``jobs.dataflow``), but each one takes and returns ordinary Python or
numpy batches, so they are tested without Ray (the clip-retrieval reader/mapper split).

    read_shard_rows  flat_map: one tar path -> one row per sample, rejects included
    decode_batch     map_batches: image bytes -> uint8 RGB at the target resolution, or a reason
    BatchEncoder     map_batches on an actor pool: pixels -> flattened scaled latents
"""

from __future__ import annotations

import numpy as np

from indexing.corpus import DEFAULT_MIN_SIZE, Reject, decode_image, iter_shard
from indexing.encoders import Encoder

OK = ""  # the reason column of a row that is fine


def read_shard_rows(row: dict) -> list[dict]:
    """Every sample of the tar at ``row["path"]``; unreadable ones carry their reason."""
    out = []
    for position, item in enumerate(iter_shard(row["path"])):
        if isinstance(item, Reject):
            out.append({"key": item.key, "shard": item.shard, "image": b"", "sha256": "", "reason": item.reason,
                        "order": position, "shard_index": row["shard_index"]})
        else:
            out.append({"key": item.key, "shard": item.shard, "image": item.image, "sha256": item.sha256, "reason": OK,
                        "order": position, "shard_index": row["shard_index"]})
    return out


def decode_batch(batch: dict, resolution: int, min_size: int = DEFAULT_MIN_SIZE) -> dict:
    """Decode, convert to RGB, resize and centre-crop; failures become a reason, not a crash."""
    n = len(batch["key"])
    pixels = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    reasons = [str(r) for r in batch["reason"]]
    for i in range(n):
        if reasons[i] != OK:
            continue
        try:
            pixels[i] = decode_image(bytes(batch["image"][i]), resolution, min_size)
        except ValueError as exc:
            reasons[i] = str(exc)
    out = {k: v for k, v in batch.items() if k != "image"}
    out["reason"] = np.array(reasons, dtype=object)
    out["pixels"] = pixels
    return out


class BatchEncoder:
    """Encode the decodable rows of a batch; rejected rows keep a zero latent and their reason."""

    def __init__(self, encoder_spec: str, device: str = "cpu"):
        self.encoder = Encoder(encoder_spec, device=device).init()

    def __call__(self, batch: dict) -> dict:
        pixels = batch.pop("pixels")
        ok = np.array([r == OK for r in batch["reason"]], dtype=bool)
        latents = None
        if ok.any():
            encoded = self.encoder.encode(pixels[ok]).reshape(int(ok.sum()), -1).cpu().numpy()
            latents = np.zeros((len(ok), encoded.shape[1]), dtype=np.float32)
            latents[ok] = encoded
        else:
            dim = self.encoder.encode(pixels[:1]).reshape(1, -1).shape[1]
            latents = np.zeros((len(ok), dim), dtype=np.float32)
        batch["latent"] = latents
        return batch
