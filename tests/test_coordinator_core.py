"""The Ray-free coordinator core: exact aggregation, step-ordered PID, versions, preferences, state."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from morec_dist.config import load_config
from morec_dist.coordinator.core import CoordinatorCore, CoordinatorError, DecisionNotReady, build_spec
from morec_dist.coordinator.pid import PIDController, PIDGains
from morec_dist.coordinator.sampler import GroupStats
from tests.conftest import toy_group_stats

L_HAT = 0.25


def stats() -> GroupStats:
    return toy_group_stats()


def make_core(*overrides: str, world_size: int = 2, staleness: int = 2, every: int = 4) -> CoordinatorCore:
    # the job config requires s >= 1 (the trainer's loop needs the slack); the core itself
    # also supports s = 0, which is set on the spec directly
    config = load_config(
        None,
        [
            "morec.pid.law=paper",  # the paper's PID on the step losses (the budget law: tests/test_budget_law.py)
            f"coordinator.staleness={max(staleness, 1)}",
            f"morec.sampler.update_every_steps={every}",
            *overrides,
        ],
    )
    spec = build_spec(config, stats(), world_size=world_size, target_loss=L_HAT)
    return CoordinatorCore(dataclasses.replace(spec, staleness=staleness))


def rank_report(rank: int, step: int, blocks: int = 4) -> tuple[list[float], list[int]]:
    """Synthetic per-rank sums / counts, exactly representable (multiples of 1/8)."""
    counts = [8 * (rank + 1) + b for b in range(blocks)]
    sums = [0.125 * ((rank + 3) * (step + 1) + 5 * b) for b in range(blocks)]
    return sums, counts


def feed(core: CoordinatorCore, order: list[tuple[int, int]], blocks: int = 4) -> None:
    for rank, step in order:
        core.report(rank, step, *rank_report(rank, step, blocks))


def expected_global(step: int, ranks: int = 2, blocks: int = 4) -> list[float]:
    out = []
    for b in range(blocks):
        s = sum(rank_report(r, step, blocks)[0][b] for r in range(ranks))
        c = sum(rank_report(r, step, blocks)[1][b] for r in range(ranks))
        out.append(s / c)
    return out


def test_interleaved_out_of_order_reports_aggregate_exactly_in_step_order():
    core = make_core()
    # rank 1 runs ahead; rank 0 reports step 2 before 0 and 1
    feed(core, [(1, 0), (1, 1), (1, 2), (0, 2)])
    assert core.aggregated_through == -1 and sorted(core.pending) == [0, 1, 2]
    feed(core, [(0, 1)])
    assert core.aggregated_through == -1  # step 0 still incomplete: nothing runs out of order
    feed(core, [(0, 0)])
    assert core.aggregated_through == 2 and core.pending == {}
    for t in range(3):
        assert core.trace[t].losses == expected_global(t)  # exact equality
        assert core.trace[t].counts == [sum(rank_report(r, t)[1][b] for r in range(2)) for b in range(4)]
    # step 0 by hand: acc sums 0.375 + 0.5, counts 8 + 16 -> 0.875 / 24
    assert core.trace[0].losses[0] == 0.875 / 24
    # the PID ran once per step, in step order, on the global accuracy loss
    pid = PIDController(PIDGains.from_config(load_config(None).morec.pid))
    assert [r.beta for r in core.trace] == [pid.update(expected_global(t)[0], L_HAT).beta for t in range(3)]


def test_decisions_follow_the_staleness_bound():
    core = make_core(staleness=2)
    resting = core.spec.gains.resting_beta
    assert [core.decision(t).beta for t in (0, 1)] == [resting, resting]
    assert core.decision(0).pid_through == -1
    with pytest.raises(DecisionNotReady):
        core.decision(2)
    feed(core, [(0, 0), (1, 0)])
    d2 = core.decision(2)
    assert (d2.beta, d2.pid_through) == (core.trace[0].beta, 0)
    assert not core.ready(3)
    assert d2.weights == {"revenue": 0.6, "fairness": 0.2, "alignment": 0.2} and d2.lam == 0.2


def test_same_inputs_in_any_arrival_order_give_identical_decisions():
    steps = 12
    order = [(r, t) for t in range(steps) for r in range(2)]
    betas = []
    for seed in range(3):
        shuffled = order[:]
        random.Random(seed).shuffle(shuffled)
        core = make_core(every=100)
        feed(core, shuffled)
        betas.append([core.decision(t).beta for t in range(steps + 2)])
    assert betas[0] == betas[1] == betas[2]
    assert len(set(betas[0])) > 3  # beta actually moved


def test_signals_are_accepted_only_for_the_next_due_step():
    core = make_core(staleness=2, every=4)
    with pytest.raises(CoordinatorError, match="next sampler update is due after step 3, got step 7"):
        core.submit_signals(7, {"fairness": [0, 0, 0, 1], "alignment": [1, 1, 1]})
    with pytest.raises(CoordinatorError, match="expected 4 values"):
        core.submit_signals(3, {"fairness": [0, 1], "alignment": [1, 1, 1]})
    fixed_only = make_core('morec.objectives=[{name="revenue", kind="revenue", group_column="rev_group", weight=1.0}]')
    with pytest.raises(CoordinatorError, match="no sampler update is ever due"):
        fixed_only.submit_signals(3, {})


def test_decision_waits_for_due_signals_then_switches_version_at_the_stated_step():
    core = make_core("morec.sampler.alpha=0.1", staleness=2, every=4)
    feed(core, [(r, t) for t in range(4) for r in range(2)])
    assert core.ready(4)  # horizon 2: no update due yet
    assert not core.ready(5)  # horizon 3: the update due after step 3 is missing
    signals = {"fairness": [0.1, 0.2, 0.3, 0.9], "alignment": [7, 2, 1]}
    assert core.submit_signals(3, signals) == 1
    assert core.submit_signals(3, signals) == 1  # identical resubmission: no-op
    with pytest.raises(CoordinatorError, match="different values"):
        core.submit_signals(3, {"fairness": [0.9, 0.2, 0.3, 0.1], "alignment": [7, 2, 1]})
    d4, d5 = core.decision(4), core.decision(5)
    assert (d4.p_version, d5.p_version) == (0, 1)
    np.testing.assert_allclose(d4.probabilities["fairness"], [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(d5.probabilities["fairness"], np.array([0.4, 0.3, 0.2, 0.2]) / 1.1)
    np.testing.assert_allclose(d5.probabilities["alignment"], np.array([0.4, 0.4, 0.3]) / 1.1)
    assert d5.probabilities["revenue"] == d4.probabilities["revenue"] == pytest.approx([0.75, 0.25])


def test_a_preference_change_takes_effect_at_the_stated_step():
    core = make_core(staleness=2, every=100)
    feed(core, [(r, t) for t in range(3) for r in range(2)])  # aggregated through 2
    with pytest.raises(CoordinatorError, match="earliest step that can still change is 5"):
        core.set_preferences(weights={"revenue": 0.1}, effective_step=4)
    change = core.set_preferences(weights={"revenue": 0.1}, target_loss=0.5, effective_step=6, source="test")
    assert (change.effective_step, change.received_after_step, change.source) == (6, 2, "test")
    feed(core, [(r, t) for t in range(3, 9) for r in range(2)])
    assert core.decision(5).weights["revenue"] == 0.6
    assert core.decision(6).weights == {"revenue": 0.1, "fairness": 0.2, "alignment": 0.2}
    assert [r.target_loss for r in core.trace] == [L_HAT] * 6 + [0.5] * 3
    pid = PIDController(PIDGains.from_config(load_config(None).morec.pid))
    expected = [pid.update(expected_global(t)[0], L_HAT if t < 6 else 0.5).beta for t in range(9)]
    assert [r.beta for r in core.trace] == expected
    # beta of step t comes from step t - 2: the new l_hat reaches the decisions from step 8
    assert core.decision(8).beta == expected[6]
    assert [c.effective_step for c in core.history] == [6]
    # without a step: the earliest deterministic one
    assert core.set_preferences(target_loss=0.3).effective_step == 8 + 2 + 1


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"novelty": 1.0}, "unknown objectives"),
        ({"revenue": -1.0}, ">= 0"),
        ({"revenue": 0, "fairness": 0, "alignment": 0}, "sum to 0"),
    ],
)
def test_bad_preferences_are_refused(weights, message):
    with pytest.raises(CoordinatorError, match=message):
        make_core().set_preferences(weights=weights)


def test_bad_reports_are_refused_with_a_clear_message():
    core = make_core()
    sums, counts = rank_report(0, 0)
    core.report(0, 0, sums, counts)
    with pytest.raises(CoordinatorError, match="rank 0 reported step 0 twice"):
        core.report(0, 0, sums, counts)
    with pytest.raises(CoordinatorError, match="rank must be an integer in 0..1"):
        core.report(2, 0, sums, counts)
    with pytest.raises(CoordinatorError, match="expected 4 loss sums"):
        core.report(1, 0, sums[:3], counts[:3])
    with pytest.raises(CoordinatorError, match="finite"):
        core.report(1, 0, [float("nan")] + sums[1:], counts)
    core.report(1, 0, *rank_report(1, 0))
    with pytest.raises(CoordinatorError, match="already aggregated"):
        core.report(1, 0, sums, counts)


def _scripted_run(core: CoordinatorCore, start: int, stop: int, decisions: list, end: int = 14) -> None:
    """A deterministic script: reports (rank 1 one step ahead), due signals, one preference change."""
    for t in range(start, stop):
        if t == 0:
            core.report(1, 0, *rank_report(1, 0))
        if t + 1 < end:
            core.report(1, t + 1, *rank_report(1, t + 1))
        core.report(0, t, *rank_report(0, t))
        if (t + 1) % core.spec.sampler_every == 0:
            core.submit_signals(t, {"fairness": [t % 4, 1, 2, 0.5], "alignment": [t % 3 + 1, 2, 3]})
        if t == 5:
            core.set_preferences(weights={"fairness": 0.5}, target_loss=0.05, effective_step=9)
        decisions.append(core.decision(t + 2))


def test_state_dict_round_trip_mid_run_continues_identically():
    full = make_core(every=3)
    uninterrupted: list = []
    _scripted_run(full, 0, 14, uninterrupted)

    first = make_core(every=3)
    resumed_decisions: list = []
    _scripted_run(first, 0, 7, resumed_decisions)
    assert first.pending  # rank 1's report of step 7 is in flight at the checkpoint
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint file holds
    second = make_core(every=3)
    second.load_state_dict(state)
    _scripted_run(second, 7, 14, resumed_decisions)
    assert resumed_decisions == uninterrupted
    assert second.trace_dict() == full.trace_dict()
    assert second.state_dict() == full.state_dict()


def test_state_from_another_job_shape_is_refused():
    state = make_core(world_size=2).state_dict()
    with pytest.raises(CoordinatorError, match="world_size is 2 in the checkpoint but 3"):
        make_core(world_size=3).load_state_dict(state)


def test_a_fifth_objective_from_config_runs_through_the_core():
    core = make_core(
        'morec.objectives=[{name="revenue", kind="revenue", group_column="rev_group", weight=0.4},'
        ' {name="fairness", kind="fairness", group_column="fair_group", weight=0.2},'
        ' {name="alignment", kind="alignment", group_column="align_group", weight=0.2},'
        ' {name="pop_floor", kind="worst_group", group_column="align_group", weight=0.2, options={alpha=0.5}}]',
        world_size=1,
        staleness=1,
        every=2,
    )
    assert core.names == ["accuracy", "revenue", "fairness", "alignment", "pop_floor"]
    for t in range(2):
        core.report(0, t, *rank_report(0, t, blocks=5))
    with pytest.raises(CoordinatorError, match="missing \\['pop_floor'\\]"):
        core.submit_signals(1, {"fairness": [1, 2, 3, 4], "alignment": [1, 1, 1]})
    core.submit_signals(1, {"fairness": [1, 2, 3, 4], "alignment": [1, 1, 1], "pop_floor": [0.1, 0.9, 0.3]})
    d = core.decision(2)
    assert d.p_version == 1 and d.weights["pop_floor"] == 0.2
    # [0.5, 0.3, 0.2] + 0.5 * [0, 1, 0] = [0.5, 0.8, 0.2] / 1.5
    np.testing.assert_allclose(d.probabilities["pop_floor"], np.array([0.5, 0.8, 0.2]) / 1.5)
    assert core.trace[1].losses == [
        sum(rank_report(0, 1, 5)[0][b : b + 1]) / rank_report(0, 1, 5)[1][b] for b in range(5)
    ]


def test_synchronous_mode_decides_from_the_same_step():
    core = make_core(staleness=0, every=100)
    with pytest.raises(DecisionNotReady):
        core.decision(0)
    feed(core, [(0, 0), (1, 0)])
    assert core.decision(0).beta == core.trace[0].beta
