"""SPELL inside real diffusers pipelines built from tiny random components, saved to disk and
loaded with from_pretrained: unconditional DDPM and DDIM (UNet2DModel), StableDiffusionPipeline
with classifier-free guidance (under several schedulers) and StableDiffusion3Pipeline (flow
matching).

For each: a shield that never hits leaves the images bit-for-bit those of the plain pipeline; a
protected point placed next to a sample's step-0 prediction is hit at step 0 at the expected
distance, changes that sample, and leaves samples that were never hit bit-for-bit unchanged. With
classifier-free guidance the correction is shown to act on the guided output."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from spellshield.pipeline.invoke import sample_images, takes_prompt
from spellshield.pipeline.loading import describe_model, load_pipeline
from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig
from spellshield.pipeline.sources import StaticSource
from spellshield.toys import pipelines as tiny_pipelines
from spellshield.toys.schedulers import Recorder

STEPS = 8
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipelines")
    return {
        "ddpm": tiny_pipelines.save_ddpm(str(tmp / "ddpm")),
        "ddim": tiny_pipelines.save_ddim(str(tmp / "ddim")),
        "sd": tiny_pipelines.save_stable_diffusion(str(tmp / "sd")),
        "sd3": tiny_pipelines.save_sd3(str(tmp / "sd3")),
    }


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
}
COMBOS = ["ddpm", "ddim", "sd-ddim", "sd-euler", "sd-euler_a", "sd-dpm", "sd-heun", "sd3"]


def loaded(models, combo):
    name, _, scheduler = combo.partition("-")
    pipe = load_pipeline(models[name])
    if scheduler:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    return pipe


def run(pipe, sources, spell=None):
    """Images of SEEDS through ``pipe`` with its scheduler wrapped by ``sources`` (None: plain)."""
    inner = pipe.scheduler
    if sources is not None:
        pipe.scheduler = ShieldedScheduler(inner, sources, spell or SpellConfig())
    try:
        prompts = ["a red cat", "a dog"] if takes_prompt(pipe) else [None, None]
        images = sample_images(pipe, prompts, SEEDS, STEPS)
        log = pipe.scheduler.reset_log() if sources is not None else None
    finally:
        pipe.scheduler = inner
    return images, log


@pytest.mark.parametrize("combo", COMBOS)
def test_shield_in_pipeline(models, combo):
    pipe = loaded(models, combo)
    plain, _ = run(pipe, None)
    recorder = Recorder()
    recorded, log = run(pipe, [recorder])
    assert np.array_equal(plain, recorded)  # never hit: bit-for-bit the plain pipeline
    assert log.steps == len(pipe.scheduler.timesteps) and log.hits == []
    first = recorder.queries[0].double()  # x0_hat of both samples at step 0, (2, D)
    gap = float(torch.linalg.vector_norm(first[0] - first[1]))
    radius = 0.1 * gap
    u = torch.nn.functional.normalize(torch.randn(first.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=0)
    z = (first[0] + 0.5 * radius * u).float().unsqueeze(0)
    shielded, log = run(pipe, [StaticSource(z, radius)], SpellConfig(overcompensation=1.6))
    step0 = [h for h in log.hits if h.step == 0]
    assert [h.row for h in step0] == [0]
    assert abs(step0[0].distance - 0.5 * radius) < 1e-3 * radius
    assert not np.array_equal(shielded[0], plain[0])
    if not any(h.row == 1 for h in log.hits):
        assert np.array_equal(shielded[1], plain[1])  # the sample never hit is untouched


def test_cfg_correction_acts_on_guided_output(models):
    """The shield sees x0_hat of the guided output uncond + g (cond - uncond), and the next
    latents are DDIM's step from the corrected guided prediction."""
    pipe = load_pipeline(models["sd"])
    calls = []
    pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args[0].clone(), out[0].clone())), with_kwargs=True)
    scale, lam = 7.5, 1.6

    def sample(sources):
        calls.clear()
        pipe.scheduler = ShieldedScheduler(pipe.scheduler.inner if isinstance(pipe.scheduler, ShieldedScheduler) else pipe.scheduler,
                                           sources, SpellConfig(overcompensation=lam, correction_iterations=1))
        sample_images(pipe, ["a red cat"], [5], STEPS, guidance_scale=scale)
        return pipe.scheduler.reset_log(), list(calls)

    _, plain_calls = sample([Recorder()])
    scheduler = pipe.scheduler.inner
    t0 = scheduler.timesteps[0]
    abar = float(scheduler.alphas_cumprod[int(t0)])
    x_t = plain_calls[0][0][:1].double()  # CFG batch: [uncond, cond], same latents
    uncond, cond = plain_calls[0][1].double().chunk(2)
    guided = uncond + scale * (cond - uncond)

    def x0_of(m):  # DDIM epsilon: x0 = (x_t - sqrt(1 - abar) m) / sqrt(abar)
        return ((x_t - (1 - abar) ** 0.5 * m) / abar**0.5).reshape(-1)

    x0_guided, x0_cond, x0_uncond = x0_of(guided), x0_of(cond), x0_of(uncond)
    d = min(float((x0_guided - x0_cond).norm()), float((x0_guided - x0_uncond).norm()))
    assert d > 0
    u = torch.nn.functional.normalize(torch.randn(x0_guided.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=0)
    z = x0_guided + 0.2 * d * u
    radius = 0.5 * d  # the guided prediction is inside; the conditional and unconditional ones are not
    assert float((x0_cond - z).norm()) > radius and float((x0_uncond - z).norm()) > radius
    log, shielded_calls = sample([StaticSource(z.float().unsqueeze(0), radius)])
    hit = [h for h in log.hits if h.step == 0]
    assert len(hit) == 1
    assert abs(hit[0].distance - 0.2 * d) < 1e-4 * d
    assert abs(hit[0].model_output_norm - float(guided.norm())) < 1e-4 * float(guided.norm())
    # the latents the UNet sees at step 1 are DDIM's step from x0_guided + lam * delta
    x0_new = x0_guided + lam * (radius / (0.2 * d) - 1) * (x0_guided - z)
    m_new = (x_t.reshape(-1) - abar**0.5 * x0_new) / (1 - abar) ** 0.5
    expected = DDIMScheduler.from_config(scheduler.config)
    expected.set_timesteps(STEPS)
    x_1 = expected.step(m_new.reshape(x_t.shape).float(), t0, x_t.float()).prev_sample
    assert torch.allclose(shielded_calls[1][0][:1], x_1, atol=1e-4)
    assert not torch.allclose(plain_calls[1][0][:1], x_1, atol=1e-3)


def test_describe_model_reads_transformer_latents(models):
    assert describe_model(models["sd3"]).latent_shape == (4, 8, 8)
    assert describe_model(models["sd"]).latent_shape == (4, 8, 8)
    assert describe_model(models["ddpm"]).latent_shape == (3, 8, 8) and describe_model(models["ddpm"]).vae_path is None
