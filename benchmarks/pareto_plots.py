"""Figures of issue 23's Pareto study (``benchmarks/pareto.py``), per fine-tuning length:

- ``<stem>_e<E>_knobs.png``: every method's knob values as seed-mean test points, each
  objective's gain against the Hit@10 change, the budgets as vertical lines;
- ``<stem>_e<E>_paired.png``: at each budget, every method's paired gain difference against
  static at the operating points chosen on the selection slice, with the 95% t-interval over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.common import pyplot, save_figure

PANELS = (("revenue", "R-Hit@10 gain"), ("fairness", "min-Hit@10 gain"), ("alignment", "Pop-KL@10 reduction"))
COLORS = {
    "morec_budget": "tab:red",
    "morec_paper": "tab:pink",
    "static": "tab:blue",
    "mgda": "tab:green",
    "pareto_mtl": "tab:purple",
    "epo": "tab:orange",
    "continuation": "tab:gray",
    "interpolation": "tab:brown",
}


def plot_knobs(length: Mapping[str, Any], budgets: list[float], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (objective, label) in zip(axes, PANELS, strict=True):
        for method, knobs in length["knob_gains"].items():
            xs = [100 * g["accuracy"]["mean"] for g in knobs.values()]
            ys = [100 * g[objective]["mean"] for g in knobs.values()]
            ax.plot(xs, ys, "o-", c=COLORS.get(method, "k"), ms=5, lw=0.8, label=method)
        for b in budgets:
            ax.axvline(-100 * b, c="k", ls=":", lw=0.7)
        ax.axhline(0, c="k", lw=0.5)
        ax.set_xlabel("Hit@10 change, % (test, seed means)")
        ax.set_ylabel(f"{label}, %")
        ax.set_title(f"{label} against accuracy, every knob value")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_paired(length: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    budgets = list(length["budgets"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for ax, (objective, label) in zip(axes, PANELS, strict=True):
        ticks: list[str] = []
        for j, b in enumerate(budgets):
            rows = length["budgets"][b]["paired"].get("vs_static", {})
            for i, (method, row) in enumerate(rows.items()):
                r = row[objective]
                y = j * (len(rows) + 1) + i
                lo, hi = r.get("t_low", float("nan")), r.get("t_high", float("nan"))
                ax.errorbar(
                    100 * r["mean"],
                    y,
                    xerr=[[100 * (r["mean"] - lo)], [100 * (hi - r["mean"])]] if lo == lo else None,
                    fmt="o",
                    c=COLORS.get(method, "k"),
                )
                if len(ticks) < y + 1:
                    ticks += [""] * (y + 1 - len(ticks))
                ticks[y] = f"{method} @{float(b):.0%}"
        ax.axvline(0, c="k", lw=0.5)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel(f"{label} minus static's, points of %")
        ax.set_title(f"{label}: paired over seeds, 95% t-interval")
    return save_figure(fig, path)


def plot_study(lengths: Mapping[str, Mapping[str, Any]], stem: Path) -> list[Path]:
    """Both figures of every length that has complete seeds."""
    out = []
    for epochs, length in lengths.items():
        if not length.get("seeds"):
            continue
        budgets = [float(b) for b in length["budgets"]]
        out.append(plot_knobs(length, budgets, stem.with_name(f"{stem.name}_e{epochs}_knobs.png")))
        out.append(plot_paired(length, stem.with_name(f"{stem.name}_e{epochs}_paired.png")))
    return out
