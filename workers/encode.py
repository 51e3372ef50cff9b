"""The steps of the corpus-encoding dataflow, as plain functions and a plain class.

Ray Data schedules them (``jobs.dataflow``), but each one takes and returns ordinary Python
rows, so they are tested without Ray (the clip-retrieval reader/mapper split).

    read_chunks   flat_map: one tar -> chunk rows of up to ``chunk_size`` samples, decoded to
                  uint8 RGB at the target resolution; unreadable samples carry their reason
    ChunkEncoder  map on an actor pool: a chunk's pixels -> flattened scaled latents

A row is a *chunk* of one tar rather than a sample so that the batch the encoder sees is fixed
by the corpus alone (the tar and the chunk size): a resumed build, which encodes only some
tars, feeds every image through the network in the same batch as an uninterrupted one, and gets
the same bits back. A chunk row:

    part (int)   the tar's position in the corpus       chunk (int), last (bool)
    shard (str)  the tar's base name                      keys, sha256, reasons (lists, every sample)
    pixels (bytes)  uint8 (n_ok, H, W, 3) of the samples whose reason is "" (OK), in order
    tar_sha256 (str)  sha256 of the whole tar file, in the last chunk ("" in the others): what a
                    resumed build compares before it trusts the tar's part (resume by content)
    latents (bytes) after the encoder: (n_ok, dim) in the build's dtype; dim (int)
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterator

import numpy as np

from spellshield.indexing.corpus import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MIN_SIZE, Reject, decode_image, iter_shard

OK = ""  # the reason of a sample that is fine


def read_chunks(row: dict, resolution: int, chunk_size: int, min_size: int = DEFAULT_MIN_SIZE,
                max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Every sample of the tar at ``row["path"]``, decoded, in chunks of ``chunk_size`` samples."""
    shard = os.path.basename(row["path"])
    number = 0
    keys, hashes, reasons, pixels = [], [], [], []
    tar_digest = hashlib.sha256()

    def chunk(last: bool) -> dict:
        stacked = np.stack(pixels) if pixels else np.zeros((0, resolution, resolution, 3), np.uint8)
        return {"part": int(row["part"]), "chunk": number, "last": last, "shard": shard, "keys": list(keys),
                "sha256": list(hashes), "reasons": list(reasons), "pixels": stacked.tobytes(), "resolution": resolution,
                "tar_sha256": tar_digest.hexdigest() if last else ""}

    for item in iter_shard(row["path"], max_member_bytes, digest=tar_digest):
        if isinstance(item, Reject):
            keys.append(item.key), hashes.append(""), reasons.append(item.reason)
        else:
            keys.append(item.key), hashes.append(item.sha256)
            try:
                pixels.append(decode_image(item.image, resolution, min_size))
                reasons.append(OK)
            except ValueError as exc:
                reasons.append(str(exc))
        if len(keys) == chunk_size:
            yield chunk(last=False)
            number += 1
            keys, hashes, reasons, pixels = [], [], [], []
    yield chunk(last=True)  # possibly empty: it tells the driver how many chunks the tar had


class ChunkEncoder:
    """Encode the decoded images of a chunk row; the latents replace the pixels in the row."""

    def __init__(self, encoder_spec: str, device: str = "cpu", dtype: str = "float32", torch_threads: int | None = None):
        # Imported here, not at module level: the read tasks import this module too, and need
        # neither torch nor diffusers (about 2 s and 230 MiB per worker process).
        from spellshield.indexing.encoders import Encoder
        from spellshield.workers.console import quiet_libraries

        quiet_libraries()
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.encoder = Encoder(encoder_spec, device=device).init()
        self.dtype = np.dtype(dtype)

    def __call__(self, row: dict) -> dict:
        resolution = int(row["resolution"])
        # bytearray: a writable copy, which torch.from_numpy wants (a read-only buffer makes it warn)
        pixels = np.frombuffer(bytearray(row.pop("pixels")), dtype=np.uint8).reshape(-1, resolution, resolution, 3)
        if len(pixels):
            latents = self.encoder.encode(pixels).reshape(len(pixels), -1).cpu().numpy()
        else:
            latents = np.zeros((0, 0), np.float32)
        row["dim"] = int(latents.shape[1])
        row["latents"] = latents.astype(self.dtype).tobytes()  # fp16 rounding happens here, once
        return row


def chunk_latents(row: dict, dtype: str) -> np.ndarray:
    """The latents of an encoded chunk row as an (n_ok, dim) array."""
    dim = int(row["dim"])
    flat = np.frombuffer(row["latents"], dtype=np.dtype(dtype))
    return flat.reshape(-1, dim) if dim else flat.reshape(0, 0)
