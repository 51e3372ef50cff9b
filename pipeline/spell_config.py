"""SPELL's knobs, torch-free (the command line reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpellConfig:
    """How hard and how often to push. Validated here, at the edge of the library."""

    # lam in x0_hat' = x0_hat + lam * delta. The paper uses 1.6 for models that generalise; on a
    # memorizing model (benchmarks/RESULTS.md, "Memorization") lam = 10 with 5 iterations is what
    # keeps samples out of protected balls *and* lets them land on other, unprotected images.
    overcompensation: float = 10.0
    max_neighbours: int | None = None  # SPELL-K: only the K nearest hits per source enter delta
    correction_iterations: int = 5  # re-check x0_hat' and correct again, up to this many times

    def __post_init__(self):
        if not self.overcompensation > 0:
            raise ValueError(f"overcompensation must be > 0, got {self.overcompensation!r}")
        if self.max_neighbours is not None and self.max_neighbours < 1:
            raise ValueError(f"max_neighbours must be >= 1, got {self.max_neighbours!r}")
        if self.correction_iterations < 1:
            raise ValueError(f"correction_iterations must be >= 1, got {self.correction_iterations!r}")
