"""Where shielded points come from at each denoising step.

A source answers, for a batch of flattened predictions ``x0_hat`` (B, D), which shielded points
lie strictly inside its radius of each row, nearest first. Sources know nothing of schedulers.
Several sources combine (their deltas add, each with its own radius), e.g. a protected corpus
with r = 4 and the batch siblings with r = 2.

- ``IndexSource``: the protected corpus, searched through any object with
  ``range_search(queries, radius, max_k=None) -> [(ids, distances)]`` and
  ``vectors(ids) -> (K, D) tensor`` (the shields of ``indexing.search``).
- ``StaticSource``: a small set of points held in memory, searched exactly.
- ``BatchSource``: the other trajectories of the same batch (never the row itself), only those
  of the same group (prompt): SPELL's diversity mode.
- ``HistorySource``: a bounded bank of earlier outputs per group (prompt), so that a prompt
  sampled batch after batch keeps producing new images.

Sources that need to know who the rows are (batch, history) get ``bind(rows)`` with one
``SampleRow`` per batch row before each sampling call (``ShieldedScheduler.bind_batch``). Every
source names its neighbours for the audit log with ``keys(ids)``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

import torch

from .repellency import Neighbours

SOURCE_NAMES = ("index", "batch", "history")


@dataclass(frozen=True)
class SampleRow:
    """Who one row of the batch is: its sample key (for the audit) and its group (the prompt)."""

    key: str | None = None
    group: Hashable = None


class ShieldSource(Protocol):
    name: str
    radius: float

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        """Neighbours strictly inside ``radius`` of each query row, nearest first."""
        ...

    def keys(self, ids: Sequence[int]) -> list[str | None]:
        """Audit names of neighbours (corpus keys, sample keys)."""
        ...


class SearchableShield(Protocol):
    def range_search(self, queries: torch.Tensor, radius: float, max_k: int | None = None): ...

    def vectors(self, ids: torch.Tensor) -> torch.Tensor: ...


def _positive_radius(radius: float) -> float:
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    return float(radius)


def _exact_inside(queries: torch.Tensor, points: torch.Tensor, radius: float, allowed: torch.Tensor | None = None):
    """Per query row, (ids, distances) of ``points`` strictly inside ``radius``, nearest first.

    float64 distances; ``allowed`` (B, N) bool masks out pairs (self, other groups). Ties by id.
    """
    if points.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return [(empty, torch.empty(0, dtype=torch.float64)) for _ in range(queries.shape[0])]
    dist = torch.cdist(queries.to(torch.float64), points.to(device=queries.device, dtype=torch.float64))
    if allowed is not None:
        dist = torch.where(allowed.to(dist.device), dist, torch.full_like(dist, float("inf")))
    out = []
    for row in range(queries.shape[0]):
        inside = torch.nonzero(dist[row] < radius).flatten()
        order = torch.argsort(dist[row, inside], stable=True)  # inside is ascending: ties keep id order
        idx = inside[order]
        out.append((idx.to(torch.int64), dist[row, idx]))
    return out


class IndexSource:
    """The protected corpus: a static index searched at every step."""

    name = "index"

    def __init__(self, shield: SearchableShield, radius: float):
        self.shield = shield
        self.radius = _positive_radius(radius)

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        found = self.shield.range_search(queries, self.radius)
        out = []
        for ids, distances in found:
            ids = torch.as_tensor(ids, dtype=torch.int64)
            vectors = self.shield.vectors(ids).to(queries.device)
            out.append(Neighbours(ids=ids, vectors=vectors, distances=torch.as_tensor(distances)))
        return out

    def keys(self, ids: Sequence[int]) -> list[str | None]:
        if not len(ids) or not hasattr(self.shield, "keys"):
            return [None] * len(ids)
        return list(self.shield.keys(list(ids)))


class StaticSource:
    """A fixed set of shielded points held in memory and searched exactly (float64).

    For small shields (a rights holder's handful of images) and as the exact reference the
    index-backed sources are tested against.
    """

    def __init__(self, points: torch.Tensor, radius: float, name: str = "index", keys: Sequence[str] | None = None):
        self.points = points.reshape(points.shape[0], -1)
        self.radius = _positive_radius(radius)
        self.name = name
        self._keys = list(keys) if keys is not None else None

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        points = self.points.to(queries.device)
        return [Neighbours(ids=idx, vectors=points[idx], distances=dist.to(queries.dtype))
                for idx, dist in _exact_inside(queries, points, self.radius)]

    def keys(self, ids: Sequence[int]) -> list[str | None]:
        return [self._keys[int(i)] if self._keys is not None else None for i in ids]


def _same_group(groups: Sequence[Hashable]) -> torch.Tensor:
    return torch.tensor([[a == b for b in groups] for a in groups], dtype=torch.bool)


class BatchSource:
    """The other rows of the batch: repel each prediction from its siblings' predictions.

    Row ``j`` is reported with id ``j`` (its position in the batch); a row is never its own
    neighbour. Rows repel only rows of the same group (``SampleRow.group``, the prompt), so that
    different prompts in one batch do not push each other; unbound, all rows are one group.
    """

    name = "batch"

    def __init__(self, radius: float, groups: Sequence | None = None):
        self.radius = _positive_radius(radius)
        self.rows: list[SampleRow] | None = None if groups is None else [SampleRow(None, g) for g in groups]

    def bind(self, rows: Sequence[SampleRow] | None) -> None:
        self.rows = list(rows) if rows is not None else None

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        batch = queries.shape[0]
        allowed = ~torch.eye(batch, dtype=torch.bool)
        if self.rows is not None:
            if len(self.rows) != batch:
                raise ValueError(f"{len(self.rows)} bound rows for a batch of {batch}")
            allowed &= _same_group([r.group for r in self.rows])
        return [Neighbours(ids=idx, vectors=queries[idx], distances=dist.to(queries.dtype))
                for idx, dist in _exact_inside(queries, queries, self.radius, allowed)]

    def keys(self, ids: Sequence[int]) -> list[str | None]:
        return [self.rows[int(i)].key if self.rows is not None else None for i in ids]


class HistorySource:
    """A bounded bank of earlier outputs per group (prompt): repel from what was already made.

    ``add(group, key, latent)`` after a sample is written; each group keeps its ``size`` most
    recent outputs (first in, first out). Entries get a running id, unique for the source's
    lifetime, and keep their sample key for the audit. The bank lives in one worker, so what a
    sample is pushed from depends on what that worker generated before it.
    """

    name = "history"

    def __init__(self, radius: float, size: int):
        self.radius = _positive_radius(radius)
        if size < 1:
            raise ValueError(f"history size must be >= 1, got {size!r}")
        self.size = int(size)
        self.banks: dict[Hashable, deque[int]] = {}
        self.entries: OrderedDict[int, tuple[str | None, torch.Tensor]] = OrderedDict()
        self.rows: list[SampleRow] | None = None
        self._next_id = 0

    def bind(self, rows: Sequence[SampleRow] | None) -> None:
        self.rows = list(rows) if rows is not None else None

    def add(self, group: Hashable, key: str | None, latent: torch.Tensor) -> int:
        bank = self.banks.setdefault(group, deque())
        if len(bank) == self.size:
            del self.entries[bank.popleft()]
        entry = self._next_id
        self._next_id += 1
        bank.append(entry)
        self.entries[entry] = (key, latent.detach().reshape(-1).to("cpu", torch.float32).clone())
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, queries: torch.Tensor) -> list[Neighbours]:
        batch = queries.shape[0]
        if self.rows is not None and len(self.rows) != batch:
            raise ValueError(f"{len(self.rows)} bound rows for a batch of {batch}")
        groups = [r.group for r in self.rows] if self.rows is not None else [None] * batch
        out = []
        for row, group in enumerate(groups):
            ids = list(self.banks.get(group, ()))
            if not ids:
                out.append(Neighbours.empty(queries.shape[1], queries.dtype, queries.device))
                continue
            points = torch.stack([self.entries[i][1] for i in ids]).to(queries.device)
            (idx, dist), = _exact_inside(queries[row : row + 1], points, self.radius)
            id_tensor = torch.tensor(ids, dtype=torch.int64)[idx.cpu()]
            out.append(Neighbours(ids=id_tensor, vectors=points[idx].to(queries.dtype), distances=dist.to(queries.dtype)))
        return out

    def keys(self, ids: Sequence[int]) -> list[str | None]:
        return [self.entries[int(i)][0] if int(i) in self.entries else None for i in ids]
