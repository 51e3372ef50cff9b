"""Where shielded points come from at each denoising step.

A source answers, for a batch of flattened predictions ``x0_hat`` (B, D), which shielded points
lie strictly inside its radius of each row, nearest first. Sources know nothing of schedulers.

- ``IndexSource``: the protected corpus, searched through any object with
  ``range_search(queries, radius, max_k=None) -> [(ids, distances)]`` and
  ``vectors(ids) -> (K, D) tensor`` (the shields of ``indexing.search``).
- ``StaticSource``: a small set of points held in memory, searched exactly.
- ``BatchSource``: the other trajectories of the same batch (never the row itself): SPELL's
  diversity mode.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .repellency import Neighbours


class ShieldSource(Protocol):
    name: str
    radius: float

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        """Neighbours strictly inside ``radius`` of each query row, nearest first."""
        ...


class SearchableShield(Protocol):
    def range_search(self, queries: torch.Tensor, radius: float, max_k: int | None = None): ...

    def vectors(self, ids: torch.Tensor) -> torch.Tensor: ...


class IndexSource:
    """The protected corpus: a static index searched at every step."""

    name = "index"

    def __init__(self, shield: SearchableShield, radius: float):
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")
        self.shield = shield
        self.radius = float(radius)

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        found = self.shield.range_search(queries, self.radius)
        out = []
        for ids, distances in found:
            ids = torch.as_tensor(ids, dtype=torch.int64)
            vectors = self.shield.vectors(ids).to(queries.device)
            out.append(Neighbours(ids=ids, vectors=vectors, distances=torch.as_tensor(distances)))
        return out


class StaticSource:
    """A fixed set of shielded points held in memory and searched exactly (float64).

    For small shields (a rights holder's handful of images) and as the exact reference the
    index-backed sources are tested against.
    """

    name = "index"

    def __init__(self, points: torch.Tensor, radius: float, name: str = "index"):
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")
        self.points = points.reshape(points.shape[0], -1)
        self.radius = float(radius)
        self.name = name

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        points = self.points.to(queries.device)
        dist = torch.cdist(queries.to(torch.float64), points.to(torch.float64))
        out = []
        for row in range(queries.shape[0]):
            inside = torch.nonzero(dist[row] < self.radius).flatten()
            idx = inside[torch.argsort(dist[row, inside])]
            out.append(Neighbours(ids=idx.to(torch.int64), vectors=points[idx], distances=dist[row, idx].to(queries.dtype)))
        return out


class BatchSource:
    """The other rows of the batch: repel each prediction from its siblings' predictions.

    Row ``j`` is reported with id ``j`` (its position in the batch); a row is never its own
    neighbour. ``groups`` (one label per row, e.g. the prompt) restricts repellency to rows of
    the same group, so that different prompts in one batch do not push each other.
    """

    name = "batch"

    def __init__(self, radius: float, groups: Sequence | None = None):
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")
        self.radius = float(radius)
        self.groups = list(groups) if groups is not None else None

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        q = queries.to(torch.float64)
        dist = torch.cdist(q, q)
        batch = q.shape[0]
        dist.fill_diagonal_(float("inf"))
        if self.groups is not None:
            if len(self.groups) != batch:
                raise ValueError(f"{len(self.groups)} group labels for a batch of {batch}")
            same = torch.tensor([[a == b for b in self.groups] for a in self.groups])
            dist = torch.where(same, dist, torch.full_like(dist, float("inf")))
        out = []
        for row in range(batch):
            inside = torch.nonzero(dist[row] < self.radius).flatten()
            order = torch.argsort(dist[row, inside])
            idx = inside[order]
            out.append(
                Neighbours(ids=idx.to(torch.int64), vectors=queries[idx], distances=dist[row, idx].to(queries.dtype))
            )
        return out
