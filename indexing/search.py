"""Searching a shield index without ever missing a hit: ``open_index`` and its backends.

``open_index(path, backend=..., device=..., **options)`` returns a shield (``indexing.shield``):

    range_search(queries, radius, max_k=None) -> [(ids, distances)]   one pair per query row
    knn(queries, k)                          -> [(ids, distances)]
    vectors(ids) -> torch.Tensor (K, D)      keys(ids) -> list[str]      stats

Backends, one module each (every one a fast pass proven to be a superset, then a float64
re-check; the bounds are in ``indexing.exactness``):

    exact      indexing.exact         torch, CPU or GPU, float16 or float32 storage, chunked GEMM
    faiss      indexing.faiss_search  FAISS flat or IVF (complete probing) per shard; GPU top-k doubling
    projected  indexing.projected     PCA filter on d dims, exact re-check on (memory-mapped) full vectors
    ivf        indexing.ivf           persisted inverted file over the projection: only provably useful lists
    sharded    indexing.sharded       any of the above per group of shards, fanned out, merged exactly

Options by backend (all accept ``shards``: a subset of the manifest's shard numbers):

    exact:     compute="auto"|"float32"|"float16", chunk_rows
    faiss:     index_type="flat"|"ivf", nlist, k0 (first k of the GPU top-k doubling)
    projected: dims=256, full="auto"|"disk"|"memory"|"device", create=True
    ivf:       dims=256, lists (which ivf-<lists>/, default the only one), full="disk"|"memory",
               codes="memory"|"disk"; never trains: ``spellshield project-index --lists K`` writes it
    sharded:   shard_backend="exact", parts (number of groups, default one per shard), devices,
               plus the options of shard_backend
"""

from __future__ import annotations

from .index_cache import local_index_dir
from .manifest import Manifest, read_manifest

BACKENDS = ("exact", "faiss", "projected", "ivf", "sharded")


def open_part(index_dir: str, manifest: Manifest, backend: str, device="cpu", shards=None, **options):
    """A single (not sharded) backend over ``shards`` of an index directory."""
    if backend == "exact":
        from .exact import ExactShield

        return ExactShield(index_dir, manifest, device=device, shards=shards, **options)
    if backend == "faiss":
        from .faiss_search import FaissShield

        return FaissShield(index_dir, manifest, device=device, shards=shards, **options)
    if backend == "projected":
        from .projected import ProjectedShield

        return ProjectedShield(index_dir, manifest, device=device, shards=shards, **options)
    if backend == "ivf":
        from .ivf import IvfShield

        return IvfShield(index_dir, manifest, device=device, shards=shards, **options)
    raise ValueError(f"unknown search backend {backend!r} (choose from {', '.join(BACKENDS)})")


def open_index(index_dir: str, backend: str = "exact", device="cpu", **options):
    """Open a finished index directory with one of the search backends (module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r} (choose from {', '.join(BACKENDS)})")
    index_dir = local_index_dir(index_dir, backend=backend)  # s3://, gs://: this node's verified cached copy
    manifest = read_manifest(index_dir)
    if backend == "sharded":
        from .sharded import open_sharded

        return open_sharded(index_dir, manifest, device=device, **options)
    return open_part(index_dir, manifest, backend, device, **options)


def __getattr__(name):
    # The skeleton's names, kept importable from here without importing every backend eagerly.
    if name == "ExactShield":
        from .exact import ExactShield

        return ExactShield
    if name == "FaissShield":
        from .faiss_search import FaissShield

        return FaissShield
    if name == "Shield":
        from .shield import Shield

        return Shield
    raise AttributeError(name)
