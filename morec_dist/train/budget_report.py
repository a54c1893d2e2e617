"""What ``morec run`` says about the accuracy budget: a table and the controller's trace.

For every fine-tuned method whose ``metrics.json`` carries a ``budget`` record
(``train/budget_control.py``): the budget, Hit@K of the selection slice of validation users
(which the controller never sees) and of the test split against the pretrained model, and
whether each stayed within the budget. For the budget law, a PNG of the controller's trace
per step: held-out Hit of the control slice (measured and smoothed) against the set point,
and beta with the accuracy share. matplotlib is a dev dependency: without it the PNG is
skipped with a note.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def relative_change(before: float, after: float) -> float:
    return (after - before) / abs(before) if before else float("nan")


def percent(value: float, digits: int = 2) -> str:
    """A relative change as a signed percentage; "n/a" where it is undefined (a metric that
    is 0 before, e.g. min-Hit@10 of a category no user holds out, printed +nan% before)."""
    return f"{100 * value:+.{digits}f}%" if math.isfinite(value) else "n/a"


def budget_rows(rows: dict[str, dict[str, Any]], k: int, base: str = "pretrain") -> list[dict[str, Any]]:
    """One row per method with a budget record: its numbers and whether the budget held."""
    out = []
    hit = f"hit@{k}"
    for name, metrics in rows.items():
        record = metrics.get("budget")
        if name == base or not record:
            continue
        budget = float(record["accuracy_budget"])
        test_change = (
            relative_change(rows[base][hit], metrics[hit]) if hit in metrics and hit in rows[base] else math.nan
        )
        out.append(
            {
                "method": name,
                "law": record["law"],
                "budget": budget,
                "k": record["k"],
                "selection_before": record["selection_before"],
                "selection_after": record["selection_after"],
                "selection_change": record["selection_change"],
                "test_change": test_change,
                "held_selection": record["selection_change"] >= -budget,
                "held_test": test_change >= -budget,
            }
        )
    return out


def budget_table(rows: list[dict[str, Any]]) -> str:
    """The budget table (markdown); empty when no method has a budget record."""
    if not rows:
        return ""
    lines = [
        "| method | law | budget | K | selection-slice Hit: pretrained -> fine-tuned | test Hit change | "
        "held (selection) | held (test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['law']} | {100 * r['budget']:.1f}% | {r['k']} | {r['selection_before']:.4f} -> "
            f"{r['selection_after']:.4f} ({percent(r['selection_change'])}) | {percent(r['test_change'])} | "
            f"{'yes' if r['held_selection'] else 'NO'} | {'yes' if r['held_test'] else 'NO'} |"
        )
    return "\n".join(lines)


def plot_control_trace(metrics: dict[str, Any], path: Path, title: str = "") -> Path | None:
    """The budget law's trace of one fine-tuning as a PNG; None when there is nothing to
    draw (the paper's law) or matplotlib is missing."""
    trace = metrics.get("coordinator", {}).get("trace", {})
    control = trace.get("control") or []
    if not control:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [r["step"] for r in control]
    top.plot(steps, [r["measured"] for r in control], ".", ms=3, alpha=0.6, label="held-out Hit (control slice)")
    top.plot(steps, [r["smoothed"] for r in control], "-", label="smoothed")
    top.step(steps, [r["setpoint"] for r in control], "--", where="post", label="set point")
    reference = metrics.get("budget", {}).get("control_reference")
    if reference:
        top.axhline(reference, color="grey", lw=0.8, label="pretrained")
    safety = [r["step"] for r in control if r["safety"]]
    if safety:
        top.plot(safety, [r["smoothed"] for r in control if r["safety"]], "rx", label="safety rule on")
    top.set_ylabel("Hit@K")
    top.legend(fontsize=7)
    bottom.plot(trace["step"], trace["beta"], "-", lw=1, label="beta")
    ax2 = bottom.twinx()
    ax2.step(steps, [r["share"] for r in control], "g-", where="post", lw=1, label="accuracy share")
    ax2.set_ylabel("accuracy share", color="g")
    bottom.set_ylabel("beta")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "Budget law: held-out accuracy and beta per step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
