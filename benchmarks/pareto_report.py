"""Markdown of issue 23's Pareto study (``benchmarks/results/pareto23.json``): the section of
``benchmarks/REPORT.md`` and the generated block of ``docs/results.md``
(``python -m benchmarks.report --results-md docs/results.md``).

Everything is read from the result file: the design, the operating points chosen on the
selection slice, each objective's test gain at them with its 95% t-interval over seeds, the
paired differences against static and the controls, the budget the controller held, the
noise level of a 1% budget, the hypervolumes (secondary), the targets check, run times
and what is left. A partial study says so at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GAINS = (
    ("accuracy", "Hit"),
    ("revenue", "R-Hit"),
    ("fairness", "min-Hit"),
    ("fairness_worst3", "3-worst Hit"),
    ("alignment", "-Pop-KL"),
)


def interval(row: dict[str, Any]) -> str:
    """``+12.3% [+8.0, +16.1]``: a mean with its t-interval, in percent."""
    from benchmarks.report import pct

    lo, hi = row.get("t_low", float("nan")), row.get("t_high", float("nan"))
    if lo != lo:
        return pct(row.get("mean", float("nan")))
    return f"{pct(row['mean'])} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def remaining(p: dict[str, Any]) -> tuple[float, list[str]]:
    """Seconds of runs left and the kinds not yet timed, from the results' time estimate (computed
    here: a study written by an older ``pareto.py`` recorded NaN when one kind was untimed)."""
    from benchmarks.pareto import seconds_left

    est = p.get("time_estimate", {})
    return seconds_left(est.get("planned", {}), est.get("done", {}), est.get("mean_seconds", {}))


def not_counting(unmeasured: list[str]) -> str:
    if not unmeasured:
        return ""
    return f" (not counting the {', '.join(unmeasured)} runs left: this record has no time for them)"


def header(p: dict[str, Any]) -> list[str]:
    from benchmarks.report import fmt

    cfg = p["config"]
    done = {e: seeds for e, seeds in p["progress"].items()}
    left, unmeasured = remaining(p)
    fresh = " (fresh: none tuned anything)" if not set(cfg["seeds"]) & {0, 1, 2} else ""
    lines = []
    if p["mode"] == "quick":
        lines += [
            f"**Quick mode** (`python -m benchmarks.pareto --quick`): a pipeline check on {Path(cfg['data']).name}; "
            "its numbers say nothing about MovieLens-1M.",
            "",
        ]
    if p.get("partial"):
        lines += [
            f"**Partial study**: complete seeds per fine-tuning length {done} of {cfg['seeds']}; "
            + (
                f"about {fmt(left / 3600, 2)} h of runs left at the measured run times{not_counting(unmeasured)}. "
                if left
                else ""
            )
            + "`python -m benchmarks.pareto` resumes it (every finished run is reused).",
            "",
        ]
    lines += [
        f"Config `{Path(cfg['config_file']).name}`, {cfg['nproc']} ranks per training job (the CLI), seeds "
        f"{cfg['seeds']}{fresh}, fine-tuning lengths {cfg['epochs']} epochs (a longer run "
        "continues the shorter one's epoch-end checkpoint), budgets "
        f"{', '.join(f'{b:.0%}' for b in cfg['budgets'])} (declared in advance). Operating points are chosen on "
        f"{p.get('selection_slice', 'the selection slice')}; every figure below is on the test split, K = 10, "
        "relative to the same seed's pretrained model. Note: " + (p.get("note") or "none") + ".",
        "",
    ]
    return lines


def design_table(p: dict[str, Any]) -> list[str]:
    from benchmarks.report import table

    rows = [
        [m["name"], m["cli_method"] or "(evaluation only)", m["knob"], ", ".join(f"{v:g}" for v in m["values"])]
        + [" ".join(m["fixed"]) + (f" mixes {m['source'][0]} at {m['source'][1]:g}" if m["source"] else "")]
        for m in p["config"]["methods"]
    ]
    skipped = p["config"].get("skipped_methods") or {}
    lines = ["Methods and knob values (`benchmarks/pareto_design.py`):", ""]
    lines.append(table(["method", "--method", "knob", "values", "fixed"], rows))
    if skipped:
        lines += ["", "Not run in this tree: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."]
    return [*lines, ""]


def budget_tables(epochs: str, length: dict[str, Any], order: list[str]) -> list[str]:
    from benchmarks.report import table

    lines: list[str] = []
    for budget, b in length["budgets"].items():
        rows = []
        vs = b["paired"].get("vs_static", {})
        for method in [m for m in order if m in b["gains"]]:
            gains = b["gains"][method]
            points = b["operating_points"][method]
            knobs = ", ".join(p["knob"] + ("" if p["feasible"] else "*") for p in points.values())
            paired = vs.get(method)
            rows.append(
                [method, knobs, *[interval(gains[o]) for o, _ in GAINS]]
                + [interval(paired[o]) if paired else "(reference)" for o in ("revenue", "fairness", "alignment")]
            )
        lines += [
            f"**{epochs} epochs, budget {float(budget):.0%}**: each method's operating point per seed (knob value; "
            "* = none met the budget on the selection slice, the least loss taken), test gains (seed mean [95% "
            "t-interval]) and the paired difference to static at the same budget (points of %):",
            "",
            table(
                [
                    "method",
                    "knob per seed",
                    *[n for _, n in GAINS],
                    "R-Hit - static",
                    "min-Hit - static",
                    "-Pop-KL - static",
                ],
                rows,
            ),
            "",
        ]
    return lines


def held_table(length: dict[str, Any]) -> list[str]:
    from benchmarks.report import pct, table

    rows = []
    for budget, b in length["budgets"].items():
        run = b.get("setpoint_run")
        if run:
            rows.append([f"{float(budget):.0%}", interval(run["hit_change"]), pct(run["min"]), pct(-2 * float(budget))])
    if not rows:
        return []
    return [
        "The controller's own promise (its run at set point = the budget): test Hit@10 change:",
        "",
        table(["set point", "seed mean [95% t]", "worst seed", "bound for a seed"], rows),
        "",
    ]


def hypervolume_table(length: dict[str, Any]) -> list[str]:
    from benchmarks.report import fmt, table

    budgets = list(length["budgets"])
    methods = list(length["budgets"][budgets[0]]["hypervolume"]["methods"])
    rows = []
    for m in methods:
        cells = []
        for b in budgets:
            h = length["budgets"][b]["hypervolume"]["methods"][m]
            cells.append(f"{fmt(h['hypervolume'], 3)} [{fmt(h['interval'][0], 3)}, {fmt(h['interval'][1], 3)}]")
        rows.append([m, *cells])
    return [
        "Secondary: hypervolume of each method's knob values (equal points per method; seed-mean test points "
        "over Hit, R-Hit, min-Hit, -Pop-KL), reference = the pretrained model with Hit at -budget, paired "
        "bootstrap interval over seeds:",
        "",
        table(["method", *[f"budget {float(b):.0%}" for b in budgets]], rows),
        "",
    ]


def noise_lines(p: dict[str, Any], epochs: str) -> list[str]:
    from benchmarks.report import pct

    rows = p.get("noise", {}).get(epochs) or []
    if not rows:
        return []
    paired = sum(r["paired_se_relative"] for r in rows) / len(rows)
    single = sum(r["single_se_relative"] for r in rows) / len(rows)
    return [
        f"How close 1% is to the noise ({epochs} epochs): on {int(rows[0]['users']):,} test users the standard error "
        f"of a Hit@10 change, paired per user against the pretrained model, is {pct(paired, False)} of the "
        f"pretrained Hit (one seed; a single Hit estimate's is {pct(single, False)}); the seed mean of 5 divides "
        "the first by about 2.2 at best.",
        "",
    ]


def targets_table(p: dict[str, Any]) -> list[str]:
    """One row per target, one column per fine-tuning length: the verdict and its numbers."""
    from benchmarks.report import pct, table

    lengths = [str(e) for e in p["config"]["epochs"]]
    cells: dict[str, dict[str, str]] = {}
    for t in p["targets"]:
        numbers = ", ".join(
            f"{k.replace('_gain', '')} {pct(v)}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in t.items()
            if k not in ("target", "epochs", "verdict")
        )
        cell = f"**{t['verdict']}**" + (f" ({numbers})" if numbers else "")
        row = cells.setdefault(t["target"], {})
        for e in [str(t["epochs"])] if "epochs" in t else lengths:
            row[e] = cell
    rows = [[name, *[row.get(e, "") for e in lengths]] for name, row in cells.items()]
    return [
        'Targets of issue 23 (ML-1M, test, K = 10; the controller\'s own run at each set point for "held", its '
        'operating points for "used" and "worth it"; "beats" = the paired 95% t-interval above 0):',
        "",
        table(["target", *[f"{e} epochs" for e in lengths]], rows),
        "",
    ]


def run_time(p: dict[str, Any]) -> list[str]:
    from benchmarks.report import fmt

    walls = p.get("walls", {})
    total = sum(sum(v) for v in walls.values())
    mean = p.get("time_estimate", {}).get("mean_seconds", {})
    parts = ", ".join(f"{k} {len(v)} x {fmt(mean.get(k, float('nan')), 3)} s" for k, v in walls.items() if v)
    left, unmeasured = remaining(p)
    return [
        f"Run time so far: {fmt(total / 3600, 3)} h of runs ({parts}); left: {fmt(left / 3600, 3)} h at those means"
        f"{not_counting(unmeasured)}. "
        f"Machine: {p['machine']['cores']} cores, load average {p['machine']['load_average']} at the start and "
        f"{p['machine'].get('load_average_end')} at the last write (shared with other jobs).",
        "",
    ]


def extension_lines(p: dict[str, Any]) -> list[str]:
    check = p.get("extension_check")
    if not check:
        return []
    verdict = "identical" if check["equal"] else f"different (max {check['max_abs_difference']:.3g})"
    return [
        f"Continuation check: {check['method']} on seed {check['seed']}, {check['epochs']}: test metrics {verdict}.",
        "",
    ]


TITLE = "## Pareto study of issue 23: methods at matched accuracy"


def render(p: dict[str, Any], results: Path, out: Path, title: str = TITLE) -> str:
    from benchmarks.report import image

    lines = [title, "", *header(p), *design_table(p)]
    for epochs, length in p["lengths"].items():
        if not length.get("seeds"):
            lines += [f"*{epochs} epochs: no complete seed yet.*", ""]
            continue
        lines += [f"### {epochs} fine-tuning epochs (seeds {length['seeds']})", ""]
        order = [m["name"] for m in p["config"]["methods"]]
        lines += budget_tables(epochs, length, order) + held_table(length) + noise_lines(p, epochs)
        lines += hypervolume_table(length)
        for name in p.get("figures", []):
            if f"_e{epochs}_" in name:
                lines += [image(results, out, name, name), ""]
    lines += targets_table(p) + extension_lines(p) + run_time(p)
    return "\n".join(lines)
