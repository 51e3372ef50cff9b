"""Shield sources (batch, history, combined radii) and the method's known weaknesses:
SPELL-K (--max-neighbours) with its audit rows, repeated correction for overlapping balls, and
the degenerate x0_hat == z_k case. Hand-worked values throughout; the scheduler is DDIM with
prediction_type "sample", so that the model output *is* x0_hat and every number can be
checked on paper."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spellshield.pipeline.repellency import repel
from spellshield.pipeline.scheduler import ShieldedScheduler, SpellConfig
from spellshield.pipeline.sources import BatchSource, HistorySource, SampleRow, StaticSource


def sample_scheduler():
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False)
    sched.set_timesteps(10)
    return sched


def corrected_x0(sources, x0, spell, rows=None):
    """x0_hat' for predictions x0 (B, D): with prediction_type sample, m' is x0_hat'."""
    shielded = ShieldedScheduler(sample_scheduler(), sources, spell)
    shielded.bind_batch(rows)
    t = shielded.timesteps[3]
    x0 = x0.reshape(x0.shape[0], 1, 1, -1)
    out = shielded.step(x0, t, torch.zeros_like(x0))
    return out.pred_original_sample.reshape(x0.shape[0], -1), shielded.reset_log().hits


def test_batch_source_groups_by_prompt_and_names_siblings():
    x0 = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.4]])
    rows = [SampleRow("s0", "cat"), SampleRow("s1", "cat"), SampleRow("s2", "dog")]
    source = BatchSource(radius=1.0)
    source.bind(rows)
    found = source.find(x0)
    # row 2 is closer to row 0 than row 1 is, but it is another prompt: never a neighbour
    assert found[0].ids.tolist() == [1] and found[1].ids.tolist() == [0] and found[2].ids.tolist() == []
    assert source.keys([1, 0]) == ["s1", "s0"]
    # unbound: one group, each row's siblings nearest first, never itself
    source.bind(None)
    assert source.find(x0)[0].ids.tolist() == [2, 1]


def test_batch_repellency_hand_worked():
    # two rows 0.5 apart, r = 1: each is pushed away from the other by lam * (1/0.5 - 1) * diff
    x0 = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    out, hits = corrected_x0([BatchSource(1.0)], x0, SpellConfig(overcompensation=1.0, correction_iterations=1),
                             [SampleRow("a", None), SampleRow("b", None)])
    assert torch.allclose(out, torch.tensor([[-0.5, 0.0], [1.0, 0.0]]), atol=1e-6)
    assert sorted((h.row, h.neighbour_key) for h in hits) == [(0, "b"), (1, "a")]


def test_history_bank_is_bounded_per_prompt():
    history = HistorySource(radius=10.0, size=2)
    for i in range(3):
        history.add("cat", f"c{i}", torch.full((2,), float(i)))
    history.add("dog", "d0", torch.zeros(2))
    assert len(history) == 3  # cat keeps its 2 latest, dog its 1
    history.bind([SampleRow("q0", "cat"), SampleRow("q1", "dog"), SampleRow("q2", "bird")])
    found = history.find(torch.tensor([[2.2, 2.2], [0.0, 0.0], [0.0, 0.0]]))
    assert history.keys(found[0].ids.tolist()) == ["c2", "c1"]  # c0 was evicted; nearest first
    assert math.isclose(float(found[0].distances[0]), 0.2 * math.sqrt(2), rel_tol=1e-6)
    assert history.keys(found[1].ids.tolist()) == ["d0"]
    assert found[2].ids.numel() == 0
    with pytest.raises(ValueError, match="size"):
        HistorySource(1.0, 0)


def test_sources_combine_each_with_its_own_radius():
    x0 = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    index = StaticSource(torch.tensor([[0.0, 1.0]]), radius=2.0, keys=["protected-7"])
    history = HistorySource(radius=0.5, size=4)
    history.add("p", "earlier", torch.tensor([0.25, 0.0]))
    rows = [SampleRow("s0", "p"), SampleRow("s1", "p")]
    out, hits = corrected_x0([index, history], x0, SpellConfig(overcompensation=1.6), rows)
    # row 0: index point at distance 1 (weight 1), history point at 0.25 (weight 1)
    expected0 = torch.tensor([0.0, 0.0]) + 1.6 * (1.0 * torch.tensor([0.0, -1.0]) + 1.0 * torch.tensor([-0.25, 0.0]))
    assert torch.allclose(out[0], expected0, atol=1e-6)
    assert torch.equal(out[1], x0[1])  # row 1 is outside both
    assert sorted((h.source, h.neighbour_key, round(h.radius, 3)) for h in hits) == [
        ("history", "earlier", 0.5), ("index", "protected-7", 2.0)]


def test_max_neighbours_uses_the_nearest_and_logs_the_rest():
    # three protected points inside r = 2 at distances 0.5, 1 and 1.5 (nearest first)
    z = torch.tensor([[0.5, 0.0], [0.0, 1.0], [-1.5, 0.0]])
    x0 = torch.zeros(1, 2)
    out, hits = corrected_x0([StaticSource(z, 2.0)], x0, SpellConfig(overcompensation=1.0, max_neighbours=1, correction_iterations=1))
    # SPELL-1: only the nearest enters delta: (2/0.5 - 1) * (0 - 0.5, 0) = (-1.5, 0)
    assert torch.allclose(out[0], torch.tensor([-1.5, 0.0]), atol=1e-6)
    rows = sorted(hits, key=lambda h: h.distance)
    assert [h.neighbour_id for h in rows] == [0, 1, 2]
    assert [h.used for h in rows] == [True, False, False]  # the audit sees that more were inside
    assert [h.weight for h in rows] == [3.0, 0.0, 0.0]
    assert [round(h.distance, 6) for h in rows] == [0.5, 1.0, 1.5]
    # SPELL-10 (all three): the sum of the three terms
    out_all, _ = corrected_x0([StaticSource(z, 2.0)], x0, SpellConfig(overcompensation=1.0, max_neighbours=10, correction_iterations=1))
    assert torch.allclose(out_all[0].double(), repel(x0[0], z, 2.0).delta, atol=1e-6)


def test_correction_iterations_hand_worked():
    # Overlapping balls, r = 1.5: z1 = (-1, 0), z2 = (1.8, 0), x0 = (0, 0), lam = 1.
    # it 0: inside z1 only (d = 1, w = .5): x0 -> (0.5, 0), now inside z2 (d = 1.3)
    # it 1: inside z2 only (w = 1.5/1.3 - 1): x0 -> (0.5 - 1.3 * (1.5/1.3 - 1), 0) = (0.3, 0)
    z = torch.tensor([[-1.0, 0.0], [1.8, 0.0]])
    x0 = torch.zeros(1, 2)
    one, hits_one = corrected_x0([StaticSource(z, 1.5)], x0, SpellConfig(overcompensation=1.0, correction_iterations=1))
    assert torch.allclose(one[0], torch.tensor([0.5, 0.0]), atol=1e-6)
    assert [h.iteration for h in hits_one] == [0]
    two, hits = corrected_x0([StaticSource(z, 1.5)], x0, SpellConfig(overcompensation=1.0, correction_iterations=2))
    assert torch.allclose(two[0], torch.tensor([0.3, 0.0]), atol=1e-6)
    assert [(h.iteration, h.neighbour_id) for h in hits] == [(0, 0), (1, 1)]
    assert math.isclose(hits[1].distance, 1.3, rel_tol=1e-6)
    assert math.isclose(hits[1].weight, 1.5 / 1.3 - 1, rel_tol=1e-6)
    # delta_norm is the whole move over all iterations, the same on every hit row of the step
    assert all(math.isclose(h.delta_norm, 0.3, rel_tol=1e-6) for h in hits)


def test_iterations_stop_when_outside():
    # one ball, lam = 1.6: the first correction leaves it; no second search hit, one iteration logged
    z = torch.tensor([[0.0, 1.0]])
    out, hits = corrected_x0([StaticSource(z, 2.0)], torch.zeros(1, 2), SpellConfig(correction_iterations=5))
    assert [h.iteration for h in hits] == [0]
    assert float(torch.linalg.vector_norm(out[0] - z[0])) >= 2.0


def test_degenerate_direction_is_the_noise_direction():
    # Both rows predict x0_hat == z exactly (the model output is x0_hat): push by r along
    # x_t - x0_hat, which differs per sample, so that two collapsing samples are pushed apart.
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    x_t = torch.tensor([[1.0, 5.0, 7.0, 4.0], [2.0, 2.0, 3.0, 4.0]])
    shielded = ShieldedScheduler(sample_scheduler(), [StaticSource(z, 0.5)], SpellConfig(overcompensation=1.0, correction_iterations=1))
    m = z.expand(2, 4).reshape(2, 1, 1, 4)
    out = shielded.step(m, shielded.timesteps[3], x_t.reshape(2, 1, 1, 4)).pred_original_sample.reshape(2, 4)
    hits = shielded.reset_log().hits
    assert len(hits) == 2 and all(h.degenerate and h.weight == 1.0 and h.distance == 0.0 for h in hits)
    # row 0: direction (0, 3, 4, 0) / 5; row 1: (1, 0, 0, 0)
    assert torch.allclose(out[0], torch.tensor([1.0, 2.3, 3.4, 4.0]), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([1.5, 2.0, 3.0, 4.0]), atol=1e-6)
    # x_t == x0_hat too: the documented fallback (1, ..., 1) / sqrt(D)
    fallback = shielded.step(m[:1], shielded.timesteps[4], m[:1]).pred_original_sample.reshape(4)
    assert torch.allclose(fallback, z[0] + 0.25, atol=1e-6)
