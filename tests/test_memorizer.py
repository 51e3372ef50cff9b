"""The memorizer: the exact posterior mean, saved and loaded with diffusers, sampling copies."""

import json
import os

import pytest
import torch
from diffusers import DDIMScheduler

from spellshield.jobs.memorizer import save_memorizer
from spellshield.pipeline.loading import describe_model, load_pipeline
from spellshield.pipeline.memorizer import MemorizerUNet


def test_posterior_mean_hand_worked():
    # Two points y = +1 and -1 (1-d), abar = 0.5: a = s = sqrt(.5). At x_t = 0 both are equally
    # likely: the mean is 0. At x_t = a (the noiseless image of +1) the weights are
    # softmax(-(0)/(2 s^2), -(2a)^2/(2 s^2)) = softmax(0, -4 a^2 / (2 s^2)) = softmax(0, -2).
    latents = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
    alphas = torch.full((10,), 0.5)
    model = MemorizerUNet.from_latents(latents, alphas)
    a = 0.5**0.5
    assert abs(float(model.posterior_mean(torch.zeros(1, 1, 1, 1), 3))) < 1e-12
    w = torch.softmax(torch.tensor([0.0, -2.0], dtype=torch.float64), 0)
    expected = float(w[0] - w[1])
    assert abs(float(model.posterior_mean(torch.full((1, 1, 1, 1), a), 3)) - expected) < 1e-6
    # epsilon prediction: (x_t - a * mean) / s
    eps = model(torch.full((1, 1, 1, 1), a), 3).sample
    assert abs(float(eps) - (a - a * expected) / a) < 1e-6


def test_save_load_and_sampling_returns_training_points(tmp_path):
    g = torch.Generator().manual_seed(0)
    latents = torch.rand(12, 3, 4, 4, generator=g) * 2 - 1
    out = str(tmp_path / "model")
    save_memorizer(latents, out)
    spec = describe_model(out)
    assert spec.latent_shape == (3, 4, 4) and spec.vae_path is None
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["unet"] == ["spellshield.pipeline.memorizer", "MemorizerUNet"]
    pipe = load_pipeline(out)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert torch.equal(pipe.unet.latents, latents)
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    samples = pipe(batch_size=6, generator=gens, num_inference_steps=30, output_type="latent").images
    nearest = torch.cdist(samples.reshape(6, -1), latents.reshape(12, -1)).min(1).values
    assert float(nearest.max()) < 1e-4  # every sample is a copy: the honest worst case


def _nearest_after_sampling(scheduler, prediction_type="epsilon", steps=30):
    from diffusers import DDIMScheduler

    from spellshield.pipeline.memorizer import MemorizerPipeline

    g = torch.Generator().manual_seed(0)
    latents = torch.rand(12, 3, 4, 4, generator=g) * 2 - 1
    alphas = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    unet = MemorizerUNet.from_latents(latents, alphas, prediction_type=prediction_type)
    pipe = MemorizerPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    samples = pipe(batch_size=6, generator=gens, num_inference_steps=steps, output_type="latent").images
    return torch.cdist(samples.reshape(6, -1), latents.reshape(12, -1)).min(1).values


@pytest.mark.parametrize("name", ["ddpm", "dpm", "euler", "euler_a", "heun", "flow"])
def test_memorizer_copies_under_other_schedulers(name):
    # The memorizer agrees with each scheduler on the noise level at every (fractional) timestep,
    # so sampling it with any of them returns training points.
    from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler)

    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)  # the memorizer's
    schedulers = {
        "ddpm": lambda: DDPMScheduler(clip_sample=False, **common),
        "dpm": lambda: DPMSolverMultistepScheduler(**common),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "euler_a": lambda: EulerAncestralDiscreteScheduler(**common),
        "heun": lambda: HeunDiscreteScheduler(**common),
        "flow": lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
    }
    nearest = _nearest_after_sampling(schedulers[name](), "flow" if name == "flow" else "epsilon")
    assert float(nearest.max()) < 1e-3, nearest


def test_fractional_timestep_matches_the_sigma_schedulers():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(7)  # linspace spacing: fractional timesteps
    unet = MemorizerUNet.from_latents(torch.zeros(1, 1, 1, 1), sched.alphas_cumprod)
    for t, sigma in zip(sched.timesteps, sched.sigmas):
        abar = float(unet.alpha_bar(t, 1, "cpu")[0])
        assert abs(((1 - abar) / abar) ** 0.5 - float(sigma)) < 1e-4 * float(sigma)


def test_memorizer_with_a_taef2_vae_loads_in_a_fresh_process(tmp_path):
    # model_index.json names ["spellshield.indexing.taef2", "TAEF2"]: load_pipeline imports it (and only this
    # project's modules) before diffusers looks the class up, in a process that never imported it.
    import subprocess
    import sys

    from spellshield.indexing.taef2 import TAEF2
    from spellshield.pipeline.memorizer import MemorizerPipeline
    from tests.conftest import ROOT

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    unet = MemorizerUNet.from_latents(torch.zeros(2, 32, 1, 1), scheduler.alphas_cumprod, encoder="taef2")
    torch.manual_seed(0)
    MemorizerPipeline(unet=unet, scheduler=scheduler, vae=TAEF2()).save_pretrained(str(tmp_path / "model"))
    code = ("from spellshield.pipeline.loading import load_pipeline; import sys; "
            f"pipe = load_pipeline({str(tmp_path / 'model')!r}); print(type(pipe.vae).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "TAEF2"
