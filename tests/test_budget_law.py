"""The budget law (coordinator/budget.py) and the coordinator core under it: the PI's sign and
velocity form, anti-windup by the clamp, the safety rule, budget changes, exact state round
trips, and decisions that wait for the held-out measurements they depend on."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from morec_dist.config import ConfigError, load_config
from morec_dist.coordinator.budget import BudgetController, BudgetError, BudgetGains, beta_of, logit, share_of
from morec_dist.coordinator.core import CoordinatorCore, CoordinatorError, DecisionNotReady, build_spec
from morec_dist.coordinator.laws import CONTROL_LAWS
from tests.conftest import toy_group_stats

GAINS = BudgetGains(kp=2.0, ki=1.0, share_min=0.2, share_max=0.9, share_start=0.5, ema=1.0, safety_factor=2.0)
REF = 0.10  # the pretrained model's held-out Hit


def controller(**changes) -> BudgetController:
    return BudgetController(dataclasses.replace(GAINS, **changes), budget=0.05, reference=REF)


def test_set_point_and_errors_are_relative():
    c = controller()
    assert c.setpoint == pytest.approx(0.095)
    assert c.prev_error == pytest.approx(0.05 / 0.95)  # the pretrained model has the budget as room
    step = c.update(0, 0.095)
    assert step.error == pytest.approx(0.0, abs=1e-12)


def test_step_response_sign_and_velocity_form_by_hand():
    c = controller()
    u0 = c.u
    assert u0 == pytest.approx(0.0)  # share_start 0.5
    # accuracy falls below the set point: e < 0 -> the accuracy share rises
    e1 = (0.092 - 0.095) / 0.095
    s1 = c.update(0, 0.092)
    e0 = 0.05 / 0.95
    assert s1.u == pytest.approx(u0 - 2.0 * (e1 - e0) - 1.0 * e1, abs=1e-12)
    assert s1.share > 0.5
    # held at the same value: only the integral acts, still upward
    s2 = c.update(20, 0.092)
    assert s2.u == pytest.approx(s1.u - 1.0 * e1, abs=1e-12)
    # accuracy with room to spare: the share falls back
    c2 = controller()
    assert c2.update(0, 0.12).share < 0.5


def test_smoothing_is_an_ema_from_the_reference():
    c = controller(ema=0.25)
    s = c.update(0, 0.06)
    assert s.smoothed == pytest.approx(0.25 * 0.06 + 0.75 * REF)
    assert s.measured == 0.06


def test_anti_windup_the_clamp_holds_u_and_leaving_the_bound_is_immediate():
    c = controller(kp=0.0, ki=50.0, safety_factor=100.0)  # no safety rule here
    for t in range(5):
        s = c.update(t, 0.093)  # slightly below the set point, for long
    assert s.u == pytest.approx(logit(0.9)) and s.share == pytest.approx(0.9)
    # one measurement above the set point moves u down at once: no wound-up integral to undo
    back = c.update(5, 0.0955)
    assert back.u < logit(0.9)
    assert back.u == pytest.approx(logit(0.9) - 50.0 * (0.0955 - 0.095) / 0.095, abs=1e-12)


def test_safety_rule_takes_full_accuracy_weight_until_the_set_point_is_back():
    c = controller()
    assert c.safety_error == pytest.approx(-0.05 / 0.95)
    # 2 x budget below the pretrained model: broken by far
    s = c.update(0, 0.0899)
    assert s.safety and s.u == pytest.approx(GAINS.u_max) and s.share == pytest.approx(0.9)
    s = c.update(1, 0.094)  # better, still below the set point: stays on
    assert s.safety and s.u == pytest.approx(GAINS.u_max)
    s = c.update(2, 0.096)  # back above the set point: off, the PI continues from the upper bound
    assert not s.safety
    assert s.u < GAINS.u_max


def test_a_new_budget_moves_the_set_point_without_a_proportional_kick():
    c = controller(kp=5.0, ki=0.0)
    c.update(0, 0.095)
    u = c.u
    c.set_budget(0.04)
    assert c.setpoint == pytest.approx(0.096)
    # same measurement again: with ki = 0 and no kick, u does not move
    assert c.update(1, 0.095).u == pytest.approx(u, abs=1e-12)


def test_state_round_trip_continues_bit_identically():
    values = [0.1, 0.097, 0.091, 0.089, 0.093, 0.097, 0.1, 0.094]
    full = controller(ema=0.5)
    expected = [full.update(t, v).u for t, v in enumerate(values)]
    first = controller(ema=0.5)
    head = [first.update(t, v).u for t, v in enumerate(values[:4])]
    resumed = controller(ema=0.5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = [resumed.update(t + 4, v).u for t, v in enumerate(values[4:])]
    assert head + tail == expected


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: dataclasses.replace(GAINS, kp=-1.0), "morec.control.kp"),
        (lambda: dataclasses.replace(GAINS, share_max=1.0), "share_max < 1"),
        (lambda: dataclasses.replace(GAINS, ema=0.0), "morec.control.ema"),
        (lambda: BudgetController(GAINS, budget=0.0, reference=REF), "morec.accuracy_budget"),
        (lambda: BudgetController(GAINS, budget=0.02, reference=0.0), "control slice"),
        (lambda: controller().update(0, math.nan), "finite rate"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(build, message):
    with pytest.raises(BudgetError, match=message):
        build()


def test_beta_and_share_are_inverse():
    assert beta_of(0.5, 0.2) == pytest.approx(0.2)
    assert share_of(beta_of(0.83, 0.2), 0.2) == pytest.approx(0.83)


# ------------------------------------------------------------------- the core


def budget_core(*overrides: str, every: int = 4, sampler_every: int = 8, staleness: int = 2) -> CoordinatorCore:
    config = load_config(
        None,
        [
            "morec.pid.law=budget",
            f"morec.control.every_steps={every}",
            f"morec.sampler.update_every_steps={sampler_every}",
            f"coordinator.staleness={staleness}",
            "morec.control.ema=1.0",
            "morec.accuracy_budget=0.05",  # set point 0.095, safety below 0.09
            "morec.control.share_start=0.5",  # the tests' arithmetic starts from an even share
            *overrides,
        ],
    )
    return CoordinatorCore(build_spec(config, toy_group_stats(), world_size=1, target_loss=0.3, reference_accuracy=REF))


def report(core: CoordinatorCore, step: int) -> None:
    core.report(0, step, [0.3, 0.5, 0.5, 0.5], [8, 8, 8, 8])


def test_the_laws_registry_is_the_list_of_names():
    assert CONTROL_LAWS.names() == ["paper", "budget"]
    assert load_config(None).morec.pid.law == "budget"  # the default; "paper" reproduces the paper
    from morec_dist.plugins import validate_names

    with pytest.raises(ConfigError, match="morec.pid.law"):
        validate_names(load_config(None, ["morec.pid.law=pid"]))


def test_the_budget_law_needs_the_pretrained_accuracy():
    config = load_config(None, ["morec.pid.law=budget", "morec.sampler.update_every_steps=100"])
    with pytest.raises(CoordinatorError, match="held-out Hit@K on the control slice"):
        build_spec(config, toy_group_stats(), world_size=1, target_loss=0.3)


def test_the_sampler_may_not_be_faster_than_the_controller():
    with pytest.raises(ConfigError, match="slower than the budget controller"):
        load_config(
            None, ["morec.pid.law=budget", "morec.control.every_steps=50", "morec.sampler.update_every_steps=10"]
        )


def test_decisions_wait_for_the_measurements_and_follow_the_share():
    core = budget_core()
    lam_w = 0.2 * 1.0  # lambda x the reference weights' sum
    start = core.decision(0)
    assert start.beta == pytest.approx(beta_of(0.5, lam_w))
    for t in range(4):
        report(core, t)
    # decision(t) needs the measurement due after step 3 once t - max(s, 1) >= 3 (s = 2)
    assert core.ready(4) and not core.ready(5)
    with pytest.raises(DecisionNotReady, match="held-out measurement due after step 3"):
        core.decision(5)
    record = core.submit_measurement(3, 0.092)  # below the set point 0.095
    assert record["share"] > 0.5 and not record["safety"]
    report(core, 4)
    assert core.decision(5).beta == pytest.approx(beta_of(record["share"], lam_w))
    assert core.decision(6).beta == pytest.approx(beta_of(record["share"], lam_w))
    assert core.decision(4).beta == pytest.approx(beta_of(0.5, lam_w))  # decided before the measurement counts
    with pytest.raises(CoordinatorError, match="due after step 7"):
        core.submit_measurement(5, 0.1)
    assert core.submit_measurement(3, 0.092) == record  # the same resubmission: a no-op
    with pytest.raises(CoordinatorError, match="another value"):
        core.submit_measurement(3, 0.091)


def test_a_preference_change_keeps_the_share_and_moves_beta():
    core = budget_core()
    core.set_preferences(weights={"revenue": 1.2}, effective_step=3)
    report(core, 0)
    report(core, 1)
    assert core.decision(2).beta == pytest.approx(0.2)
    assert core.decision(3).beta == pytest.approx(0.2 * (1.2 + 0.2 + 0.2))


def test_safety_pauses_the_sampler_until_recovery():
    core = budget_core(every=4, sampler_every=8)
    for t in range(8):
        report(core, t)
        if t == 3:
            assert core.submit_measurement(3, 0.08)["safety"]  # 20% below: broken by far
    with pytest.raises(CoordinatorError, match="measurement due after step 7 first"):
        core.submit_signals(7, _signals(core))
    core.submit_measurement(7, 0.085)  # still on
    before = core.versions[-1][1]
    version = core.submit_signals(7, _signals(core))
    assert core.sampler_paused == [7]
    assert core.versions[version][1] == before  # a new version, the same distributions
    for t in range(8, 16):
        report(core, t)
        if t == 11:
            assert not core.submit_measurement(11, 0.1)["safety"]
    core.submit_measurement(15, 0.1)
    core.submit_signals(15, _signals(core))
    assert core.sampler_paused == [7]
    assert core.versions[-1][1] != before


def _signals(core: CoordinatorCore) -> dict[str, list[float]]:
    return {r.objective: [float(g) for g in range(r.num_groups)] for r in core.spec.objectives.signal_requests()}


def test_set_budget_applies_from_the_stated_step_and_refuses_the_past():
    core = budget_core(every=4, sampler_every=8)
    for t in range(4):
        report(core, t)
    core.submit_measurement(3, 0.095)
    with pytest.raises(CoordinatorError, match="earliest step that can still change is 6"):
        core.set_budget(0.02, effective_step=3)
    with pytest.raises(CoordinatorError, match="set_budget: budget"):
        core.set_budget(1.5, effective_step=10)
    change = core.set_budget(0.02, effective_step=8, source="test")
    assert (change.effective_step, change.budget) == (8, 0.02)
    for t in range(4, 12):
        report(core, t)
    assert core.submit_measurement(7, 0.097)["budget"] == 0.05  # before the stated step
    after = core.submit_measurement(11, 0.097)
    assert after["budget"] == 0.02 and after["setpoint"] == pytest.approx(0.098)


def test_state_round_trips_through_json_mid_run():
    def run(core: CoordinatorCore, steps: range) -> list[float]:
        betas = []
        for t in steps:
            betas.append(core.decision(t).beta)
            report(core, t)
            if (t + 1) % 4 == 0:
                core.submit_measurement(t, 0.1 - 0.001 * t)
            if (t + 1) % 8 == 0:
                core.submit_signals(t, _signals(core))
        return betas

    full = budget_core()
    full.set_budget(0.03, effective_step=12)
    expected = run(full, range(24))
    first = budget_core()
    first.set_budget(0.03, effective_step=12)
    head = run(first, range(10))
    resumed = budget_core()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = run(resumed, range(10, 24))
    assert head + tail == expected
    assert resumed.state_dict() == json.loads(json.dumps(full.state_dict()))
    assert len(set(expected)) > 2  # beta moved
    paper = CoordinatorCore(
        build_spec(load_config(None, ["morec.pid.law=paper"]), toy_group_stats(), world_size=1, target_loss=0.3,
                   steps_per_epoch=10)
    )  # fmt: skip
    with pytest.raises(CoordinatorError, match="law is 'budget' in the checkpoint but 'paper'"):
        paper.load_state_dict(full.state_dict())
