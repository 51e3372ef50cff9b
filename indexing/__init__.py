"""Corpus reading (WebDataset tars), latent encoding (pixels or any diffusers autoencoder),
FAISS shard writing, the manifest, search backends and radius calibration. No Ray.

Names are imported on first use, so that ``spellshield.indexing.exact`` or ``.projected`` load
with torch and numpy alone (the GPU benchmark runs where FAISS, PIL and pyarrow are absent)."""

from importlib import import_module

_EXPORTS = {
    "PIXELS": ".latent",
    "CorpusError": ".corpus",
    "Encoder": ".encoders",
    "IndexFormatError": ".manifest",
    "LatentSpec": ".latent",
    "Manifest": ".manifest",
    "Reject": ".corpus",
    "Sample": ".corpus",
    "decode_image": ".corpus",
    "expand_shards": ".corpus",
    "iter_shard": ".corpus",
    "open_index": ".search",
    "read_manifest": ".manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
