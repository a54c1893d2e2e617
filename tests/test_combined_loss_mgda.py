"""The combined MoRec loss (hand values, gradients) and the MGDA min-norm solver (closed form, QP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from morec_dist.coordinator.combined_loss import block_sums, combined_loss
from morec_dist.coordinator.mgda import line_min_norm, mgda_weights, min_norm_weights


def test_combined_loss_matches_hand_values_and_gradients():
    per_row = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0, 0.5], dtype=torch.float64, requires_grad=True)
    blocks = torch.tensor([0, 0, 1, 2, 2, 2])
    loss, means = combined_loss(per_row, blocks, beta=0.7, weights=[0.6, 0.4], lam=0.2)
    # L0 = 2, L1 = 2, L2 = 10.5 / 3 = 3.5 -> 0.2 * (0.6 * 2 + 0.4 * 3.5) + 0.7 * 2 = 0.52 + 1.4
    assert means.tolist() == [2.0, 2.0, 3.5]
    assert loss.item() == pytest.approx(1.92, abs=1e-15)
    loss.backward()
    expected = [0.7 / 2, 0.7 / 2, 0.2 * 0.6, 0.2 * 0.4 / 3, 0.2 * 0.4 / 3, 0.2 * 0.4 / 3]
    np.testing.assert_allclose(per_row.grad.numpy(), expected, atol=1e-15)


def test_empty_block_contributes_nothing_and_reports_zero_rows():
    per_row = torch.tensor([1.0, 3.0, 5.0])
    blocks = torch.tensor([0, 0, 2])
    loss, means = combined_loss(per_row, blocks, beta=1.0, weights=[0.5, 0.5], lam=1.0)
    assert means.tolist() == [2.0, 0.0, 5.0] and loss.item() == pytest.approx(4.5)
    sums, counts = block_sums(per_row, blocks, 3)
    assert sums.tolist() == [4.0, 0.0, 5.0] and counts.tolist() == [2, 0, 1]


def test_bad_block_ids_and_weights_are_refused():
    with pytest.raises(ValueError, match="block_ids must lie in 0..2"):
        combined_loss(torch.ones(2), torch.tensor([0, 3]), 1.0, [0.5, 0.5], 0.2)
    with pytest.raises(ValueError, match="block_ids must lie in 0..1"):
        combined_loss(torch.ones(3), torch.tensor([0, 1, 2]), 1.0, [1.0], 0.2)
    with pytest.raises(ValueError, match="equal length"):
        combined_loss(torch.ones(3), torch.tensor([0, 1]), 1.0, [1.0], 0.2)


# ----------------------------------------------------------------------------- MGDA


def closed_form_two(g1: np.ndarray, g2: np.ndarray) -> float:
    """Sener & Koltun's 2-task solution: alpha = clip(((g2 - g1) . g2) / ||g1 - g2||^2, 0, 1)."""
    return float(np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))


def test_two_objectives_match_the_closed_form():
    rng = np.random.default_rng(0)
    assert mgda_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist() == [0.5, 0.5]
    a = mgda_weights(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert a.tolist() == pytest.approx([0.2, 0.8])  # by hand: (1 - 0) / 5
    for _ in range(20):
        g = rng.standard_normal((2, 7))
        a = min_norm_weights(g @ g.T)
        assert a[0] == pytest.approx(closed_form_two(g[0], g[1]), abs=1e-12)
        assert a.sum() == pytest.approx(1.0)


def test_dominated_gradient_gets_all_the_weight():
    # g1 is the shorter of two parallel gradients: the min-norm point is g1 itself
    assert min_norm_weights(np.array([[1.0, 2.0], [2.0, 4.0]])).tolist() == [1.0, 0.0]
    assert line_min_norm(4.0, 2.0, 1.0) == (0.0, 1.0)


def _qp_reference(m: np.ndarray) -> float:
    k = m.shape[0]
    result = minimize(
        lambda a: a @ m @ a,
        np.full(k, 1.0 / k),
        jac=lambda a: 2 * m @ a,
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return float(result.fun)


@pytest.mark.parametrize("k", [3, 4, 6])
def test_frank_wolfe_reaches_the_qp_optimum_and_kkt(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        g = rng.standard_normal((k, 12)) + 0.5
        m = g @ g.T
        a = min_norm_weights(m)
        assert np.all(a >= -1e-15) and a.sum() == pytest.approx(1.0)
        value = a @ m @ a
        assert value == pytest.approx(_qp_reference(m), rel=1e-6, abs=1e-9)
        # KKT on the simplex: (M a)_i >= a^T M a for all i (first-order optimality)
        assert np.all(m @ a >= value - 1e-8 * np.abs(m).max())


def test_zero_in_the_hull_gives_a_vanishing_direction():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    a = mgda_weights(g)
    assert torch.linalg.norm(a @ g).item() < 1e-3
    assert a[2].item() < 1e-3
