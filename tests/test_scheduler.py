"""ShieldedScheduler on DDIM and DDPM (epsilon): the rewritten output implies x0_hat + lam*delta
for the same x_t, and rows without a hit step bit-for-bit like the wrapped scheduler."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from spellshield.pipeline.parametrisation import affine_for, vp_affine
from spellshield.pipeline.repellency import repel
from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig
from spellshield.pipeline.sources import BatchSource, StaticSource


def make(kind: str, prediction_type: str = "epsilon"):
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind]
    sched = cls(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(20)
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_affine_round_trip(prediction_type):
    affine = vp_affine(0.3, prediction_type)
    g = torch.Generator().manual_seed(0)
    x_t, m = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    x0 = affine.x0_from_output(m, x_t)
    assert torch.allclose(affine.output_from_x0(x0, x_t), m, atol=1e-6)


def test_epsilon_affine_matches_hand_formula():
    # abar = 0.64: a = 0.8, s = 0.6; x0 = (x_t - s m) / a.
    affine = vp_affine(0.64, "epsilon")
    x0 = affine.x0_from_output(torch.tensor([1.0]), torch.tensor([2.0]))
    assert torch.allclose(x0, torch.tensor([(2.0 - 0.6 * 1.0) / 0.8]))


def _setup(kind, seed=0, batch=3, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    sched = make(kind)
    t = sched.timesteps[12]
    x_t = torch.randn(batch, *shape, generator=g)
    m = torch.randn(batch, *shape, generator=g)
    x0 = affine_for(sched, t, x_t).x0_from_output(m, x_t)
    return sched, t, x_t, m, x0, g


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("lam", [1.0, 1.6, 3.0])
def test_output_implies_corrected_x0(kind, lam):
    sched, t, x_t, m, x0, g = _setup(kind)
    flat = x0.reshape(3, -1)
    radius = 2.0
    # Row 0: one protected point at distance 0.5; row 1: two points inside; row 2: none.
    z = torch.stack([
        flat[0] + 0.5 * torch.nn.functional.normalize(torch.randn(flat.shape[1], generator=g), dim=0),
        flat[1] + 0.3 * torch.nn.functional.normalize(torch.randn(flat.shape[1], generator=g), dim=0),
        flat[1] + 1.2 * torch.nn.functional.normalize(torch.randn(flat.shape[1], generator=g), dim=0),
    ])
    source = StaticSource(z, radius)
    shielded = ShieldedScheduler(copy.deepcopy(sched), [source], SpellConfig(overcompensation=lam, correction_iterations=1))
    out = shielded.step(m, t, x_t, generator=torch.Generator().manual_seed(1))
    expected = flat.double().clone()
    for row in range(3):
        inside = torch.nonzero(torch.cdist(flat[row : row + 1].double(), z.double())[0] < radius).flatten()
        if len(inside):
            expected[row] += lam * repel(flat[row], z[inside], radius).delta
    assert torch.allclose(out.pred_original_sample.reshape(3, -1).double(), expected, atol=1e-4)
    # x_t is kept: the rewrite changes the model output only.
    hits = shielded.log.hits
    assert {h.row for h in hits} == {0, 1}
    assert sorted(h.neighbour_id for h in hits if h.row == 1) == [1, 2]


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_lam_one_single_ball_lands_on_sphere(kind):
    sched, t, x_t, m, x0, g = _setup(kind, batch=1)
    flat = x0.reshape(1, -1)
    z = flat + 0.25 * torch.nn.functional.normalize(torch.randn_like(flat), dim=1)
    shielded = ShieldedScheduler(sched, [StaticSource(z, 1.0)], SpellConfig(overcompensation=1.0, correction_iterations=1))
    out = shielded.step(m, t, x_t, generator=torch.Generator().manual_seed(1))
    distance = (out.pred_original_sample.reshape(1, -1) - z).norm()
    assert abs(float(distance) - 1.0) < 1e-4


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_rows_without_hit_are_bit_for_bit(kind):
    sched, t, x_t, m, x0, g = _setup(kind)
    flat = x0.reshape(3, -1)
    z = flat[1:2] + 0.1  # only row 1 is inside
    reference = copy.deepcopy(sched).step(m, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    shielded = ShieldedScheduler(copy.deepcopy(sched), [StaticSource(z, 1.0)], SpellConfig())
    out = shielded.step(m, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    assert torch.equal(out[0], reference[0]) and torch.equal(out[2], reference[2])
    assert not torch.equal(out[1], reference[1])


def test_no_hit_at_all_is_bit_for_bit():
    sched, t, x_t, m, x0, g = _setup("ddim")
    far = x0.reshape(3, -1)[:1] + 100.0
    reference = copy.deepcopy(sched).step(m, t, x_t).prev_sample
    out = ShieldedScheduler(copy.deepcopy(sched), [StaticSource(far, 1.0)]).step(m, t, x_t).prev_sample
    assert torch.equal(out, reference)


def test_batch_source_never_repels_a_row_from_itself():
    sched, t, x_t, m, x0, g = _setup("ddim", batch=2)
    source = BatchSource(radius=1e6)
    found = source.find(x0.reshape(2, -1))
    assert found[0].ids.tolist() == [1] and found[1].ids.tolist() == [0]


def test_degenerate_hit_is_finite_and_logged():
    sched, t, x_t, m, x0, g = _setup("ddim", batch=1)
    z = x0.reshape(1, -1).clone()  # x0_hat == z exactly: 0/0 direction
    shielded = ShieldedScheduler(sched, [StaticSource(z, 1.0)], SpellConfig(overcompensation=1.0, correction_iterations=1))
    out = shielded.step(m, t, x_t)
    assert torch.isfinite(out.prev_sample).all()
    assert shielded.log.hits[0].degenerate
    assert abs(float((out.pred_original_sample.reshape(1, -1) - z).norm()) - 1.0) < 1e-4


def test_forwards_attributes_and_signature():
    import inspect

    sched = make("ddim")
    shielded = ShieldedScheduler(sched, [])
    assert shielded.config is sched.config and shielded.timesteps is sched.timesteps
    assert "num_inference_steps" in inspect.signature(shielded.set_timesteps).parameters
    shielded.set_timesteps(7)
    assert len(sched.timesteps) == 7


def test_spell_config_validates():
    with pytest.raises(ValueError, match="overcompensation"):
        SpellConfig(overcompensation=0)
    with pytest.raises(ValueError, match="correction_iterations"):
        SpellConfig(correction_iterations=0)
