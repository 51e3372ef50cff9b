"""The SPELL correction (sparse repellency, arXiv 2410.06025).

Given the sampler's prediction of the final sample ``x0_hat`` and shielded points ``z_k`` with
radius ``r``, the paper's repellency term (its Eq. 7) is

    delta = sum_k relu(r / ||x0_hat - z_k|| - 1) * (x0_hat - z_k)

which is zero outside every ball, and the corrected prediction is ``x0_hat + lam * delta``
(``lam``: over-compensation, 1.6 in the paper). For a single ball and ``lam = 1`` the corrected
point lands exactly on the sphere of radius ``r`` around ``z_k``.

Everything here works on flattened latents of shape (B, D), in float32 or float64; there is no
notion of a scheduler, an index or a file format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this fraction of the radius the direction (x0_hat - z_k) / ||x0_hat - z_k|| is
# numerical noise (x0_hat is itself computed in float32 from the model output), so the
# degenerate-direction rule below takes over.
DEGENERATE_FRACTION = 1e-6


@dataclass(frozen=True)
class Neighbours:
    """Shielded points found near one query: global ids, their vectors (K, D), distances (K,)."""

    ids: torch.Tensor  # int64 (K,)
    vectors: torch.Tensor  # (K, D)
    distances: torch.Tensor  # (K,) L2, not squared

    @staticmethod
    def empty(dim: int, dtype=torch.float32, device=None) -> "Neighbours":
        return Neighbours(
            ids=torch.empty(0, dtype=torch.int64, device=device),
            vectors=torch.empty(0, dim, dtype=dtype, device=device),
            distances=torch.empty(0, dtype=dtype, device=device),
        )


@dataclass(frozen=True)
class Repulsion:
    """The correction for one query and what each neighbour contributed to it."""

    delta: torch.Tensor  # (D,)
    weights: torch.Tensor  # (K,) relu(r/d - 1), the paper's sparse weights
    distances: torch.Tensor  # (K,) exact distances used (float64 recomputation)
    degenerate: torch.Tensor  # (K,) bool: x0_hat coincided with z_k


def fallback_direction(dim: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The direction used when x0_hat == z_k and no better direction is given: (1,...,1)/sqrt(D)."""
    return torch.full((dim,), dim**-0.5, dtype=dtype, device=device)


def repel(
    x0_hat: torch.Tensor,
    neighbours: torch.Tensor,
    radius: float,
    degenerate_direction: torch.Tensor | None = None,
) -> Repulsion:
    """SPELL's delta for one query ``x0_hat`` (D,) against ``neighbours`` (K, D).

    Only neighbours strictly inside the open ball ``||x0_hat - z|| < radius`` contribute; the
    others get weight 0 (the relu). Computed in float64 so that the result does not depend on
    the order of the neighbours beyond rounding.

    The degenerate case ``x0_hat == z_k`` (a memorizing model predicts a protected point
    exactly) makes the direction 0/0. The limit of ``relu(r/d - 1) * (x0_hat - z_k)`` as d -> 0
    along a unit direction u is ``r * u``: the push has length r whatever the direction, so we
    choose u deterministically: ``degenerate_direction`` if given and non-zero (the scheduler
    passes the noise direction implied by x_t, which differs per sample, so that several
    samples collapsing onto one protected point are pushed apart), otherwise (1,...,1)/sqrt(D).
    """
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    x = x0_hat.to(torch.float64).reshape(-1)
    dim = x.shape[0]
    z = neighbours.to(device=x.device, dtype=torch.float64).reshape(-1, dim)
    diff = x.unsqueeze(0) - z  # (K, D)
    dist = torch.linalg.vector_norm(diff, dim=1)  # (K,)
    weights = torch.clamp(radius / torch.clamp(dist, min=torch.finfo(torch.float64).tiny) - 1.0, min=0.0)
    degenerate = dist <= DEGENERATE_FRACTION * radius
    if bool(degenerate.any()):
        u = _unit_or_fallback(degenerate_direction, dim, x.device)
        # Replace diff by d * u so that weight * diff = (r - d) * u = r * u in the limit; we use
        # exactly r * u for the degenerate rows (weight r/d - 1 would overflow at d = 0).
        diff = torch.where(degenerate.unsqueeze(1), radius * u.unsqueeze(0), diff)
        weights = torch.where(degenerate, torch.ones_like(weights), weights)
    delta = (weights.unsqueeze(1) * diff).sum(dim=0)
    return Repulsion(delta=delta, weights=weights, distances=dist, degenerate=degenerate)


def _unit_or_fallback(direction: torch.Tensor | None, dim: int, device) -> torch.Tensor:
    if direction is not None:
        u = direction.to(device=device, dtype=torch.float64).reshape(-1)
        norm = torch.linalg.vector_norm(u)
        if float(norm) > 0 and torch.isfinite(norm):
            return u / norm
    return fallback_direction(dim, device=device)
