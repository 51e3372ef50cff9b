"""What a scheduler's model output means, as an affine map between output and x0_hat.

Every parametrisation in DESIGN.md's table is affine in the model output ``m`` for a fixed
noisy sample ``x_t``:

    x0_hat = A * x_t + B * m          and therefore          m = (x0_hat - A * x_t) / B

| parametrisation                          | A               | B                      |
|------------------------------------------|-----------------|------------------------|
| epsilon, x_t = a x0 + s eps              | 1 / a           | -s / a                 |
| v-prediction (VP, a^2 + s^2 = 1)         | a               | -s                     |
| sample                                   | 0               | 1                      |
| flow matching, x_t=(1-sig)x0+sig eps     | 1               | -sig                   |
| sigma (Karras/Euler) x = x0 + sig eps    | 1               | -sig                   |
| sigma, v-prediction                      | 1/(sig^2+1)     | -sig / sqrt(sig^2+1)   |

So rewriting the output to imply a corrected ``x0_hat'`` while keeping ``x_t`` is one line,
and no extra network call is needed. This module only reads the scheduler's state; it never
changes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class UnsupportedScheduler(TypeError):
    """The wrapped scheduler's parametrisation is not one this module knows."""


@dataclass(frozen=True)
class AffineOutput:
    """x0_hat = a_coef * x_t + b_coef * m, with scalar coefficients for one timestep."""

    a_coef: float
    b_coef: float
    prediction_type: str

    def x0_from_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return self.a_coef * sample + self.b_coef * model_output

    def output_from_x0(self, x0_hat: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self.b_coef == 0:
            raise ValueError("this timestep's model output does not depend on x0_hat (B = 0)")
        return (x0_hat - self.a_coef * sample) / self.b_coef


def vp_affine(alpha_bar: float, prediction_type: str) -> AffineOutput:
    """Variance-preserving schedules (DDPM, DDIM, PNDM): x_t = sqrt(abar) x0 + sqrt(1-abar) eps."""
    a = math.sqrt(alpha_bar)
    s = math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return AffineOutput(1.0 / a, -s / a, prediction_type)
    if prediction_type == "v_prediction":
        return AffineOutput(a, -s, prediction_type)
    if prediction_type == "sample":
        return AffineOutput(0.0, 1.0, prediction_type)
    raise UnsupportedScheduler(f"unknown prediction_type {prediction_type!r}")


def affine_for(scheduler, timestep, sample: torch.Tensor) -> AffineOutput:
    """The affine map that ``scheduler.step(m, timestep, sample)`` will use for this call.

    Reads the scheduler's own state so that the map is exactly the one inside its ``step``.
    """
    config = scheduler.config
    prediction_type = getattr(config, "prediction_type", "epsilon")
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is not None and not hasattr(scheduler, "sigmas"):
        t = int(timestep.item() if torch.is_tensor(timestep) else timestep)
        return vp_affine(float(alphas_cumprod[t]), prediction_type)
    raise UnsupportedScheduler(
        f"{type(scheduler).__name__} is not supported by ShieldedScheduler yet "
        "(supported: schedulers indexed by alphas_cumprod, such as DDPM and DDIM)"
    )
