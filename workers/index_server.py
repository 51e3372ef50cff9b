"""An index-shard server: one group of an index's shards, searched by any single backend.

A plain class (``workers.index_client`` runs it as a Ray actor; tests call it directly). It
answers in float64 and numpy, so that the client merges parts exactly and nothing but arrays
crosses the wire:

    server = IndexShardServer(index_dir, shards=[0, 1], backend="exact", device="cuda")
    server.range_search64(queries, radii, max_k) -> [(ids int64, distances float64)]
    server.knn64(queries, k), server.vectors(ids) -> float32 array, server.keys(ids), server.info()
"""

from __future__ import annotations

import os

import numpy as np

from spellshield.indexing.index_cache import local_index_dir
from spellshield.indexing.search import open_part
from spellshield.indexing.manifest import read_manifest
from spellshield.indexing.verify import verify_checksums
from spellshield.indexing.shield import as_query_tensor
from spellshield.workers.placement import node_id


class IndexShardServer:
    def __init__(self, index_dir: str, shards, backend: str = "exact", device: str = "cpu", **options):
        # An index on object storage: this node's cached copy of the shards it serves (verified).
        index_dir = local_index_dir(index_dir, list(shards), backend=backend)
        self.index_dir = index_dir
        self.manifest = read_manifest(index_dir)
        # Fail closed: a server (or a restarted one) serves only shards that match the manifest.
        verify_checksums(index_dir, self.manifest, list(shards))
        self.shield = open_part(index_dir, self.manifest, backend, device, list(shards), **options)

    def range_search64(self, queries: np.ndarray, radii: np.ndarray, max_k: int | None):
        q = as_query_tensor(queries, self.shield.dim, self.shield.device)
        return self.shield.range_search64(q, np.asarray(radii, np.float64), max_k)

    def knn64(self, queries: np.ndarray, k: int):
        q = as_query_tensor(queries, self.shield.dim, self.shield.device)
        return self.shield.knn64(q, min(int(k), self.shield.count))

    def vectors(self, ids) -> np.ndarray:
        return self.shield.vectors(np.asarray(ids, np.int64)).cpu().numpy()

    def keys(self, ids) -> list[str]:
        return self.shield.keys(np.asarray(ids, np.int64))

    def stats(self) -> dict:
        return self.shield.stats.to_json()

    def info(self) -> dict:
        return {
            "manifest": self.manifest.to_json(),
            "shards": [s.file for s in self.shield.shard_infos],
            "count": self.shield.count,
            "backend": self.shield.backend,
            "device": str(self.shield.device),
            "node": node_id(),
            "pid": os.getpid(),
        }
