"""The breach policy: what to do with a finished sample that the exact final check finds inside the shield, a
perceptual copy of a protected image, or off-manifold (``is_breach``).

Policies (``--on-breach``):

- ``resample`` (default): not written; the same sample is drawn again with a new seed derived
  from the old one (``derive_seed``), up to ``max_attempts`` attempts in all; if the last
  attempt still breaches, the sample is dropped.
- ``drop``: not written.
- ``flag``: written, with ``inside_shield = true`` and action ``flagged`` in its row.

Every attempt is a sample row with its ``attempt`` number and ``action``: kept, flagged,
resampled (this attempt was discarded and another follows) or dropped. With ``resample`` or
``drop`` no written image lies inside the shield, by construction: an image is written only
after the check that would have refused it.

Plain functions (no Ray, no torch): the workers (``workers.generation``) apply them, the config
(``pipeline.config.BreachConfig``) validates their options.
"""

from __future__ import annotations

import hashlib

from spellshield.pipeline.config import POLICIES, SEED_BITS  # the config validates --on-breach

KEPT, FLAGGED, RESAMPLED, DROPPED = "kept", "flagged", "resampled", "dropped"
WRITTEN_ACTIONS = (KEPT, FLAGGED)


def derive_seed(seed: int, attempt: int) -> int:
    """The seed of ``attempt`` (1-based) of the sample whose first seed is ``seed``.

    Attempt 1 is the sample's own seed; later attempts hash (seed, attempt), so a resample is
    the same on any worker, in any batch, on any retry, and differs from every other
    sample's plain seed except by a 2^-63 chance.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt!r}")
    if attempt == 1:
        return int(seed)
    digest = hashlib.sha256(f"spellshield-resample:{int(seed)}:{int(attempt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def is_breach(inside: bool | None, perceptual_copy: bool | None = None, off_manifold: bool | None = None,
              off_manifold_breach: bool = True) -> bool | None:
    """Whether a checked attempt breaches (None: no index, nothing was checked).

    A breach is a copy by either judge - the L2 ball (``inside``) or the perceptual judge - or,
    unless the user opted out (``off_manifold_breach=False``, ``--allow-off-manifold``), an
    off-manifold output: noise is no way out of a copy (pipeline.judges).
    """
    if inside is None:
        return None
    return bool(inside or perceptual_copy or (off_manifold_breach and off_manifold))


def decide(policy: str, inside: bool | None, attempt: int, max_attempts: int) -> str:
    """The action for one checked attempt (``inside`` None: no index, nothing to check)."""
    if policy not in POLICIES:
        raise ValueError(f"on-breach policy must be one of {POLICIES}, got {policy!r}")
    if not inside:
        return KEPT
    if policy == "flag":
        return FLAGGED
    if policy == "resample" and attempt < max_attempts:
        return RESAMPLED
    return DROPPED
