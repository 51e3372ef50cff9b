"""Corpus reading (WebDataset tars), latent encoding (pixels or any diffusers autoencoder),
FAISS shard writing, the manifest, search backends and radius calibration. No Ray."""

from .corpus import CorpusError, Reject, Sample, decode_image, expand_shards, iter_shard
from .encoders import PIXELS, Encoder, LatentSpec
from .manifest import IndexFormatError, Manifest, read_manifest
from .search import open_index

__all__ = [
    "PIXELS",
    "CorpusError",
    "Encoder",
    "IndexFormatError",
    "LatentSpec",
    "Manifest",
    "Reject",
    "Sample",
    "decode_image",
    "expand_shards",
    "iter_shard",
    "open_index",
    "read_manifest",
]
