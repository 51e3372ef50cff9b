"""What a scheduler's model output means, as an affine map between output and x0_hat.

Every parametrisation in DESIGN.md's table is affine in the model output ``m`` for a fixed
noisy sample ``x_t`` (the ``sample`` handed to ``scheduler.step``):

    x0_hat = A * x_t + B * m          and therefore          m = (x0_hat - A * x_t) / B

| parametrisation                                  | A               | B                      |
|--------------------------------------------------|-----------------|------------------------|
| epsilon, x_t = a x0 + s eps                      | 1 / a           | -s / a                 |
| v-prediction (VP, a^2 + s^2 = 1)                 | a               | -s                     |
| sample                                           | 0               | 1                      |
| flow matching, x_t = (1-sig) x0 + sig eps        | 1               | -sig                   |
| sigma (Karras/Euler) x = x0 + sig eps, epsilon   | 1               | -sig                   |
| sigma, v-prediction                              | 1/(sig^2+1)     | -sig / sqrt(sig^2+1)   |

So rewriting the output to imply a corrected ``x0_hat'`` while keeping ``x_t`` is one line,
and no extra network call is needed.

``affine_for`` reads the wrapped scheduler's own state (its ``alphas_cumprod`` or its
``sigmas`` at the step index it is about to use) so that the map is exactly the one inside its
``step``. It never changes that state. Supported families, each tested against the scheduler's
own ``pred_original_sample`` (or its own conversion where ``step`` returns none):

- DDPM, DDIM: ``alphas_cumprod[t]``; epsilon, v_prediction, sample.
- DPMSolverMultistep: ``alpha_t, sigma_t`` of ``sigmas[step_index]`` (also with Karras or flow
  sigmas); epsilon, v_prediction, sample, flow_prediction; dpmsolver++ and dpmsolver.
- Euler, EulerAncestral, Heun: ``sigmas[step_index]`` on the unscaled sample ``x = x0 + sig
  eps``; epsilon, v_prediction, sample (not EulerAncestral, which has no sample mode).
  Heun's ``step`` is called twice per denoising step (a predictor and a corrector model
  call, timesteps interleaved in ``scheduler.timesteps``); both calls use
  ``sigmas[step_index]`` on the sample they are handed, so both are corrected independently.
- FlowMatchEulerDiscrete (SD3, Flux): ``x0_hat = x_t - sig * m`` with ``sig = sigmas[step_index]``.

Refused with ``UnsupportedScheduler`` (the exact map cannot be known before ``step`` runs):
Euler with ``s_churn > 0`` at this sigma (it adds fresh noise to ``x_t`` inside ``step``),
flow matching with ``per_token_timesteps``, learned-variance outputs (2C channels), and any
other scheduler class.

Clipping (``clip_sample``, ``thresholding``) is applied by the wrapped scheduler *after* the
correction. In pixel space the box [-1, 1]^D contains every protected point and clipping is a
projection onto it, which can only move ``x0_hat'`` closer to them: with clipping on, the final
exact check (not the correction) is what keeps copies out of what is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class UnsupportedScheduler(TypeError):
    """The wrapped scheduler's parametrisation is not one this module knows."""


@dataclass(frozen=True)
class AffineOutput:
    """x0_hat = a_coef * x_t + b_coef * m, with scalar coefficients for one step call."""

    a_coef: float
    b_coef: float
    prediction_type: str
    # sigma_t / alpha_t: the standard deviation, per dimension and in x0 units, of the noise still
    # in x_t (x_t / alpha_t = x0 + noise_scale * eps). None where the caller did not say.
    noise_scale: float | None = None

    def x0_from_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return self.a_coef * sample + self.b_coef * model_output

    def output_from_x0(self, x0_hat: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self.b_coef == 0:
            raise ValueError("this timestep's model output does not depend on x0_hat (B = 0)")
        return (x0_hat - self.a_coef * sample) / self.b_coef


def alpha_sigma_affine(alpha: float, sigma: float, prediction_type: str) -> AffineOutput:
    """x_t = alpha x0 + sigma eps (VP: alpha^2 + sigma^2 = 1; flow: alpha = 1 - sigma)."""
    scale = sigma / alpha if alpha > 0 else math.inf
    if prediction_type == "epsilon":
        return AffineOutput(1.0 / alpha, -sigma / alpha, prediction_type, scale)
    if prediction_type == "v_prediction":
        return AffineOutput(alpha, -sigma, prediction_type, scale)
    if prediction_type in ("sample", "original_sample"):
        return AffineOutput(0.0, 1.0, prediction_type, scale)
    if prediction_type == "flow_prediction":
        return flow_affine(sigma)
    raise UnsupportedScheduler(f"unknown prediction_type {prediction_type!r}")


def vp_affine(alpha_bar: float, prediction_type: str) -> AffineOutput:
    """Variance-preserving schedules (DDPM, DDIM): x_t = sqrt(abar) x0 + sqrt(1-abar) eps."""
    if prediction_type == "flow_prediction":
        raise UnsupportedScheduler("flow_prediction needs a flow schedule, not alphas_cumprod")
    return alpha_sigma_affine(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), prediction_type)


def karras_affine(sigma: float, prediction_type: str) -> AffineOutput:
    """Variance-exploding form x = x0 + sigma eps (Euler, Heun; k-diffusion's c_skip/c_out)."""
    if prediction_type == "epsilon":
        return AffineOutput(1.0, -sigma, prediction_type, sigma)
    if prediction_type == "v_prediction":
        return AffineOutput(1.0 / (sigma**2 + 1.0), -sigma / math.sqrt(sigma**2 + 1.0), prediction_type, sigma)
    if prediction_type in ("sample", "original_sample"):
        return AffineOutput(0.0, 1.0, prediction_type, sigma)
    raise UnsupportedScheduler(f"unknown prediction_type {prediction_type!r} for a sigma scheduler")


def flow_affine(sigma: float) -> AffineOutput:
    """Rectified flow x_t = (1 - sigma) x0 + sigma eps with velocity output m = eps - x0."""
    return AffineOutput(1.0, -sigma, "flow", sigma / (1.0 - sigma) if sigma < 1 else math.inf)


def step_index_for(scheduler, timestep) -> int:
    """The index into ``scheduler.sigmas`` that its next ``step`` call will use.

    Mirrors the schedulers' own ``_init_step_index`` without calling it: before the first step
    ``step_index`` is None and ``step`` derives it from ``begin_index`` or the timestep.
    """
    index = scheduler.step_index
    if index is not None:
        return int(index)
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None:
        return int(begin)
    if torch.is_tensor(timestep):
        timestep = timestep.to(scheduler.timesteps.device)
    return int(scheduler.index_for_timestep(timestep))


def _scalar(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def _check_channels(scheduler, model_output, sample) -> None:
    variance = getattr(scheduler.config, "variance_type", None)
    if model_output.shape != sample.shape or variance in ("learned", "learned_range"):
        raise UnsupportedScheduler(
            f"{type(scheduler).__name__}: model output {tuple(model_output.shape)} with variance_type "
            f"{variance!r} for a sample {tuple(sample.shape)}: learned-variance outputs are not supported"
        )


def _vp(scheduler, timestep, prediction_type: str, step_kwargs: dict) -> AffineOutput:
    """DDPM, DDIM: ``alphas_cumprod[t]``."""
    return vp_affine(_scalar(scheduler.alphas_cumprod[int(_scalar(timestep))]), prediction_type)


def _dpm_solver(scheduler, timestep, prediction_type: str, step_kwargs: dict) -> AffineOutput:
    sigma = scheduler.sigmas[step_index_for(scheduler, timestep)]
    if prediction_type == "flow_prediction":
        return flow_affine(_scalar(sigma))
    # alpha_t, sigma_t of this sigma, with the tensor operations DPMSolverMultistepScheduler's own
    # (private) _sigma_to_alpha_sigma_t uses, so the floats are the ones inside its step: flow
    # sigmas are x_t = (1 - sig) x0 + sig eps; otherwise sig = sigma_t / alpha_t of a VP schedule.
    if getattr(scheduler.config, "use_flow_sigmas", False):
        alpha_t, sigma_t = 1 - sigma, sigma
    else:
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        sigma_t = sigma * alpha_t
    return alpha_sigma_affine(_scalar(alpha_t), _scalar(sigma_t), prediction_type)


def _sigma(scheduler, timestep, prediction_type: str, step_kwargs: dict) -> AffineOutput:
    """Heun (and the Euler schedulers below): ``sigmas[step_index]`` on the unscaled sample."""
    return karras_affine(_scalar(scheduler.sigmas[step_index_for(scheduler, timestep)]), prediction_type)


def _euler(scheduler, timestep, prediction_type: str, step_kwargs: dict) -> AffineOutput:
    sigma = _scalar(scheduler.sigmas[step_index_for(scheduler, timestep)])
    churn = float(step_kwargs.get("s_churn", 0.0))
    tmin = float(step_kwargs.get("s_tmin", 0.0))
    tmax = float(step_kwargs.get("s_tmax", float("inf")))
    if churn > 0 and tmin <= sigma <= tmax:
        raise UnsupportedScheduler(
            f"{type(scheduler).__name__} with s_churn={churn} adds noise to x_t inside step(): the x0_hat it uses "
            "cannot be known beforehand; use s_churn=0"
        )
    return karras_affine(sigma, prediction_type)


def _euler_ancestral(scheduler, timestep, prediction_type: str, step_kwargs: dict) -> AffineOutput:
    if prediction_type == "sample":
        raise UnsupportedScheduler(f"{type(scheduler).__name__} does not implement prediction_type 'sample'")
    return _sigma(scheduler, timestep, prediction_type, step_kwargs)


def _flow_match(scheduler, timestep, prediction_type: str, step_kwargs: dict) -> AffineOutput:
    if step_kwargs.get("per_token_timesteps") is not None:
        raise UnsupportedScheduler(f"{type(scheduler).__name__} with per_token_timesteps is not supported")
    return flow_affine(_scalar(scheduler.sigmas[step_index_for(scheduler, timestep)]))


# Scheduler class name -> its affine map (module doc). Looked up along the class's MRO, so a
# subclass of a supported scheduler is supported as before, and diffusers need not be imported.
AFFINES = {
    "DDPMScheduler": _vp,
    "DDIMScheduler": _vp,
    "DPMSolverMultistepScheduler": _dpm_solver,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "HeunDiscreteScheduler": _sigma,
    "FlowMatchEulerDiscreteScheduler": _flow_match,
}


def affine_for(scheduler, timestep, sample: torch.Tensor, model_output: torch.Tensor | None = None,
               step_kwargs: dict | None = None) -> AffineOutput:
    """The affine map that ``scheduler.step(m, timestep, sample, **step_kwargs)`` will use.

    Reads the scheduler's own state so that the map is exactly the one inside its ``step``.
    """
    if model_output is not None:
        _check_channels(scheduler, model_output, sample)
    affine = next((AFFINES[cls.__name__] for cls in type(scheduler).__mro__ if cls.__name__ in AFFINES), None)
    if affine is None:
        raise UnsupportedScheduler(
            f"{type(scheduler).__name__} is not supported by ShieldedScheduler (supported: {', '.join(AFFINES)})"
        )
    return affine(scheduler, timestep, getattr(scheduler.config, "prediction_type", "epsilon"), step_kwargs or {})
