"""ShieldedScheduler on every supported scheduler family and prediction type.

For each: after the rewrite, the output implies exactly x0_hat + lam * delta for the same x_t,
where x0_hat is what the scheduler itself computes (its own pred_original_sample, or its own
conversion / step where it returns none), and with no hit the step is bit-for-bit the wrapped
scheduler's. Tested at the first step call and at one in the middle of the schedule (so that
multistep history and Heun's corrector call are exercised)."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

from spellshield.pipeline.parametrisation import UnsupportedScheduler, affine_for
from spellshield.pipeline.repellency import repel
from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig
from spellshield.pipeline.sources import StaticSource
from spellshield.toys.schedulers import CASES, advanced, step_kwargs


def scheduler_x0(sched, m, t, x_t):
    """x0_hat as the scheduler itself computes it from output m (on a copy of its state)."""
    s = copy.deepcopy(sched)
    if isinstance(s, DPMSolverMultistepScheduler):
        if s.step_index is None:
            s._init_step_index(t)
        converted = s.convert_model_output(m, sample=x_t)
        if s.config.algorithm_type == "dpmsolver":  # converted is epsilon: its own alpha_t, sigma_t
            alpha_t, sigma_t = (float(v) for v in s._sigma_to_alpha_sigma_t(s.sigmas[s.step_index]))
            return (x_t.double() - sigma_t * converted.double()) / alpha_t
        return converted
    out = s.step(m, t, x_t, **step_kwargs(s, 7))
    if getattr(out, "pred_original_sample", None) is not None:
        return out.pred_original_sample
    # flow matching: prev = x + (sig_next - sig) m, and x0 = x - sig m
    index = sched.step_index if sched.step_index is not None else sched.index_for_timestep(t)
    sig, sig_next = s.sigmas[index], s.sigmas[index + 1]
    velocity = (out.prev_sample.double() - x_t.double()) / float(sig_next - sig)
    return x_t.double() - float(sig) * velocity


def conditioning(sched, t) -> float:
    """How much the reference x0 amplifies float32 rounding: DPM-Solver (not ++) converts to
    epsilon in float32, and x0 = (x - sigma_t eps) / alpha_t multiplies its error by sigma_t/alpha_t."""
    if isinstance(sched, DPMSolverMultistepScheduler) and sched.config.algorithm_type == "dpmsolver":
        index = sched.step_index if sched.step_index is not None else sched.index_for_timestep(t)
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sched.sigmas[index])
        return max(1.0, float(sigma_t / alpha_t))
    return 1.0


def calls_for(case: str) -> list[int]:
    # first call, a middle call; for Heun also its corrector call (odd index)
    return [0, 4, 5] if case.startswith("heun") else [0, 5]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lam", [1.0, 1.6])
def test_output_implies_corrected_x0(case, lam):
    # The affine rewrite at any call, whatever the noise left (min_noise_radii=0: the paper's
    # every-step schedule; the late-step gate is tested in test_judges.py).
    for calls in calls_for(case):
        sched, t, x_t, m = advanced(case, calls)
        x0 = scheduler_x0(sched, m, t, x_t).reshape(3, -1).double()
        scale = float(x0.norm(dim=1).mean()) / 10 + 0.1
        radius = 2.0 * scale
        g = torch.Generator().manual_seed(calls)
        unit = lambda: torch.nn.functional.normalize(torch.randn(x0.shape[1], generator=g, dtype=torch.float64), dim=0)
        # row 0: one protected point inside; row 1: two; row 2: none
        z = torch.stack([x0[0] + 0.5 * scale * unit(), x0[1] + 0.3 * scale * unit(), x0[1] + 1.2 * scale * unit()]).float()
        shielded = ShieldedScheduler(copy.deepcopy(sched), [StaticSource(z, radius)], SpellConfig(overcompensation=lam, correction_iterations=1, min_noise_radii=0))
        rewritten = shielded.correct(m, t, x_t, 0, {})
        implied = scheduler_x0(sched, rewritten, t, x_t).reshape(3, -1).double()
        expected = x0.clone()
        for row in range(3):
            dist = torch.cdist(x0[row : row + 1], z.double())[0]
            inside = torch.nonzero(dist < radius).flatten()
            if len(inside):
                expected[row] += lam * repel(x0[row], z[inside], radius).delta
        tol = 1e-4 * (1 + float(x_t.abs().max())) * conditioning(sched, t)
        assert torch.allclose(implied, expected, atol=tol, rtol=1e-4), (case, calls, float((implied - expected).abs().max()))
        assert torch.equal(rewritten[2], m[2])  # no hit: the row is untouched
        # step() hands exactly the rewritten output to the wrapped scheduler
        shielded = ShieldedScheduler(copy.deepcopy(sched), [StaticSource(z, radius)], SpellConfig(overcompensation=lam, correction_iterations=1, min_noise_radii=0))
        out = shielded.step(m, t, x_t, **step_kwargs(sched, 7)).prev_sample
        reference = copy.deepcopy(sched).step(rewritten, t, x_t, **step_kwargs(sched, 7)).prev_sample
        assert torch.equal(out, reference)
        assert {h.row for h in shielded.log.hits} == {0, 1}


@pytest.mark.parametrize("case", list(CASES))
def test_no_hit_is_bit_for_bit(case):
    for calls in calls_for(case):
        sched, t, x_t, m = advanced(case, calls)
        far = torch.full((1, x_t[0].numel()), 1e4)
        reference = copy.deepcopy(sched)
        shielded = ShieldedScheduler(copy.deepcopy(sched), [StaticSource(far, 1.0)], SpellConfig())
        # two consecutive calls: the wrapped scheduler's internal state advances identically
        for i in range(2):
            t_i = reference.timesteps[calls + i]
            a = reference.step(m, t_i, x_t, **step_kwargs(sched, 11 + i)).prev_sample
            b = shielded.step(m, t_i, x_t, **step_kwargs(sched, 11 + i)).prev_sample
            assert torch.equal(a, b), (case, calls, i)
        assert shielded.log.hits == []


@pytest.mark.parametrize("case", ["ddim-eps", "dpm-v", "euler-eps", "heun-eps", "flow"])
def test_rows_without_hit_are_bit_for_bit(case):
    sched, t, x_t, m = advanced(case, 3)
    x0 = affine_for(sched, t, x_t).x0_from_output(m, x_t).reshape(3, -1)
    z = x0[1:2] + 0.01  # only row 1 is inside
    reference = copy.deepcopy(sched).step(m, t, x_t, **step_kwargs(sched, 3)).prev_sample
    out = ShieldedScheduler(copy.deepcopy(sched), [StaticSource(z, 1.0)]).step(m, t, x_t, **step_kwargs(sched, 3)).prev_sample
    assert torch.equal(out[0], reference[0]) and torch.equal(out[2], reference[2])
    assert not torch.equal(out[1], reference[1])


def test_affine_reads_state_without_changing_it():
    sched, t, x_t, m = advanced("dpm-eps", 0)
    assert sched.step_index is None
    affine_for(sched, t, x_t)
    assert sched.step_index is None  # derived like _init_step_index, not by calling it


def test_euler_with_churn_is_refused():
    sched, t, x_t, m = advanced("euler-eps", 0)
    shielded = ShieldedScheduler(sched, [StaticSource(torch.zeros(1, x_t[0].numel()), 1.0)])
    with pytest.raises(UnsupportedScheduler, match="s_churn"):
        shielded.step(m, t, x_t, s_churn=1.0)
    # s_churn outside [s_tmin, s_tmax] adds no noise: supported
    shielded.step(m, t, x_t, s_churn=1.0, s_tmax=0.0)


def test_learned_variance_and_unknown_schedulers_are_refused():
    from diffusers import PNDMScheduler

    sched = DDPMScheduler(variance_type="learned_range")
    sched.set_timesteps(5)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(UnsupportedScheduler, match="learned"):
        affine_for(sched, sched.timesteps[0], x, torch.zeros(1, 6, 2, 2))
    pndm = PNDMScheduler()
    pndm.set_timesteps(5)
    with pytest.raises(UnsupportedScheduler, match="PNDMScheduler"):
        affine_for(pndm, pndm.timesteps[0], x)


def test_heun_step_indices_count_calls():
    # 4 denoising steps = 7 step calls (predictor + corrector, the last one first-order only)
    sched = HeunDiscreteScheduler(num_train_timesteps=1000)
    shielded = ShieldedScheduler(sched, [StaticSource(torch.zeros(1, 8), 1e6)], SpellConfig(overcompensation=1e-12, correction_iterations=1, min_noise_radii=0))
    shielded.set_timesteps(4)
    x = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    for t in shielded.timesteps:
        x = shielded.step(torch.zeros_like(x), t, x).prev_sample
    log = shielded.reset_log()
    assert log.steps == len(sched.timesteps) == 7
    assert sorted({h.step for h in log.hits}) == list(range(7))
    assert [h.timestep for h in sorted(log.hits, key=lambda h: h.step)] == [float(t) for t in sched.timesteps]
