"""The one interface every search backend offers (``open_index`` returns one of these).

    range_search(queries, radius, max_k=None) -> [(ids, distances)]   one pair per query row
    knn(queries, k)                          -> [(ids, distances)]
    vectors(ids) -> torch.Tensor (K, D)      the stored latents (float32), for the repellency term
    keys(ids)    -> list[str]                corpus keys, for the audit log
    stats                                    how much work the fast pass left to the re-check

``queries`` is a float tensor or array (B, D) in the index's latent space (flattened C, H, W),
searched as float32. ids are the global int64 ids of ``ids-*.parquet``; distances are float32
L2, not squared, nearest first, ties broken by id. A hit is a stored vector strictly inside the
radius, decided in float64 (see ``indexing.exactness``).

Backends implement two float64 methods, ``range_search64(queries, radii, max_k)`` (one radius
per query) and ``knn64(queries, k)``, which the sharded backends merge without re-rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .exactness import check_k, check_max_k, check_radius, public
from .manifest import Manifest
from .store import KeyTable, select_shards


@dataclass
class SearchStats:
    """Running totals of a shield's searches: how selective its fast pass (or filter) was."""

    queries: int = 0
    candidates: int = 0  # (query, vector) pairs the fast pass or filter handed to the re-check
    hits: int = 0  # pairs the re-check kept
    lists_probed: int = 0  # (query, list) pairs an inverted file scanned (``ivf`` only)

    def add(self, queries: int, candidates: int, hits: int, lists_probed: int = 0) -> None:
        self.queries += int(queries)
        self.candidates += int(candidates)
        self.hits += int(hits)
        self.lists_probed += int(lists_probed)

    @property
    def candidates_per_query(self) -> float:
        return self.candidates / self.queries if self.queries else 0.0

    @property
    def lists_per_query(self) -> float:
        return self.lists_probed / self.queries if self.queries else 0.0

    def reset(self) -> None:
        self.queries = self.candidates = self.hits = self.lists_probed = 0

    def to_json(self) -> dict:
        return {"queries": self.queries, "candidates": self.candidates, "hits": self.hits,
                "candidates_per_query": self.candidates_per_query, "lists_probed": self.lists_probed,
                "lists_per_query": self.lists_per_query}


def as_query_tensor(queries, dim: int, device) -> torch.Tensor:
    """queries as a float32 (B, dim) tensor on ``device``; non-finite values fail closed."""
    q = queries if torch.is_tensor(queries) else torch.as_tensor(np.asarray(queries))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (B, {dim}), got {tuple(q.shape)}")
    q = q.detach().to(device=device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(q).all()):
        raise ValueError("queries contain NaN or infinite values: they cannot be searched")
    return q


class Shield:
    """Common parts: the manifest, the shards this shield serves, keys, argument checks."""

    backend = "?"

    def __init__(self, index_dir: str, manifest: Manifest, shards=None, device="cpu"):
        self.index_dir = index_dir
        self.manifest = manifest
        self.shard_infos = select_shards(manifest, shards)
        self.dim = manifest.latent.dim
        self.count = sum(s.count for s in self.shard_infos)
        self.device = torch.device(device)
        self.stats = SearchStats()
        self._key_table = KeyTable(index_dir, self.shard_infos)

    # -- the public interface ------------------------------------------------------------------

    def range_search(self, queries, radius: float, max_k: int | None = None):
        radius, max_k = check_radius(radius), check_max_k(max_k)
        q = as_query_tensor(queries, self.dim, self.device)
        return public(self.range_search64(q, np.full(len(q), radius), max_k))

    def knn(self, queries, k: int):
        k = min(check_k(k), self.count)
        q = as_query_tensor(queries, self.dim, self.device)
        return public(self.knn64(q, k))

    def keys(self, ids) -> list[str]:
        return self._key_table.keys(ids)

    def vectors(self, ids) -> torch.Tensor:
        raise NotImplementedError

    # -- what a backend implements -------------------------------------------------------------

    def range_search64(self, queries: torch.Tensor, radii: np.ndarray, max_k: int | None):
        """(ids, float64 distances) strictly inside ``radii[i]`` of each float32 query row."""
        raise NotImplementedError

    def knn64(self, queries: torch.Tensor, k: int):
        """(ids, float64 distances) of the k nearest stored vectors, ties by id; k <= count."""
        raise NotImplementedError
