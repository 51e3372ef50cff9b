"""The SPELL formula (DESIGN.md; the paper's Eq. 7) against hand-worked cases."""

import math

import pytest
import torch

from spellshield.pipeline.repellency import fallback_direction, repel


def test_outside_every_ball_gives_zero():
    x0 = torch.tensor([3.0, 0.0])
    z = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    rep = repel(x0, z, radius=2.0)
    assert torch.equal(rep.delta, torch.zeros(2, dtype=torch.float64))
    assert rep.weights.tolist() == [0.0, 0.0]


def test_on_the_sphere_is_outside():
    # The ball is open: at distance exactly r the relu weight r/d - 1 is 0.
    rep = repel(torch.tensor([2.0, 0.0]), torch.tensor([[0.0, 0.0]]), radius=2.0)
    assert rep.weights.tolist() == [0.0]


def test_one_ball_hand_worked():
    # r = 2, x0 = (1, 0), z = (0, 0): d = 1, weight = 2/1 - 1 = 1, delta = (1, 0).
    rep = repel(torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0]]), radius=2.0)
    assert rep.weights.tolist() == [1.0]
    assert rep.delta.tolist() == [1.0, 0.0]
    # lam = 1 lands exactly on the sphere: x0' = (2, 0).
    assert (torch.tensor([1.0, 0.0], dtype=torch.float64) + rep.delta).tolist() == [2.0, 0.0]


@pytest.mark.parametrize("seed", range(5))
def test_one_ball_lam_one_lands_on_sphere(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 16, generator=g)
    direction = torch.randn(16, generator=g)
    direction /= direction.norm()
    radius = 3.0
    x0 = z[0] + 0.37 * radius * direction
    rep = repel(x0, z, radius)
    corrected = x0.double() + rep.delta
    assert math.isclose(float((corrected - z[0].double()).norm()), radius, rel_tol=1e-12)
    # and it moved straight away from z
    assert torch.allclose((corrected - x0.double()) / (corrected - x0.double()).norm(), direction.double(), atol=1e-6)


def test_two_balls_add():
    # x0 = (0, 0); z1 = (1, 0), z2 = (0, 2); r = 4: weights 3 and 1,
    # delta = 3 * (-1, 0) + 1 * (0, -2) = (-3, -2).
    rep = repel(torch.tensor([0.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]), radius=4.0)
    assert rep.weights.tolist() == [3.0, 1.0]
    assert rep.delta.tolist() == [-3.0, -2.0]


def test_degenerate_uses_given_direction_with_length_r():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    direction = torch.tensor([0.0, 3.0, 4.0])  # unit (0, .6, .8)
    rep = repel(z[0].clone(), z, radius=2.0, degenerate_direction=direction)
    assert rep.degenerate.tolist() == [True]
    assert torch.allclose(rep.delta, torch.tensor([0.0, 1.2, 1.6], dtype=torch.float64))
    # lam = 1: exactly on the sphere, as in the non-degenerate case.
    assert math.isclose(float(rep.delta.norm()), 2.0, rel_tol=1e-12)


def test_degenerate_without_direction_uses_documented_fallback():
    z = torch.zeros(1, 4)
    rep = repel(z[0].clone(), z, radius=1.0, degenerate_direction=torch.zeros(4))
    assert torch.allclose(rep.delta, fallback_direction(4))
    assert torch.allclose(rep.delta, torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.isfinite(rep.delta).all()


def test_degenerate_is_continuous_with_the_limit():
    # Just outside the degenerate threshold the formula gives (r - d) u -> r u as d -> 0.
    z = torch.zeros(1, 3, dtype=torch.float64)
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    near = repel(1e-5 * u, z, radius=1.0).delta
    at = repel(torch.zeros(3, dtype=torch.float64), z, radius=1.0, degenerate_direction=u).delta
    assert torch.allclose(near, at, atol=2e-5)


def test_radius_must_be_positive():
    with pytest.raises(ValueError, match="radius"):
        repel(torch.zeros(2), torch.zeros(1, 2), radius=0.0)
