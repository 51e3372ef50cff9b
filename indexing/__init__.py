"""Corpus reading (WebDataset tars), latent encoding (pixels or any diffusers autoencoder),
FAISS shard writing, the manifest, search backends and radius calibration. No Ray.

The names below are imported on first use (PEP 562), so that a process that only reads tars
(a Ray Data read task importing ``indexing.corpus``) does not pay for torch, diffusers and FAISS.
"""

import importlib

_EXPORTS = {
    "CorpusError": "corpus",
    "Reject": "corpus",
    "Sample": "corpus",
    "decode_image": "corpus",
    "expand_shards": "corpus",
    "iter_shard": "corpus",
    "PIXELS": "encoders",
    "Encoder": "encoders",
    "LatentSpec": "encoders",
    "IndexFormatError": "manifest",
    "Manifest": "manifest",
    "read_manifest": "manifest",
    "open_index": "search",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
