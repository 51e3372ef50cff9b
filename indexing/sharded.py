"""``sharded``: any backend per group of shards, fanned out and merged exactly.

Each part is a shield over a disjoint group of the manifest's shards (in-process here, each on
its own device if asked; as Ray actors in ``workers.index_client``). A query batch goes to every
part at once; parts answer with float64 distances, and the merge orders them by (distance, id)
before anything is rounded to float32, so the merged answer is the one a single shield over the
whole index would give. knn asks every part for its own k nearest: the global k nearest are among
them. ``vectors`` and ``keys`` go to the part that holds each id (by the shards' id ranges).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .exactness import merge
from .manifest import IndexFormatError, Manifest
from .shield import Shield


def shard_groups(num_shards: int, parts: int | None) -> list[list[int]]:
    """Shard numbers split into ``parts`` contiguous groups of near-equal size (default: one each)."""
    parts = num_shards if parts is None else int(parts)
    if not 1 <= parts <= num_shards:
        raise ValueError(f"parts must be in 1..{num_shards} (the index has {num_shards} shards), got {parts}")
    return [g.tolist() for g in np.array_split(np.arange(num_shards), parts)]


class IdRouter:
    """Which part holds each global id, from the manifest's per-shard id ranges."""

    def __init__(self, manifest: Manifest, groups: list[list[int]]):
        ranges = sorted((manifest.shards[n].first_id, manifest.shards[n].last_id, p)
                        for p, group in enumerate(groups) for n in group)
        self.first = np.array([r[0] for r in ranges], np.int64)
        self.last = np.array([r[1] for r in ranges], np.int64)
        self.part = np.array([r[2] for r in ranges], np.int64)
        if np.any(self.first[1:] <= self.last[:-1]):
            raise IndexFormatError("shard id ranges overlap: a sharded shield cannot route ids")

    def parts_of(self, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.first, ids, side="right") - 1
        ok = (pos >= 0) & (ids <= self.last[np.maximum(pos, 0)])
        if not ok.all():
            raise KeyError(f"ids not in this index: {ids[~ok][:5].tolist()}")
        return self.part[pos]


class ShardedShield(Shield):
    """Fan-out and exact merge over in-process part shields (module doc)."""

    backend = "sharded"

    def __init__(self, index_dir: str, manifest: Manifest, parts: list, groups: list[list[int]], device="cpu"):
        super().__init__(index_dir, manifest, [n for g in groups for n in g], device)
        if len(parts) != len(groups):
            raise ValueError(f"{len(parts)} parts for {len(groups)} shard groups")
        self.parts = parts
        self.groups = groups
        self.router = IdRouter(manifest, groups)
        self._pool: ThreadPoolExecutor | None = None

    def _map(self, method: str, *args) -> list:
        """Call ``method`` on every part concurrently (threads: torch and FAISS release the GIL)."""
        def call(part):
            moved = [a.to(part.device) if torch.is_tensor(a) else a for a in args]
            return getattr(part, method)(*moved)

        if len(self.parts) == 1:
            return [call(self.parts[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=len(self.parts), thread_name_prefix="shield-part")
        return list(self._pool.map(call, self.parts))

    def _map_one(self, part: int, method: str, *args):
        return getattr(self.parts[part], method)(*args)

    def range_search64(self, queries, radii, max_k):
        out = merge(self._map("range_search64", queries, radii, max_k), max_k)
        self.stats.add(len(queries), 0, sum(len(i) for i, _ in out))
        return out

    def knn64(self, queries, k):
        return merge(self._map("knn64", queries, k), k)

    def _route(self, ids, method: str, fill):
        ids = np.asarray(ids, np.int64).reshape(-1)
        owner = self.router.parts_of(ids)
        for p in np.unique(owner):
            sel = np.flatnonzero(owner == p)
            fill(sel, self._map_one(int(p), method, ids[sel]))

    def vectors(self, ids) -> torch.Tensor:
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = torch.empty((len(ids), self.dim), dtype=torch.float32, device=self.device)

        def fill(sel, vectors):
            vectors = vectors if torch.is_tensor(vectors) else torch.from_numpy(np.array(vectors, np.float32))  # Ray's are read-only
            out[torch.from_numpy(sel).to(self.device)] = vectors.to(self.device, torch.float32)

        self._route(ids, "vectors", fill)
        return out

    def keys(self, ids) -> list[str]:
        ids = np.asarray(ids, np.int64).reshape(-1)
        out: list = [None] * len(ids)

        def fill(sel, keys):
            for j, key in zip(sel, keys):
                out[j] = key

        self._route(ids, "keys", fill)
        return out

    def part_stats(self) -> list[dict]:
        return [p.stats.to_json() for p in self.parts]

    def candidates_per_query(self) -> float:
        """Candidates handed to the re-checks of all parts, per query of this shield."""
        total = sum(s["candidates"] for s in self.part_stats())
        return total / self.stats.queries if self.stats.queries else 0.0

    def lists_per_query(self) -> float:
        """(query, list) pairs the parts' inverted files probed, per query of this shield (``ivf`` parts)."""
        total = sum(s.get("lists_probed", 0) for s in self.part_stats())
        return total / self.stats.queries if self.stats.queries else 0.0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


def open_sharded(index_dir: str, manifest: Manifest, device="cpu", shard_backend: str = "exact", parts: int | None = None,
                 devices: list | None = None, **options) -> ShardedShield:
    """One ``shard_backend`` shield per group of shards, on ``devices[i]`` (default: ``device``)."""
    from .search import open_part

    if shard_backend == "sharded":
        raise ValueError("shard_backend must be a single-shield backend, not 'sharded'")
    groups = shard_groups(len(manifest.shards), parts)
    devices = [device] * len(groups) if devices is None else list(devices)
    if len(devices) != len(groups):
        raise ValueError(f"{len(devices)} devices for {len(groups)} parts")
    shields = [open_part(index_dir, manifest, shard_backend, d, group, **options) for d, group in zip(devices, groups)]
    return ShardedShield(index_dir, manifest, shields, groups, device)

