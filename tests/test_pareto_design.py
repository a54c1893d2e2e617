"""Issue 23's Pareto study, its pure parts: the design (equal knob counts, sources, the quick
grid), the operating point chosen on the selection slice (never test), the 3-worst-groups
mean, paired intervals over seeds, the summary of one fine-tuning length and the targets
check. No torchrun, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import pareto_design as design
from benchmarks.pareto_design import StudyMethod, check_equal_knobs, check_sources, quick_design
from benchmarks.pareto_endpoints import (
    beats,
    choose_operating_point,
    summarise_length,
    targets_check,
    worst_groups_mean,
)
from benchmarks.pareto_stats import bootstrap_hypervolume, paired_interval

# ------------------------------------------------------------------ design


def test_every_method_of_the_study_has_the_same_number_of_knob_values():
    assert check_equal_knobs(design.STUDY) == 4
    assert check_equal_knobs(quick_design()) == 2
    check_sources(design.STUDY)
    check_sources(quick_design())
    assert set(design.SEEDS).isdisjoint({0, 1, 2})  # fresh seeds: 0-2 tuned the earlier studies


def test_unequal_or_repeated_knobs_are_refused():
    a = StudyMethod("a", "static", "morec.lam", (0.1, 0.2))
    with pytest.raises(ValueError, match="different numbers of knob values"):
        check_equal_knobs([a, StudyMethod("b", "mgda", "morec.embedding_lr", (0.1, 0.2, 0.3))])
    with pytest.raises(ValueError, match="repeated knob values"):
        check_equal_knobs([StudyMethod("c", "static", "morec.lam", (0.1, 0.1))])
    with pytest.raises(ValueError, match="source"):
        check_sources([a, StudyMethod("i", None, "alpha", (0.5, 1.0), source=("a", 0.3))])


def test_the_quick_grid_keeps_the_interpolation_source():
    quick = {m.name: m for m in quick_design()}
    assert design.by_name()["interpolation"].source[1] in quick["morec_paper"].values
    assert quick["static"].values == (0.2, 2.0)  # the ends of the full grid


def test_overrides_set_the_knob_and_keep_the_fixed_ones():
    m = design.by_name()["morec_budget"]
    assert m.overrides(0.02) == ['morec.pid.law="budget"', "morec.accuracy_budget=0.02"]
    assert design.by_name()["interpolation"].overrides(0.5) == []


# ------------------------------------------------------------------ operating point


def _metrics(hit, r_hit=1.0, min_hit=0.02, pop_kl=0.3):
    return {"hit@10": hit, "r_hit@10": r_hit, "min_hit@10": min_hit, "pop_kl@10": pop_kl, "worst3_hit@10": min_hit}


PRE = _metrics(0.100)


def test_the_operating_point_is_the_best_feasible_knob_on_the_selection_slice():
    candidates = [
        {"knob": "a", "selection": _metrics(0.100, r_hit=1.05)},  # no loss, small gain
        {"knob": "b", "selection": _metrics(0.0985, r_hit=1.20)},  # -1.5%: within 2%, larger gain
        {"knob": "c", "selection": _metrics(0.095, r_hit=1.50)},  # -5%: only within 5%
    ]
    assert choose_operating_point(candidates, PRE, 0.02)["knob"] == "b"
    assert choose_operating_point(candidates, PRE, 0.05)["knob"] == "c"
    at_1 = choose_operating_point(candidates, PRE, 0.01)
    assert at_1["knob"] == "a" and at_1["feasible"]


def test_with_no_feasible_knob_the_least_loss_is_taken_and_flagged():
    candidates = [{"knob": "x", "selection": _metrics(0.090)}, {"knob": "y", "selection": _metrics(0.093)}]
    point = choose_operating_point(candidates, PRE, 0.02)
    assert point == {**point, "knob": "y", "feasible": False}
    assert point["selection_hit_change"] == pytest.approx(-0.07)


def test_the_choice_reads_only_what_it_is_given():
    """A candidate's test metrics play no part: only the selection metrics are passed, and the
    same selection metrics give the same choice whatever test would say."""
    candidates = [{"knob": "a", "selection": _metrics(0.099, pop_kl=0.2)}, {"knob": "b", "selection": _metrics(0.099)}]
    with_test = [{**c, "test": _metrics(0.2, r_hit=9.0)} for c in reversed(candidates)]
    assert choose_operating_point(candidates, PRE, 0.02)["knob"] == "a"
    assert choose_operating_point(with_test, PRE, 0.02)["knob"] == "a"


# ------------------------------------------------------------------ fairness, intervals


def test_worst_groups_mean_is_the_mean_of_the_three_lowest_group_means():
    hits = np.array([1, 0, 0, 0, 1, 1, 0, 1, 1, 1], dtype=float)
    groups = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # group means 0.5, 0, 1, 0.5, 1
    assert worst_groups_mean(hits, groups) == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert worst_groups_mean(hits, groups, n=1) == 0.0  # min-Hit
    assert worst_groups_mean(hits[:2], groups[:2]) == 0.5  # fewer groups than 3: all of them


def test_paired_interval_keeps_the_pairing():
    d = np.array([0.10, 0.12, 0.08, 0.11, 0.09])
    r = paired_interval(d, seed=3)
    half = 2.7764451051977987 * d.std(ddof=1) / np.sqrt(5)  # t_{0.975, 4}
    assert r["mean"] == pytest.approx(0.10)
    assert (r["t_low"], r["t_high"]) == pytest.approx((0.10 - half, 0.10 + half))
    assert r["t_low"] > 0 and r["boot_low"] > 0 and beats(r)
    assert paired_interval(d, seed=3) == r  # seeded
    # a large shared seed effect cancels in the differences: pairing matters
    seed_effect = np.array([0.5, -0.4, 0.3, -0.2, 0.1])
    a, b = 0.2 + seed_effect + d, 0.2 + seed_effect
    assert paired_interval(a - b)["t_low"] > 0
    one = paired_interval([0.1])
    assert np.isnan(one["t_low"]) and beats(one) is None


def test_paired_hypervolume_bootstrap_resamples_seeds_jointly():
    """Two identical settings resampled jointly stay identical in every resample: the same
    draws as one setting alone. Resampled independently they differ, and the front's volume
    grows."""
    rng = np.random.default_rng(1)
    one = (np.array([2.0, 2.0]) + 0.3 * rng.normal(size=(6, 2)))[None]
    two = np.concatenate([one, one])
    alone = bootstrap_hypervolume(one, [0, 0], samples=200, seed=5)
    assert bootstrap_hypervolume(two, [0, 0], samples=200, seed=5, paired=True) == alone
    independent = bootstrap_hypervolume(two, [0, 0], samples=200, seed=5)
    assert independent["high"] > alone["high"]


# ------------------------------------------------------------------ one length, targets


def _run(b, revenue, fairness, alignment, noise):
    m = _metrics(0.100 * (1 - b), r_hit=1 + revenue * b + noise, min_hit=fairness, pop_kl=0.3 * (1 - alignment * b))
    return {"test": m, "selection": dict(m)}  # the selection slice ranks the knobs as test would


def _records(seeds=(10, 11, 12)):
    """Controller better than static on revenue and alignment at every budget, by construction."""
    rng = np.random.default_rng(0)
    records = {}
    for s in seeds:
        noise = 0.002 * rng.normal()
        runs = {
            "morec_budget": {
                k: _run(b, 8, 0.025, 10, noise) for k, b in (("0.01", 0.01), ("0.02", 0.02), ("0.05", 0.05))
            },
            "static": {k: _run(b, 2, 0.021, 2, noise) for k, b in (("0.2", 0.01), ("0.5", 0.02), ("1", 0.05))},
        }
        records[s] = {"pretrained": {"test": _metrics(0.100), "selection": _metrics(0.100)}, "runs": runs}
    return records


KNOBS = {"morec_budget": ["0.01", "0.02", "0.05"], "static": ["0.2", "0.5", "1"]}


def test_summary_of_a_length_and_its_targets():
    length = summarise_length(_records(), KNOBS, [0.01, 0.02, 0.05], reference="static", controller="morec_budget")
    assert length["seeds"] == [10, 11, 12]
    at5 = length["budgets"]["0.05"]
    assert {p["knob"] for p in at5["operating_points"]["morec_budget"].values()} == {"0.05"}
    assert at5["gains"]["morec_budget"]["revenue"]["mean"] == pytest.approx(0.40, abs=0.01)
    paired = at5["paired"]["vs_static"]["morec_budget"]
    assert paired["seeds"] == [10, 11, 12] and beats(paired["revenue"]) and beats(paired["alignment"])
    assert at5["setpoint_run"]["hit_change"]["mean"] == pytest.approx(-0.05)
    assert at5["hypervolume"]["methods"]["static"]["points"] == 3
    rows = targets_check({"2": length}, [0.01, 0.02, 0.05], "morec_budget", "static", [])
    verdicts = {r["target"]: r["verdict"] for r in rows}
    assert verdicts["budget held at 2%"] == "met"
    assert verdicts["budget used at 5%"] == "met"  # +40% revenue, -50% Pop-KL, fairness up
    assert verdicts["worth it at 5% against static"] == "met"
    assert verdicts["make run holds its own stated budget"] == "not measured"


def test_a_seed_missing_a_run_is_not_summarised():
    records = _records()
    del records[12]["runs"]["static"]["1"]
    length = summarise_length(records, KNOBS, [0.02], reference="static", controller="morec_budget")
    assert length["seeds"] == [10, 11]
