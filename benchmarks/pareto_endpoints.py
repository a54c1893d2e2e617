"""The endpoints of issue 23's Pareto study, from per-user rankings: slice metrics, the
operating point of a method for a budget (chosen on the selection slice), paired gains over
seeds and the targets check. Pure numpy (the metrics themselves are ``eval/metrics.py``'s).

- ``slice_metrics``: the protocol's metrics (DATA.md) of any subset of the users of a split,
  from each user's held-out rank and top-K items (``dist_pareto_eval`` writes them), plus the
  per-fairness-group Hit and the mean Hit of the 3 worst groups (``worst_groups_mean``, a less
  noisy fairness measure than min-Hit; reported, never used to choose).
- ``choose_operating_point``: among a method's knob values, those whose *selection-slice*
  Hit@10 is at least (1 - budget) x the pretrained model's on the same slice are feasible;
  the operating point is the feasible one with the largest selection score (the mean gain of
  R-Hit@10, min-Hit@10 and Pop-KL@10 on the selection slice, ``selection_score``); when none
  is feasible, the one with the highest selection Hit (flagged infeasible). Test metrics
  never enter the choice.
- ``endpoint_table``: per (fine-tuning length, budget, method): each objective's test gain at
  the chosen operating point, seed by seed, and the paired difference against ``static`` at
  the same budget with its intervals (``pareto_stats.paired_interval``).
- ``targets_check``: every target of issue 23 as met / missed / not measured, with its numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

K = 10


def study_objectives() -> dict[str, tuple[str, int]]:
    """objective -> (test metric at K, +1 higher is better / -1 lower): accuracy's headline
    metric, each reference objective's as its kind declares it (``coordinator/objectives.py``,
    read through ``benchmarks.quality``), and the study's own 3-worst-groups Hit beside
    min-Hit (computed here from the rankings)."""
    from benchmarks.quality import LOWER_IS_BETTER, METRICS, OBJECTIVE_METRIC

    out = {"accuracy": (METRICS[0], 1)}
    for name, metric in OBJECTIVE_METRIC.items():
        out[name] = (metric, -1 if metric in LOWER_IS_BETTER else 1)
        if name == "fairness":
            out["fairness_worst3"] = (f"worst3_hit@{K}", 1)
    return out


OBJECTIVES = study_objectives()
SELECTION_SCORE = ("revenue", "fairness", "alignment")  # what the operating point maximises
WORTH_IT = ("revenue", "fairness", "alignment")  # issue 23's "worth it" objectives
WORST_GROUPS = 3


def group_means(per_user: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    """The mean of ``per_user`` in each group present (users grouped by their held-out item)."""
    return {int(g): float(per_user[groups == g].mean()) for g in np.unique(groups)}


def worst_groups_mean(per_user: np.ndarray, groups: np.ndarray, n: int = WORST_GROUPS) -> float:
    """The mean of the ``n`` smallest group means (all groups when fewer): min-Hit is n = 1."""
    means = sorted(group_means(np.asarray(per_user, dtype=np.float64), np.asarray(groups)).values())
    if not means:
        return float("nan")
    return float(np.mean(means[:n]))


def slice_metrics(
    ranks: np.ndarray,
    top_items: np.ndarray,
    targets: np.ndarray,
    item_meta: Mapping[str, np.ndarray],
    mask: np.ndarray | None = None,
    k: int = K,
) -> dict[str, Any]:
    """The protocol's metrics at ``k`` of the users selected by ``mask`` (all when None).

    ``ranks`` [U] 1-based held-out ranks, ``top_items`` [U, >= k] each user's list in ranking
    order (0 past its candidates), ``targets`` [U] held-out items; ``item_meta`` holds
    ``price``, ``fair_group``, ``align_group`` (indexed by item id) and ``q_star``."""
    from morec_dist.eval.metrics import compute_metrics, hit_at_k

    keep = np.ones(len(ranks), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    ranks, top, targets = np.asarray(ranks)[keep], np.asarray(top_items)[keep, :k], np.asarray(targets)[keep]
    bands = np.asarray(item_meta["align_group"])[top[top != 0]]
    num_bands = len(item_meta["q_star"])
    counts = np.bincount(bands, minlength=num_bands + 1)[1:]
    groups = np.asarray(item_meta["fair_group"])[targets]
    out: dict[str, Any] = compute_metrics(
        ranks, np.asarray(item_meta["price"])[targets], groups, {k: counts}, np.asarray(item_meta["q_star"]), [k]
    )
    hit = hit_at_k(ranks, k)
    out[f"worst3_hit@{k}"] = worst_groups_mean(hit, groups)
    out[f"group_hit@{k}"] = {str(g): v for g, v in group_means(hit, groups).items()}
    return out


def gain(objective: str, before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """The relative change of the objective's metric, signed so that + is better."""
    metric, sign = OBJECTIVES[objective]
    b = float(before[metric])
    return sign * (float(after[metric]) - b) / abs(b) if b else float("nan")


def selection_score(pretrained: Mapping[str, float], run: Mapping[str, float]) -> float:
    """The mean gain over ``SELECTION_SCORE`` on the selection slice (NaN gains skipped)."""
    gains = [g for g in (gain(o, pretrained, run) for o in SELECTION_SCORE) if g == g]
    return float(np.mean(gains)) if gains else float("-inf")


def choose_operating_point(
    candidates: Sequence[Mapping[str, Any]], pretrained: Mapping[str, float], budget: float
) -> dict[str, Any]:
    """The operating point for ``budget`` among ``candidates`` ({"knob", "selection": metrics}).

    Feasible: selection Hit@K >= (1 - budget) x the pretrained model's selection Hit@K. The
    feasible candidate with the largest ``selection_score`` wins (ties: the earlier knob); with
    none feasible, the highest selection Hit (``feasible`` False). Returns {"knob", "feasible",
    "score", "selection_hit_change"}."""
    if not candidates:
        raise ValueError("choose_operating_point: no candidates")
    metric = OBJECTIVES["accuracy"][0]
    floor = (1.0 - budget) * float(pretrained[metric])
    scored = [
        (c["knob"], float(c["selection"][metric]), selection_score(pretrained, c["selection"])) for c in candidates
    ]
    feasible = [s for s in scored if s[1] >= floor]
    if feasible:
        knob, hit, score = max(feasible, key=lambda s: s[2])  # max keeps the first of equals
    else:
        knob, hit, score = max(scored, key=lambda s: s[1])
    base = float(pretrained[metric])
    return {
        "knob": knob,
        "feasible": bool(feasible),
        "score": score,
        "selection_hit_change": (hit - base) / base if base else float("nan"),
    }


# ------------------------------------------------------------------ over seeds


def seed_gains(test: Mapping[str, float], pretrained_test: Mapping[str, float]) -> dict[str, float]:
    """Every objective's test gain of one run against its seed's pretrained model."""
    return {o: gain(o, pretrained_test, test) for o in OBJECTIVES}


def paired_rows(
    gains: Mapping[str, Mapping[int, Mapping[str, float]]], reference: str, objectives: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per method (not the reference) and objective: the per-seed differences method minus
    ``reference`` on the seeds both have, and their ``paired_interval``.

    ``gains[method][seed][objective]``: the test gain at the method's operating point."""
    from benchmarks.pareto_stats import paired_interval

    ref = gains.get(reference, {})
    out: dict[str, dict[str, Any]] = {}
    for method, per_seed in gains.items():
        if method == reference:
            continue
        seeds = sorted(set(per_seed) & set(ref))
        row: dict[str, Any] = {"seeds": seeds}
        for o in objectives:
            diffs = [per_seed[s][o] - ref[s][o] for s in seeds]
            finite = [d for d in diffs if np.isfinite(d)]
            row[o] = {"differences": diffs, **(paired_interval(finite) if finite else {"mean": float("nan")})}
        out[method] = row
    return out


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """A seed mean with the t-interval of the values themselves (seed to seed spread)."""
    from benchmarks.pareto_stats import paired_interval

    finite = [v for v in values if np.isfinite(v)]
    return {"values": list(values), **(paired_interval(finite) if finite else {"mean": float("nan")})}


def beats(row: Mapping[str, Any]) -> bool | None:
    """A paired difference's verdict: True when its t-interval lies above 0, False when its
    mean is <= 0 or the interval includes 0, None without an interval (fewer than 2 seeds)."""
    low = row.get("t_low", float("nan"))
    if not np.isfinite(low):
        return None
    return bool(low > 0)


# ------------------------------------------------------------------ one fine-tuning length

# records[seed] = {"pretrained": {"test": m, "selection": m}, "runs": {method: {knob: {"test": m, "selection": m}}}}
Records = Mapping[int, Mapping[str, Any]]


def complete_seeds(records: Records, knobs: Mapping[str, Sequence[str]]) -> list[int]:
    """The seeds on which every method has every knob value: the only ones summarised."""
    return sorted(
        s for s, r in records.items() if all(k in r.get("runs", {}).get(m, {}) for m, ks in knobs.items() for k in ks)
    )


def operating_points(records: Records, seeds: Sequence[int], knobs: Mapping[str, Sequence[str]], budget: float):
    """{method: {seed: choose_operating_point(...)}} on the selection slice."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for method, ks in knobs.items():
        out[method] = {}
        for s in seeds:
            runs = records[s]["runs"][method]
            candidates = [{"knob": k, "selection": runs[k]["selection"]} for k in ks]
            out[method][s] = choose_operating_point(candidates, records[s]["pretrained"]["selection"], budget)
    return out


def hypervolumes(records: Records, seeds: Sequence[int], knobs: Mapping[str, Sequence[str]], budget: float):
    """Secondary figure: per method the hypervolume of its knob values' seed-mean test points
    (Hit, R-Hit, min-Hit, -Pop-KL) over the reference (the seed-mean pretrained model with
    Hit at (1 - budget) x), with a paired bootstrap interval over seeds; equal points per method."""
    from benchmarks.pareto_stats import bootstrap_hypervolume, objective_vector

    reference = np.mean([objective_vector(records[s]["pretrained"]["test"]) for s in seeds], axis=0)
    reference[0] *= 1.0 - budget
    out = {}
    for method, ks in knobs.items():
        runs = np.array([[objective_vector(records[s]["runs"][method][k]["test"]) for s in seeds] for k in ks])
        b = bootstrap_hypervolume(runs, reference.tolist(), samples=1000, seed=0, paired=True)
        out[method] = {"hypervolume": b["hypervolume"], "interval": [b["low"], b["high"]], "points": len(ks)}
    return {"reference": reference.tolist(), "methods": out}


def summarise_length(
    records: Records,
    knobs: Mapping[str, Sequence[str]],
    budgets: Sequence[float],
    *,
    reference: str,
    controller: str,
    controls: Sequence[str] = (),
) -> dict[str, Any]:
    """Every endpoint of one fine-tuning length over its complete seeds (see the module doc)."""
    seeds = complete_seeds(records, knobs)
    out: dict[str, Any] = {"seeds": seeds, "knobs": {m: list(ks) for m, ks in knobs.items()}}
    if not seeds:
        return out
    out["knob_gains"] = {
        m: {
            k: {
                o: mean_interval(
                    [seed_gains(records[s]["runs"][m][k]["test"], records[s]["pretrained"]["test"])[o] for s in seeds]
                )
                for o in OBJECTIVES
            }
            for k in ks
        }
        for m, ks in knobs.items()
    }
    by_budget = {}
    for budget in budgets:
        points = operating_points(records, seeds, knobs, budget)
        gains = {
            m: {
                s: seed_gains(records[s]["runs"][m][p["knob"]]["test"], records[s]["pretrained"]["test"])
                for s, p in ps.items()
            }
            for m, ps in points.items()
        }
        by_budget[f"{budget:g}"] = {
            "operating_points": {m: {str(s): p for s, p in ps.items()} for m, ps in points.items()},
            "gains": {m: {o: mean_interval([g[s][o] for s in seeds]) for o in OBJECTIVES} for m, g in gains.items()},
            "paired": {
                f"vs_{r}": paired_rows(gains, r, list(OBJECTIVES)) for r in (reference, *controls) if r in gains
            },
            "setpoint_run": setpoint_run(records, seeds, controller, budget),
            "hypervolume": hypervolumes(records, seeds, knobs, budget),
        }
    out["budgets"] = by_budget
    return out


def setpoint_run(records: Records, seeds: Sequence[int], controller: str, budget: float) -> dict[str, Any] | None:
    """The controller's run whose set point is ``budget`` (its promise): test Hit change per seed."""
    key = f"{budget:g}"
    if not all(key in records[s]["runs"].get(controller, {}) for s in seeds):
        return None
    changes = [
        gain("accuracy", records[s]["pretrained"]["test"], records[s]["runs"][controller][key]["test"]) for s in seeds
    ]
    return {"knob": key, "hit_change": mean_interval(changes), "min": float(min(changes))}


# ------------------------------------------------------------------ the targets

USED_REVENUE, USED_ALIGNMENT, USED_BUDGET = 0.20, 0.35, 0.05


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "missed"


def budget_held(length: Mapping[str, Any], budget: float) -> dict[str, Any]:
    """Seed-mean test Hit@10 change of the controller's set-point-``budget`` run >= -budget,
    and no seed below -2 x budget."""
    run = (length.get("budgets", {}).get(f"{budget:g}") or {}).get("setpoint_run")
    if not run:
        return {"verdict": _verdict(None)}
    mean, worst = run["hit_change"]["mean"], run["min"]
    eps = 1e-12  # a change exactly at the bound holds it (float rounding of the relative change)
    return {"verdict": _verdict(mean >= -budget - eps and worst >= -2 * budget - eps), "mean": mean, "min": worst}


def budget_used(length: Mapping[str, Any], controller: str) -> dict[str, Any]:
    """At budget 5% (the controller's operating point): R-Hit +20%, Pop-KL -35% (seed means),
    test min-Hit and the 3-worst mean above the pretrained model's."""
    b = length.get("budgets", {}).get(f"{USED_BUDGET:g}")
    if not b or controller not in b["gains"]:
        return {"verdict": _verdict(None)}
    g = {o: b["gains"][controller][o]["mean"] for o in OBJECTIVES}
    ok = (
        g["revenue"] >= USED_REVENUE
        and g["alignment"] >= USED_ALIGNMENT
        and g["fairness"] > 0
        and g["fairness_worst3"] > 0
    )
    return {"verdict": _verdict(ok), **{f"{o}_gain": v for o, v in g.items()}}


def worth_it(length: Mapping[str, Any], budget: float, controller: str, against: str) -> dict[str, Any]:
    """The controller beats ``against`` at ``budget`` on at least two of revenue, fairness and
    alignment: the paired t-interval over seeds of its gain minus theirs lies above 0."""
    b = length.get("budgets", {}).get(f"{budget:g}")
    row = ((b or {}).get("paired", {}).get(f"vs_{against}") or {}).get(controller)
    if not row:
        return {"verdict": _verdict(None)}
    wins = {o: beats(row[o]) for o in WORTH_IT}
    if any(w is None for w in wins.values()):
        return {"verdict": _verdict(None), "wins": wins}
    return {"verdict": _verdict(sum(bool(w) for w in wins.values()) >= 2), "wins": wins}


def targets_check(
    lengths: Mapping[str, Mapping[str, Any]],
    budgets: Sequence[float],
    controller: str,
    reference: str,
    controls: Sequence[str],
) -> list[dict[str, Any]]:
    """Every target of issue 23 (ML-1M, test, K = 10) with its verdict, per fine-tuning length."""
    rows: list[dict[str, Any]] = []
    for epochs, length in lengths.items():
        for budget in budgets:
            rows.append(
                {
                    "target": f"budget held at {budget:.0%}"
                    + (" (reported: close to the noise)" if budget < 0.02 else ""),
                    "epochs": epochs,
                    **budget_held(length, budget),
                }
            )
        rows.append({"target": "budget used at 5%", "epochs": epochs, **budget_used(length, controller)})
        for budget in budgets:
            for against in (reference, *controls):
                rows.append(
                    {
                        "target": f"worth it at {budget:.0%} against {against}",
                        "epochs": epochs,
                        **worth_it(length, budget, controller, against),
                    }
                )
    rows.append(
        {"target": "make run holds its own stated budget", "verdict": _verdict(None), "note": "not part of this study"}
    )
    return rows
