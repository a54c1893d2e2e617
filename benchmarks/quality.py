"""Quality on MovieLens-1M: MoRec's trade-offs against static weighting and MGDA.

    python -m benchmarks.quality --quick --out FILE.json   # a smoke run: few steps, one point each
    python -m benchmarks.quality --out FILE.json           # the full comparison

1. pretrain once (``morec train``; its final training loss is the PID target l_hat);
2. MoRec (``morec finetune --method morec``) at several (w, l_hat) points: preference
   vectors over (revenue, fairness, alignment) times target losses l_hat * factor;
3. static weighting on uniform data (``--method static_uniform``) at the matching weights (accuracy 1,
   objective k lambda * w_k), one run per preference vector; MGDA on uniform data (``mgda_uniform``) once;
4. a table of the seven test metrics with relative changes against the pretrained model,
   the Pareto fronts (accuracy against each other objective) as PNG, and the PID trace
   (beta and the global accuracy loss against l_hat) of every MoRec point.

Every job is the CLI a user runs (each starts its own torchrun ranks; MoRec its Ray head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Recorder, bench_parser, default_out, morec_cli, note
from morec_dist.config import Config
from morec_dist.coordinator.objectives import OBJECTIVE_KINDS, kind_metrics
from morec_dist.eval.metrics import TEST_METRICS, metric_key

DEFAULT_CONFIG = REPO / "configs" / "quickstart.toml"
DEFAULT_DATA = REPO / ".data" / "movielens-1m"
K = 10
# the study's objectives: the reference config's (revenue, fairness, alignment), each named
# after its kind; their metrics are the ones each kind's registry entry names
_REFERENCE = Config().morec.objectives
GROUP_COLUMN = {o.name: o.group_column for o in _REFERENCE}
METRICS = tuple(metric_key(m, K) for m in kind_metrics([o.kind for o in _REFERENCE]))
LOWER_IS_BETTER = {m for m in METRICS if TEST_METRICS.get(m.split("@")[0]).lower_is_better}
OBJECTIVE_METRIC = {o.name: metric_key(OBJECTIVE_KINDS.get(o.kind).test_metrics[0], K) for o in _REFERENCE}

# preference vectors over (revenue, fairness, alignment); "reference" is the paper's example
PREFERENCES = {
    "reference": {"revenue": 0.6, "fairness": 0.2, "alignment": 0.2},
    "fairness": {"revenue": 0.2, "fairness": 0.6, "alignment": 0.2},
    "alignment": {"revenue": 0.2, "fairness": 0.2, "alignment": 0.6},
}
# l_hat = factor * pretrained training loss; at 1.0 the fine-tuning loss stays below l_hat
# (beta rests near beta_min), 0.9 makes the controller work
TARGET_FACTORS = (0.9, 1.0)


@dataclass
class Plan:
    pretrain: list[str]
    finetune: list[str]  # overrides every fine-tune gets (epochs / steps)
    preferences: dict[str, dict[str, float]]
    target_factors: tuple[float, ...]
    static: bool = True
    mgda: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


QUICK_DATA: dict[str, Any] = {"users": 2000, "items": 800, "rows": 80_000}


def quick_dataset(seed: int) -> Path:
    """A small synthetic dataset of the same schema: quick modes check the pipeline, not ML-1M's figures."""
    from morec_dist.data.dataset import DatasetError, PreparedDataset
    from morec_dist.data.prepare.synthetic import generate

    path = REPO / ".data" / "bench" / f"synthetic-quick-seed{seed}"
    try:
        PreparedDataset.open(path, verify_checksums=False, verify_values=False)
    except DatasetError:
        generate(path, seed=seed, overwrite=True, **QUICK_DATA)
    return path


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(
            pretrain=["train.epochs=1"],
            finetune=[
                "morec.pid.law=paper",  # the settings are the paper's PID targets (l_hat factors)
                "morec.epochs=1",
                "train.max_steps=20",
                "morec.sampler.update_every_steps=10",
                "train.log_every=0",
            ],
            preferences={"reference": PREFERENCES["reference"]},
            target_factors=(1.0,),
        )
    return Plan(
        pretrain=[],
        finetune=["morec.pid.law=paper", "train.log_every=0"],
        preferences=PREFERENCES,
        target_factors=TARGET_FACTORS,
    )


def objectives_override(weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> str:
    """``morec.objectives=[...]``: the reference objectives at ``weights``, each with its
    ``options`` (e.g. ``{"fairness": {"worst": 5}}``) as a TOML inline table."""

    def inline(opts: dict[str, Any]) -> str:
        return ", ".join(f"{k} = {json.dumps(v)}" for k, v in opts.items())

    tables = ", ".join(
        f'{{name = "{name}", kind = "{name}", group_column = "{GROUP_COLUMN[name]}", weight = {w}'
        + (f", options = {{{inline(options[name])}}}" if options and options.get(name) else "")
        + "}"
        for name, w in weights.items()
    )
    return f"morec.objectives=[{tables}]"


def pretrain(config: Path, base: list[str], work: Path, extra: list[str]) -> dict[str, Any]:
    out = work / "pretrain"
    morec_cli(
        ["train", "--config", str(config), *base, *extra, f'run.out_dir="{out}"'], log=work / "logs" / "pretrain.log"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["checkpoint_dir"] = str(out / "checkpoints" / "best")
    return metrics


def finetune(
    config: Path, checkpoint: str, method: str, name: str, base: list[str], work: Path, extra: list[str]
) -> dict[str, Any]:
    out = work / name
    morec_cli(
        [
            "finetune",
            "--from",
            checkpoint,
            "--method",
            method,
            "--config",
            str(config),
            *base,
            *extra,
            f'run.out_dir="{out}"',
        ],
        log=work / "logs" / f"{name}.log",
    )
    return json.loads((out / "metrics.json").read_text())


def relative(before: float, after: float) -> float:
    return (after - before) / abs(before) if before else float("nan")


def row_of(name: str, method: str, metrics: dict[str, Any], base: dict[str, Any], **info: Any) -> dict[str, Any]:
    values = {m: float(metrics[m]) for m in METRICS}
    change = {m: relative(base[m], values[m]) for m in METRICS}
    # objective gains in the direction of "better" (Pop-KL is lower-is-better)
    gains = {obj: (-change[m] if m in LOWER_IS_BETTER else change[m]) for obj, m in OBJECTIVE_METRIC.items()}
    defined = [g for g in gains.values() if g == g]  # a metric at 0 before has no relative change
    mean_gain = sum(defined) / len(defined) if defined else float("nan")
    return {
        "name": name,
        "method": method,
        "metrics": values,
        "relative": change,
        "gains": gains,
        "mean_gain": mean_gain,
        **info,
    }


def trace_of(metrics: dict[str, Any], every: int = 1) -> dict[str, list]:
    trace = metrics.get("coordinator", {}).get("trace", {})
    return {k: trace.get(k, [])[::every] for k in ("step", "beta", "accuracy_loss", "target_loss")}


def run_methods(config: Path, base: list[str], work: Path, plan: Plan, pre: dict[str, Any]) -> list[dict[str, Any]]:
    checkpoint = pre["checkpoint_dir"]
    l_hat = float(pre["train_loss"])
    baseline = {m: pre[m] for m in METRICS}
    rows = [
        row_of("pretrain", "pretrain", pre, baseline),
        row_of("most popular", "most_popular", pre["baselines"]["most_popular"], baseline),
    ]
    for pref_name, weights in plan.preferences.items():
        prefs = [objectives_override(weights)]
        for factor in plan.target_factors:
            target = l_hat * factor
            name = f"morec-{pref_name}-lhat{factor:g}"
            metrics = finetune(
                config,
                checkpoint,
                "morec",
                name,
                base,
                work,
                [*plan.finetune, *prefs, f"morec.pid.target_loss={target}"],
            )
            rows.append(
                row_of(
                    name,
                    "morec",
                    metrics,
                    baseline,
                    weights=weights,
                    target_loss=target,
                    target_factor=factor,
                    trace=trace_of(metrics),
                    client=metrics.get("coordinator", {}).get("client"),
                    train_rows_per_s=metrics.get("train_rows_per_s"),
                    wall_s=metrics.get("wall_s"),
                )
            )
            print(f"{name}: " + " ".join(f"{m} {rows[-1]['metrics'][m]:.4f}" for m in METRICS), flush=True)
        if plan.static:
            name = f"static-{pref_name}"
            metrics = finetune(config, checkpoint, "static_uniform", name, base, work, [*plan.finetune, *prefs])
            rows.append(
                row_of(
                    name,
                    "static",
                    metrics,
                    baseline,
                    weights=weights,
                    train_rows_per_s=metrics.get("train_rows_per_s"),
                    wall_s=metrics.get("wall_s"),
                )
            )
            print(f"{name}: " + " ".join(f"{m} {rows[-1]['metrics'][m]:.4f}" for m in METRICS), flush=True)
    if plan.mgda:
        metrics = finetune(config, checkpoint, "mgda_uniform", "mgda", base, work, list(plan.finetune))
        rows.append(
            row_of(
                "mgda",
                "mgda",
                metrics,
                baseline,
                train_rows_per_s=metrics.get("train_rows_per_s"),
                wall_s=metrics.get("wall_s"),
                mean_weights=[h.get("mgda_mean_weights") for h in metrics.get("history", [])],
            )
        )
    return rows


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
    for row in rows:
        cells = []
        for m in METRICS:
            value = row["metrics"][m]
            cells.append(
                f"{value:.4f}" if row["method"] == "pretrain" else f"{value:.4f} ({100 * row['relative'][m]:+.1f}%)"
            )
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots

STYLE = {
    "pretrain": ("k", "*"),
    "most_popular": ("grey", "x"),
    "morec": ("tab:red", "o"),
    "static": ("tab:blue", "s"),
    "mgda": ("tab:green", "^"),
}


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (objective, metric) in zip(axes, OBJECTIVE_METRIC.items(), strict=True):
        for method, (color, marker) in STYLE.items():
            pts = [r for r in rows if r["method"] == method]
            if not pts:
                continue
            ax.scatter(
                [r["metrics"][metric] for r in pts],
                [r["metrics"]["hit@10"] for r in pts],
                c=color,
                marker=marker,
                s=60,
                label=method,
            )
            for r in pts:
                if method in ("morec", "static"):
                    ax.annotate(
                        r["name"].split("-", 1)[1],
                        (r["metrics"][metric], r["metrics"]["hit@10"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        front = pareto_front([r for r in rows if r["method"] != "most_popular"], metric)
        if len(front) > 1:
            ax.plot(
                [r["metrics"][metric] for r in front],
                [r["metrics"]["hit@10"] for r in front],
                "k--",
                lw=0.8,
                label="Pareto front",
            )
        if metric in LOWER_IS_BETTER:  # Pop-KL spans orders of magnitude (most popular: ~10)
            ax.set_xscale("log")
        ax.set_xlabel(f"{metric} ({objective}{', lower is better' if metric in LOWER_IS_BETTER else ''})")
        ax.set_ylabel("hit@10 (accuracy)")
        ax.set_title(f"accuracy vs {objective} (test)")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def pareto_front(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows not dominated in (hit@10 up, metric in its better direction), sorted by metric."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0

    def dominated(a: dict[str, Any]) -> bool:
        return any(
            b is not a
            and b["metrics"]["hit@10"] >= a["metrics"]["hit@10"]
            and sign * b["metrics"][metric] >= sign * a["metrics"][metric]
            and (
                b["metrics"]["hit@10"] > a["metrics"]["hit@10"]
                or sign * b["metrics"][metric] > sign * a["metrics"][metric]
            )
            for b in rows
        )

    return sorted((r for r in rows if not dominated(r)), key=lambda r: r["metrics"][metric])


def smooth(values: list[float], window: int) -> list[float]:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < window or window <= 1:
        return arr.tolist()
    kernel = np.ones(window) / window
    return np.convolve(arr, kernel, mode="valid").tolist()


def plot_traces(rows: list[dict[str, Any]], path: Path) -> Path:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    morec = [r for r in rows if r["method"] == "morec" and r.get("trace", {}).get("step")]
    fig, axes = plt.subplots(len(morec) or 1, 1, figsize=(10, 2.6 * max(1, len(morec))), squeeze=False)
    # strict=False: with no MoRec rows there is still one (empty) axis
    for ax, row in zip(axes[:, 0], morec, strict=False):
        t = row["trace"]
        window = max(1, len(t["step"]) // 50)
        ax.plot(t["step"], t["accuracy_loss"], color="tab:blue", alpha=0.25, lw=0.6)
        ax.plot(
            t["step"][window - 1 :],
            smooth(t["accuracy_loss"], window),
            color="tab:blue",
            label=f"accuracy loss (global, {window}-step mean)",
        )
        ax.plot(t["step"], t["target_loss"], "k--", lw=1, label="l_hat")
        ax.set_ylabel("loss")
        twin = ax.twinx()
        twin.plot(t["step"], t["beta"], color="tab:red", label="beta")
        twin.set_ylabel("beta", color="tab:red")
        ax.set_title(row["name"])
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("step")
    return save_figure(fig, path)


# ------------------------------------------------------------------ driver


def common_overrides(data: Path, seed: int) -> list[str]:
    return [f'data.path="{data}"', f"run.seed={seed}"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"prepared dataset (default: {DEFAULT_DATA}; quick: a small synthetic one)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="run directory for the jobs (default: runs/bench/quality[-quick])"
    )
    parser.add_argument("--replot", type=Path, default=None, help="only redraw the figures of an existing quality JSON")
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot_pareto(result["rows"], args.replot.with_name(args.replot.stem + "_pareto.png"))
        plot_traces(result["rows"], args.replot.with_name(args.replot.stem + "_pid_trace.png"))
        return result
    args.data = args.data or (quick_dataset(args.seed) if args.quick else DEFAULT_DATA)
    out = args.out or default_out("quality", args.quick)
    work = args.work or REPO / "runs" / "bench" / ("quality-quick" if args.quick else "quality")
    plan = plan_for(args.quick)
    base = common_overrides(args.data, args.seed)
    recorder = Recorder(
        "quality",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={
            "config_file": str(args.config),
            "data": str(args.data),
            "overrides": base,
            "pretrain_overrides": plan.pretrain,
            "finetune_overrides": plan.finetune,
            "preferences": plan.preferences,
            "target_factors": list(plan.target_factors),
            "work": str(work),
        },
        note_text=note(args.note),
    )
    from morec_dist.config import load_config
    from morec_dist.train.pipeline import ensure_dataset

    ensure_dataset(load_config(args.config, base))  # prepares MovieLens-1M when it is missing
    pre = pretrain(args.config, base, work, plan.pretrain)
    rows = run_methods(args.config, base, work, plan, pre)
    pareto = plot_pareto(rows, out.with_name(out.stem + "_pareto.png"))
    traces = plot_traces(rows, out.with_name(out.stem + "_pid_trace.png"))
    recorder.update(
        {
            "target_loss_pretrained": float(pre["train_loss"]),
            "pretrain": {
                "best_epoch": pre.get("best_epoch"),
                "wall_s": pre.get("wall_s"),
                "train_rows_per_s": pre.get("train_rows_per_s"),
                "checkpoint": pre["checkpoint_dir"],
            },
            "rows": rows,
            "table_markdown": table_markdown(rows),
            "figures": [p.name for p in (pareto, traces)],
        }
    )
    result = recorder.write(out)
    print(result["table_markdown"], flush=True)
    return result


if __name__ == "__main__":
    main()
