"""Every scheduler family SPELL supports, in every prediction type, ready at a given step call;
and a shield source that never hits and records what it was asked.

    sched, t, x_t, m = advanced("dpm-karras-eps", 3)   # after 3 step calls: next (t, x_t) and an output m
    sched.step(m, t, x_t, **step_kwargs(sched, seed))
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from spellshield.pipeline.repellency import Neighbours

STEPS = 10
SHAPE = (3, 2, 4, 4)  # batch 3

CASES = {
    "ddpm-eps": (DDPMScheduler, dict(prediction_type="epsilon", clip_sample=False)),
    "ddpm-v": (DDPMScheduler, dict(prediction_type="v_prediction", clip_sample=False)),
    "ddpm-sample": (DDPMScheduler, dict(prediction_type="sample", clip_sample=False)),
    "ddim-eps": (DDIMScheduler, dict(prediction_type="epsilon", clip_sample=False)),
    "ddim-v": (DDIMScheduler, dict(prediction_type="v_prediction", clip_sample=False)),
    "ddim-sample": (DDIMScheduler, dict(prediction_type="sample", clip_sample=False)),
    "dpm-eps": (DPMSolverMultistepScheduler, dict(prediction_type="epsilon")),
    "dpm-v": (DPMSolverMultistepScheduler, dict(prediction_type="v_prediction")),
    "dpm-sample": (DPMSolverMultistepScheduler, dict(prediction_type="sample")),
    "dpm-karras-eps": (DPMSolverMultistepScheduler, dict(prediction_type="epsilon", use_karras_sigmas=True)),
    "dpm-flow": (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True)),
    "dpm1-eps": (DPMSolverMultistepScheduler, dict(prediction_type="epsilon", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    "dpm1-v": (DPMSolverMultistepScheduler, dict(prediction_type="v_prediction", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    "euler-eps": (EulerDiscreteScheduler, dict(prediction_type="epsilon")),
    "euler-v": (EulerDiscreteScheduler, dict(prediction_type="v_prediction")),
    "euler-sample": (EulerDiscreteScheduler, dict(prediction_type="sample")),
    "euler-karras-eps": (EulerDiscreteScheduler, dict(prediction_type="epsilon", use_karras_sigmas=True)),
    "euler_a-eps": (EulerAncestralDiscreteScheduler, dict(prediction_type="epsilon")),
    "euler_a-v": (EulerAncestralDiscreteScheduler, dict(prediction_type="v_prediction")),
    "heun-eps": (HeunDiscreteScheduler, dict(prediction_type="epsilon")),
    "heun-v": (HeunDiscreteScheduler, dict(prediction_type="v_prediction")),
    "heun-sample": (HeunDiscreteScheduler, dict(prediction_type="sample")),
    "flow": (FlowMatchEulerDiscreteScheduler, dict()),
    "flow-shift": (FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
}


def step_kwargs(sched, seed):
    """The generator for schedulers that draw noise inside step (DDPM, Euler ancestral)."""
    if isinstance(sched, (DDPMScheduler, EulerAncestralDiscreteScheduler)):
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


def advanced(case: str, calls: int):
    """A scheduler after ``calls`` step calls with random outputs, and the next (t, x_t)."""
    cls, kwargs = CASES[case]
    sched = cls(num_train_timesteps=1000, **kwargs)
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g) * float(getattr(sched, "init_noise_sigma", 1.0))
    for i in range(calls):
        t = sched.timesteps[i]
        x = sched.step(torch.randn(SHAPE, generator=g), t, x, **step_kwargs(sched, 100 + i)).prev_sample
    return sched, sched.timesteps[calls], x, torch.randn(SHAPE, generator=g)


class Recorder:
    """A source that never hits and remembers every x0_hat it was asked about, per step call."""

    name = "recorder"
    radius = 1.0

    def __init__(self):
        self.queries = []

    def find(self, queries):
        self.queries.append(queries.clone())
        return [Neighbours.empty(queries.shape[1], queries.dtype) for _ in range(queries.shape[0])]

    def keys(self, ids):
        return [None] * len(ids)
