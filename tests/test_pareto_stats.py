"""benchmarks/pareto_stats.py: fronts, exact hypervolume (hand-computed volumes, the
inclusion-exclusion cross-check, a Monte Carlo check in 4-D) and the seeded bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.pareto_stats import (
    bootstrap_hypervolume,
    hypervolume,
    hypervolume_inclusion_exclusion,
    non_dominated,
    objective_vector,
)


def test_front_keeps_only_non_dominated_points():
    points = [[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0, 4], [2, 1.5]]
    assert non_dominated(points).tolist() == [0, 1, 2, 4, 5]  # equal points both kept


def test_hand_computed_volumes():
    # one box: the product of the improvements
    assert hypervolume([[2, 3, 4, 5]], [1, 1, 1, 1]) == pytest.approx(1 * 2 * 3 * 4)
    # 2-D staircase (1,3), (2,2), (3,1) over 0: 3 + 2 + 1 = 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    # 3-D: two unit-overlapping boxes [0,2]^2x[0,1] and [0,1]^2x[0,2]: 4 + 2 - 1 = 5
    assert hypervolume([[2, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(5.0)
    # 4-D: (2,1,1,1) and (1,2,1,1): 2 + 2 - 1 = 3; a dominated point adds nothing
    assert hypervolume([[2, 1, 1, 1], [1, 2, 1, 1], [1, 1, 0.5, 1]], [0, 0, 0, 0]) == pytest.approx(3.0)


def test_points_not_beyond_the_reference_add_nothing():
    assert hypervolume([[0.5, 3.0]], [1.0, 1.0]) == 0.0
    assert hypervolume([[2.0, 2.0], [0.5, 9.0]], [1.0, 1.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_slicing_equals_inclusion_exclusion_in_4d(seed):
    rng = np.random.default_rng(seed)
    points = rng.random((10, 4))
    ref = np.full(4, 0.1)
    assert hypervolume(points, ref) == pytest.approx(hypervolume_inclusion_exclusion(points, ref), rel=1e-12)


def test_twenty_points_in_4d_against_monte_carlo():
    rng = np.random.default_rng(11)
    points = rng.random((20, 4))
    ref = np.zeros(4)
    samples = rng.random((200_000, 4))
    covered = (samples[:, None, :] <= points[None, :, :]).all(axis=2).any(axis=1)
    assert hypervolume(points, ref) == pytest.approx(covered.mean(), abs=4 * np.sqrt(0.25 / len(samples)))


def test_objective_vector_negates_pop_kl():
    m = {"hit@10": 0.2, "r_hit@10": 3.0, "min_hit@10": 0.1, "pop_kl@10": 0.5}
    assert objective_vector(m).tolist() == [0.2, 3.0, 0.1, -0.5]
    with pytest.raises(KeyError, match="hit@5"):
        objective_vector(m, k=5)


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    rng = np.random.default_rng(0)
    # 3 settings x 5 seeds x 2 objectives around (1,3), (2,2), (3,1)
    centres = np.array([[1, 3], [2, 2], [3, 1]], dtype=np.float64)
    runs = centres[:, None, :] + 0.05 * rng.normal(size=(3, 5, 2))
    a = bootstrap_hypervolume(runs, [0, 0], samples=300, seed=4)
    b = bootstrap_hypervolume(runs, [0, 0], samples=300, seed=4)
    assert a == b
    assert a["low"] <= a["hypervolume"] <= a["high"]
    assert a["hypervolume"] == pytest.approx(6.0, abs=0.3)
    assert 0 < a["high"] - a["low"] < 1.0
    # no seed noise: a zero-width interval at the exact volume
    exact = bootstrap_hypervolume(np.repeat(centres[:, None, :], 3, axis=1), [0, 0], samples=50)
    assert exact["low"] == exact["high"] == pytest.approx(6.0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"runs: expected shape \[settings, seeds, objectives\]"):
        bootstrap_hypervolume([[1.0, 2.0]], [0, 0])
    with pytest.raises(ValueError, match="reference: expected 2"):
        hypervolume([[1.0, 2.0]], [0.0])
