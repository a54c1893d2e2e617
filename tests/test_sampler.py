"""Sign-gradient sampler, objective kinds and initial distributions against hand values and real Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from morec_dist.config import ObjectiveConfig, load_config
from morec_dist.coordinator.objectives import (
    SIGNAL_GROUP_HIT,
    SIGNAL_GROUP_LOSS,
    SIGNAL_TOPK_HISTOGRAM,
    ObjectiveError,
    build_objectives,
)
from morec_dist.coordinator.sampler import GroupStats, SamplerState, sign_gradient_step
from morec_dist.data.dataset import PreparedDataset
from tests.conftest import toy_group_stats


def test_sign_step_adds_alpha_and_renormalises():
    p = sign_gradient_step(np.array([0.5, 0.3, 0.2]), np.array([1, 0, -1]), 0.1)
    np.testing.assert_allclose(p, [0.6, 0.3, 0.1], atol=1e-15)


def test_sign_step_clips_negatives_before_normalising():
    # [0.7, 0.25, 0.05] + 0.1 * [1, -1, -1] = [0.8, 0.15, -0.05] -> [0.8, 0.15, 0] / 0.95
    p = sign_gradient_step(np.array([0.7, 0.25, 0.05]), np.array([1, -1, -1]), 0.1)
    np.testing.assert_allclose(p, [0.8 / 0.95, 0.15 / 0.95, 0.0], atol=1e-15)
    # A zeroed group can come back: [0.842, 0.158, 0] + 0.1 * [-1, 0, 1] -> [0.742, 0.158, 0.1] (sum 1)
    q = sign_gradient_step(p, np.array([-1, 0, 1]), 0.1)
    np.testing.assert_allclose(q, [0.8 / 0.95 - 0.1, 0.15 / 0.95, 0.1], atol=1e-15)


def test_sign_step_that_would_zero_everything_keeps_p():
    p = np.array([0.05, 0.05, 0.9])
    np.testing.assert_array_equal(sign_gradient_step(p, np.array([-1, -1, -1]), 1.0), p)


def test_sign_step_refuses_non_sign_values():
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        sign_gradient_step(np.array([0.5, 0.5]), np.array([0.5, -1]), 0.1)


def _stats() -> GroupStats:
    return toy_group_stats(price_sums={"rev_group": np.array([900.0, 100.0])})


def _objectives(*configs: ObjectiveConfig, alpha: float = 0.1):
    return build_objectives(list(configs), _stats(), default_alpha=alpha)


def test_alignment_sign_vector_compares_recommended_mix_with_target():
    objs = _objectives(ObjectiveConfig("alignment", "alignment", "align_group", 1.0))
    o = objs.objectives[0]
    assert o.target == pytest.approx((0.5, 0.3, 0.2))
    assert o.signal.kind == SIGNAL_TOPK_HISTOGRAM and o.signal.k == 100
    # q_rec = [0.6, 0.3, 0.1]: over-recommended head -> -1, exact -> 0, under -> +1
    s = objs.signs({"alignment": [60, 30, 10]})["alignment"]
    np.testing.assert_array_equal(s, [-1, 0, 1])
    np.testing.assert_array_equal(objs.signs({"alignment": [0, 0, 0]})["alignment"], [0, 0, 0])


def test_fairness_sign_vector_marks_only_the_worst_group():
    objs = _objectives(ObjectiveConfig("fairness", "fairness", "fair_group", 1.0))
    assert objs.objectives[0].signal.kind == SIGNAL_GROUP_LOSS
    s = objs.signs({"fairness": [0.3, float("nan"), 0.7, 0.5]})["fairness"]
    np.testing.assert_array_equal(s, [0, 0, 1, 0])
    # ties: the first worst group, deterministically
    np.testing.assert_array_equal(objs.signs({"fairness": [0.7, 0.2, 0.7, 0.5]})["fairness"], [1, 0, 0, 0])
    by_hit = _objectives(ObjectiveConfig("fairness", "fairness", "fair_group", 1.0, {"by": "hit", "k": 10}))
    assert by_hit.objectives[0].signal.kind == SIGNAL_GROUP_HIT
    np.testing.assert_array_equal(by_hit.signs({"fairness": [0.1, 0.05, float("nan"), 0.2]})["fairness"], [0, 1, 0, 0])


def test_fairness_worst_m_marks_the_m_worst_measured_groups():
    m3 = _objectives(ObjectiveConfig("fairness", "fairness", "fair_group", 1.0, {"worst": 3}))
    # losses: groups 3, 4 and 1 are the three worst; the NaN group is never marked
    s = m3.signs({"fairness": [0.5, float("nan"), 0.7, 0.6]})["fairness"]
    np.testing.assert_array_equal(s, [1, 0, 1, 1])
    s = m3.signs({"fairness": [0.5, 0.1, 0.7, 0.6]})["fairness"]
    np.testing.assert_array_equal(s, [1, 0, 1, 1])
    # ties at the cut: the lower index first
    np.testing.assert_array_equal(m3.signs({"fairness": [0.2, 0.2, 0.2, 0.9]})["fairness"], [1, 1, 0, 1])
    # by hit: the lowest hits; more groups asked than measured marks every measured one
    by_hit = _objectives(ObjectiveConfig("fairness", "fairness", "fair_group", 1.0, {"by": "hit", "worst": 2}))
    np.testing.assert_array_equal(by_hit.signs({"fairness": [0.1, 0.05, 0.3, 0.2]})["fairness"], [1, 1, 0, 0])
    nan_heavy = {"fairness": [float("nan"), 0.3, float("nan"), float("nan")]}
    np.testing.assert_array_equal(m3.signs(nan_heavy)["fairness"], [0, 1, 0, 0])
    with pytest.raises(ObjectiveError, match=r"options.worst"):
        _objectives(ObjectiveConfig("fairness", "fairness", "fair_group", 1.0, {"worst": 0}))


def test_fairness_and_alignment_updates_follow_a_hand_computed_sequence():
    objs = _objectives(
        ObjectiveConfig("fairness", "fairness", "fair_group", 0.5),
        ObjectiveConfig("alignment", "alignment", "align_group", 0.5, {"alpha": 0.2}),
        alpha=0.1,
    )
    state = SamplerState(objs.initial_probabilities(), {o.name: o.alpha for o in objs.objectives})
    np.testing.assert_allclose(state.probabilities["fairness"], [0.4, 0.3, 0.2, 0.1])
    # fairness worst = group 4: [0.4, 0.3, 0.2, 0.2] / 1.1; alignment q_rec [0.7, 0.2, 0.1] -> s [-1, +1, +1], alpha 0.2
    state.step(objs.signs({"fairness": [0.1, 0.2, 0.3, 0.9], "alignment": [7, 2, 1]}))
    np.testing.assert_allclose(state.probabilities["fairness"], np.array([0.4, 0.3, 0.2, 0.2]) / 1.1, atol=1e-15)
    np.testing.assert_allclose(state.probabilities["alignment"], np.array([0.3, 0.5, 0.4]) / 1.2, atol=1e-15)
    # second step: q_rec [0.6, 0.4, 0] -> s [-1, -1, +1]:
    # [0.25, 0.4167, 0.3333] + 0.2 * [-1, -1, +1] -> [0.05, 0.2167, 0.5333]/0.8
    state.step(objs.signs({"fairness": [0.9, 0.2, 0.3, 0.1], "alignment": [6, 4, 0]}))
    a = np.array([0.3, 0.5, 0.4]) / 1.2 + 0.2 * np.array([-1, -1, 1])
    np.testing.assert_allclose(state.probabilities["alignment"], a / a.sum(), atol=1e-15)
    assert state.version == 2


def test_revenue_is_fixed_and_price_proportional_or_exact():
    band = _objectives(ObjectiveConfig("revenue", "revenue", "rev_group", 1.0))
    assert band.objectives[0].initial_probabilities == pytest.approx((0.75, 0.25))
    assert not band.objectives[0].adaptive and band.signal_requests() == []
    exact = _objectives(ObjectiveConfig("revenue", "revenue", "rev_group", 1.0, {"price_weighting": "exact"}))
    assert exact.objectives[0].initial_probabilities == pytest.approx((0.9, 0.1))
    assert exact.objectives[0].row_weight_column == "price"


def test_unknown_kind_option_or_column_errors_name_the_objective():
    with pytest.raises(
        ObjectiveError, match=r"morec.objectives\[0\] \(novelty\).*unknown objective kind 'novel'.*expected one of"
    ):
        _objectives(ObjectiveConfig("novelty", "novel", "fair_group", 1.0))
    with pytest.raises(ObjectiveError, match=r"\(fairness\)\.options: unknown key\(s\) \['topk'\]"):
        _objectives(ObjectiveConfig("fairness", "fairness", "fair_group", 1.0, {"topk": 5}))
    with pytest.raises(ObjectiveError, match=r"\(fairness\)\.group_column: group column 'genre'"):
        _objectives(ObjectiveConfig("fairness", "fairness", "genre", 1.0))
    with pytest.raises(ObjectiveError, match="accuracy is implicit"):
        _objectives(ObjectiveConfig("accuracy", "fixed", "fair_group", 1.0))
    with pytest.raises(ObjectiveError, match=r"options.target: expected 3 values"):
        _objectives(ObjectiveConfig("mix", "target_share", "align_group", 1.0, {"target": [0.5, 0.5]}))


def test_signals_are_validated():
    objs = _objectives(
        ObjectiveConfig("alignment", "alignment", "align_group", 1.0),
        ObjectiveConfig("revenue", "revenue", "rev_group", 1.0),
    )
    with pytest.raises(ObjectiveError, match="missing \\['alignment'\\], unexpected \\['revenue'\\]"):
        objs.signs({"revenue": [1, 2]})
    with pytest.raises(ObjectiveError, match="expected 3 values"):
        objs.signs({"alignment": [1, 2]})
    with pytest.raises(ObjectiveError, match="non-negative counts"):
        objs.signs({"alignment": [1, -2, 3]})


# ------------------------------------------------------------ on a real prepared dataset


@pytest.fixture(scope="module")
def dataset(small_synthetic) -> PreparedDataset:
    return PreparedDataset.open(small_synthetic, verify_values=False)


def test_price_statistics_match_the_parquet_files(dataset):
    stats = GroupStats.from_dataset(dataset)
    items = pq.read_table(dataset.path / "items.parquet")
    groups, prices = items["rev_group"].to_numpy(), items["price"].to_numpy()
    g = stats.num_groups["rev_group"]
    expected_mean = np.array([prices[groups == b].mean() for b in range(1, g + 1)])
    np.testing.assert_allclose(stats.item_mean_price("rev_group"), expected_mean, rtol=1e-12)
    train = dataset.read_split("train", ["price", "rev_group"])
    tg, tp = train["rev_group"].to_numpy(), train["price"].to_numpy()
    sums = np.array([tp[tg == b].sum() for b in range(1, g + 1)])
    np.testing.assert_allclose(stats.train_price_sum("rev_group"), sums, rtol=1e-12)
    # exact option: band S_g / S, then price / S_g inside the band = price / S for every row
    p_band = sums / sums.sum()
    per_row = p_band[tg - 1] * tp / sums[tg - 1]
    np.testing.assert_allclose(per_row, tp / tp.sum(), rtol=1e-12)
    assert per_row.sum() == pytest.approx(1.0)


def test_reference_objectives_resolve_against_the_manifest(dataset):
    config = load_config(None)
    objs = build_objectives(
        config.morec.objectives, GroupStats.from_dataset(dataset), default_alpha=config.morec.sampler.alpha
    )
    assert objs.names == ["accuracy", "revenue", "fairness", "alignment"]
    assert [o.block for o in objs.objectives] == [1, 2, 3]
    fair = objs.by_name("fairness")
    counts = np.asarray(dataset.manifest["groups"]["fair_group"]["train_counts"], dtype=float)
    np.testing.assert_allclose(fair.initial_probabilities, counts / counts.sum())
    np.testing.assert_allclose(objs.by_name("alignment").target, dataset.manifest["q_star"], rtol=1e-9)
    assert [r.objective for r in objs.signal_requests()] == ["fairness", "alignment"]


def test_a_fifth_objective_from_config_needs_no_code(dataset):
    config = load_config(
        None,
        [
            'morec.objectives=[{name="revenue", kind="revenue", group_column="rev_group", weight=0.4},'
            ' {name="fairness", kind="fairness", group_column="fair_group", weight=0.2},'
            ' {name="alignment", kind="alignment", group_column="align_group", weight=0.2},'
            ' {name="head_floor", kind="worst_group", group_column="align_group", weight=0.1,'
            ' options={by="hit", k=10}},'
            ' {name="genre_mix", kind="target_share", group_column="fair_group", weight=0.1,'
            ' options={target="uniform", k=20, alpha=0.02}}]'
        ],
    )
    objs = build_objectives(
        config.morec.objectives, GroupStats.from_dataset(dataset), default_alpha=config.morec.sampler.alpha
    )
    assert objs.names[-2:] == ["head_floor", "genre_mix"] and objs.num_blocks == 6
    mix = objs.by_name("genre_mix")
    g = mix.num_groups
    assert mix.alpha == 0.02 and mix.target == pytest.approx(tuple([1 / g] * g))
    hist = np.arange(1, g + 1, dtype=float)  # q_rec increasing: low groups under target
    s = objs.signs(
        {
            "fairness": [0.5] * objs.by_name("fairness").num_groups,
            "alignment": [1.0] * 10,
            "head_floor": [0.2] * 9 + [0.0],
            "genre_mix": hist.tolist(),
        }
    )
    assert s["head_floor"].tolist() == [0] * 9 + [1]
    expected = np.sign(1 / g - hist / hist.sum())
    np.testing.assert_array_equal(s["genre_mix"], expected)
