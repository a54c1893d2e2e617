"""The Pareto study of issue 14: MoRec against the paper's baselines over settings and seeds.

    python -m benchmarks.pareto --quick            # one setting per method, one seed, a tiny schedule (< 3 min)
    python -m benchmarks.pareto                    # 6 settings x 3 seeds, configs/ml1m_pareto.toml on MovieLens-1M

Methods (``train/methods.py``): ``morec`` and the baselines as the authors run them,
``static``, ``mgda``, ``pareto_mtl``, ``epo`` (MoRec's sampled blocks and adaptive p_k; only
the combination of the K+1 block losses differs). Settings are (w over revenue, fairness,
alignment; l_hat as a factor of the pretrained training loss). A baseline's loss does not
read l_hat (it only moves the PID's beta, which they ignore) and MGDA reads no w either, so a
run whose effective parameters equal an earlier one's is run once and shared by the settings
that name it (``shared_by``): same seed, same inputs, same deterministic job.

Per seed, one pretrained checkpoint (``morec train``) is shared by every method. Every job is
the real CLI (``morec train`` / ``morec finetune``, torchrun ranks, a local Ray head for the
coordinator): ``--nproc`` ranks, 2 by default, 1 in ``--quick``. Per run the 7 test metrics;
per method the front on (Hit, R-Hit, min-Hit, -Pop-KL) of the seed-mean points, its
hypervolume with the pretrained model (mean over seeds) as the reference point and a bootstrap
interval over seeds (``pareto_stats``); PNGs of the 2-D projections (Hit against each other
objective). The JSON also holds the estimated time of the full study.
"""

from __future__ import annotations

import functools
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, RESULTS, Recorder, bench_parser, morec_cli, note
from benchmarks.pareto_stats import (
    STUDY_OBJECTIVES,
    bootstrap_hypervolume,
    non_dominated,
    objective_vector,
)
from benchmarks.quality import METRICS, objectives_override
from morec_dist.train.run_dir import write_json_atomic

DEFAULT_CONFIG = REPO / "configs" / "ml1m_pareto.toml"
DEFAULT_DATA = REPO / ".data" / "movielens-1m"
STUDY_METHODS = ("morec", "static", "mgda", "pareto_mtl", "epo")
SEEDS = (0, 1, 2)
# Hit@10 budgets for the reference point: every fine-tuned model trades some Hit, so with the
# pretrained model itself as the reference (budget 0, the issue's) a method whose every
# point loses any Hit has hypervolume 0. Budget b moves the reference's Hit to (1 - b) x the
# pretrained Hit (its other coordinates stay the pretrained model's): the volume a method
# gains within that accuracy loss. All budgets are reported, none is picked.
HIT_BUDGETS = (0.0, 0.02, 0.05, 0.10)
# which setting fields a method's training reads: the rest cannot change its run
READS = {"morec": ("w", "l_hat"), "static": ("w",), "pareto_mtl": ("w",), "epo": ("w",), "mgda": ()}


@dataclass(frozen=True)
class Setting:
    name: str
    w: tuple[float, float, float]  # revenue, fairness, alignment
    l_hat: float  # factor of the pretrained model's final training loss

    def weights(self) -> dict[str, float]:
        return dict(zip(("revenue", "fairness", "alignment"), self.w, strict=True))


SETTINGS = (
    Setting("reference", (0.6, 0.2, 0.2), 1.0),
    Setting("reference-lhat0.95", (0.6, 0.2, 0.2), 0.95),
    Setting("revenue", (0.8, 0.1, 0.1), 1.0),
    Setting("fairness", (0.2, 0.6, 0.2), 1.0),
    Setting("alignment", (0.2, 0.2, 0.6), 1.0),
    Setting("balanced", (1 / 3, 1 / 3, 1 / 3), 1.0),
)
QUICK_DATA = {"users": 1000, "items": 400, "rows": 30_000}
QUICK_PRETRAIN = ["train.epochs=1", "train.log_every=0"]
QUICK_FINETUNE = ["morec.epochs=1", "train.max_steps=12", "morec.sampler.update_every_steps=6", "train.log_every=0"]
FULL_FINETUNE = ["train.log_every=0"]


def quick_dataset(seed: int) -> Path:
    """A small synthetic dataset of the same schema (the quick mode checks the pipeline only)."""
    from morec_dist.data.dataset import DatasetError, PreparedDataset
    from morec_dist.data.prepare.synthetic import generate

    path = REPO / ".data" / "bench" / f"synthetic-pareto-quick-seed{seed}"
    try:
        PreparedDataset.open(path, verify_checksums=False, verify_values=False)
    except DatasetError:
        generate(
            path,
            users=QUICK_DATA["users"],
            items=QUICK_DATA["items"],
            rows=QUICK_DATA["rows"],
            seed=seed,
            overwrite=True,
        )
    return path


def run_key(method: str, setting: Setting) -> tuple:
    """The setting fields ``method`` reads: equal keys are the same run."""
    return tuple(getattr(setting, f) for f in READS[method])


def finished_run(out: Path, args: list[str]) -> float | None:
    """The wall seconds of a run with exactly ``args`` that finished in ``out``, else None."""
    marker = out / "study_run.json"
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get("args") == args and "wall_s" in done and (out / "metrics.json").exists():
        return float(done["wall_s"])
    return None


def clear_stale_run(out: Path, args: list[str]) -> None:
    """Remove ``out`` unless its marker names ``args``: the CLI would resume the step
    checkpoints of other arguments under the new config."""
    marker = out / "study_run.json"
    if out.exists() and (not marker.exists() or json.loads(marker.read_text()).get("args") != args):
        shutil.rmtree(out)


def cached_cli(args: list[str], out: Path, log: Path) -> float:
    """Run ``morec <args>`` into ``out``, or reuse ``out`` when a run with exactly these
    arguments finished there: the study is hours long and resumes run by run.

    The marker ``study_run.json`` holds the arguments, written before the run starts and again
    with ``wall_s`` once ``metrics.json`` is there (atomically both times). A run killed
    half-way with the same arguments is started again into its directory, so the CLI resumes
    it from its step checkpoints; a directory of other arguments is removed first."""
    wall = finished_run(out, args)
    if wall is not None:
        return wall
    clear_stale_run(out, args)
    write_json_atomic(out / "study_run.json", {"args": args})
    wall = morec_cli(args, log=log)
    write_json_atomic(out / "study_run.json", {"args": args, "wall_s": wall})
    return wall


def pretrain(config: Path, base: list[str], work: Path, nproc: int) -> dict[str, Any]:
    out = work / "pretrain"
    args = ["train", "--config", str(config), *base, f'run.out_dir="{out}"', "--nproc", str(nproc)]
    wall = cached_cli(args, out, work / "logs" / "pretrain.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics, "checkpoint": str(out / "checkpoints" / "best"), "wall_s": wall}


@functools.cache  # read once per study, not once per fine-tune
def config_objective_options(config: Path) -> dict[str, dict[str, Any]]:
    """The study config's options per objective (e.g. fairness ``worst``): a setting replaces
    only the weights."""
    from morec_dist.config import load_config

    return {o.name: dict(o.options) for o in load_config(config).morec.objectives}


def finetune(
    config: Path, checkpoint: str, method: str, setting: Setting, l_hat: float, base: list[str], work: Path, nproc: int
) -> dict[str, Any]:
    name = f"{method}-{setting.name}"
    out = work / name
    args = [
        "finetune",
        "--from",
        checkpoint,
        "--method",
        method,
        "--config",
        str(config),
        *base,
        objectives_override(setting.weights(), config_objective_options(config)),
        f"morec.pid.target_loss={l_hat * setting.l_hat}",
        f'run.out_dir="{out}"',
        "--nproc",
        str(nproc),
    ]
    wall = cached_cli(args, out, work / "logs" / f"{name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics.get("history", [])
    return {
        "metrics": {m: float(metrics[m]) for m in METRICS},
        "wall_s": wall,
        "job_wall_s": metrics.get("wall_s"),
        "train_rows_per_s": metrics.get("train_rows_per_s"),
        "sampler_updates": [u.get("after_step") for u in metrics.get("coordinator", {}).get("sampler_updates", [])],
        "mean_weights": history[-1].get(f"{method}_mean_weights") if history else None,
    }


def run_seed(
    config: Path,
    data: Path,
    seed: int,
    settings: tuple[Setting, ...],
    work: Path,
    nproc: int,
    quick: bool,
    finetune_overrides: list[str],
) -> dict[str, Any]:
    base = [f'data.path="{data}"', f"run.seed={seed}"]
    pre = pretrain(config, [*base, *(QUICK_PRETRAIN if quick else [])], work / f"seed{seed}", nproc)
    l_hat = float(pre["metrics"]["train_loss"])
    print(f"seed {seed}: pretrained in {pre['wall_s']:.0f} s, l_hat {l_hat:.4f}", flush=True)
    runs = []
    for method in STUDY_METHODS:
        done: dict[tuple, dict[str, Any]] = {}
        for setting in settings:
            key = run_key(method, setting)
            if key in done:
                done[key]["shared_by"].append(setting.name)
                continue
            result = finetune(
                config,
                pre["checkpoint"],
                method,
                setting,
                l_hat,
                [*base, *finetune_overrides],
                work / f"seed{seed}",
                nproc,
            )
            run = {"method": method, "setting": setting.name, "seed": seed, "shared_by": [setting.name], **result}
            done[key] = run
            runs.append(run)
            line = " ".join(f"{m} {run['metrics'][m]:.4f}" for m in METRICS)
            print(f"seed {seed} {method}-{setting.name} ({run['wall_s']:.0f} s): {line}", flush=True)
    return {
        "seed": seed,
        "l_hat": l_hat,
        "pretrained": {m: float(pre["metrics"][m]) for m in METRICS},
        "pretrain_wall_s": pre["wall_s"],
        "pretrain_best_epoch": pre["metrics"].get("best_epoch"),
        "runs": runs,
    }


# ------------------------------------------------------------------ statistics


def method_summary(method: str, seeds: list[dict[str, Any]], reference: np.ndarray) -> dict[str, Any]:
    """The method's points (one per distinct run, seed means), front, hypervolume, interval."""
    by_setting: dict[str, list[np.ndarray]] = {}
    for s in seeds:
        for run in s["runs"]:
            if run["method"] == method:
                by_setting.setdefault(run["setting"], []).append(objective_vector(run["metrics"]))
    names = list(by_setting)
    counts = {len(v) for v in by_setting.values()}
    if len(counts) != 1:
        raise ValueError(f"{method}: settings have different numbers of seeds {counts}")
    runs = np.stack([np.stack(by_setting[n]) for n in names])  # [settings, seeds, objectives]
    means = runs.mean(axis=1)
    front = non_dominated(means)
    by_budget = {}
    for budget in HIT_BUDGETS:
        relaxed = reference.copy()
        relaxed[0] *= 1.0 - budget  # Hit is the first study objective
        b = bootstrap_hypervolume(runs, relaxed.tolist(), samples=1000, seed=0)
        by_budget[f"{budget:g}"] = {"hypervolume": b["hypervolume"], "interval": [b["low"], b["high"]]}
    return {
        "settings": names,
        "points": {n: means[i].tolist() for i, n in enumerate(names)},
        "front": [names[i] for i in front],
        "hypervolume": by_budget["0"]["hypervolume"],  # budget 0: the pretrained model itself
        "hypervolume_interval": by_budget["0"]["interval"],
        "hypervolume_by_hit_budget": by_budget,
        "seeds": int(runs.shape[1]),
        "beats_reference": [n for i, n in enumerate(names) if (means[i] > reference).all()],
    }


def relative_table(seeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, setting): seed-mean metrics and relative change against the seed-mean pretrained model."""
    pre = {m: statistics.fmean(s["pretrained"][m] for s in seeds) for m in METRICS}
    cells: dict[tuple[str, str], list[dict[str, float]]] = {}
    for s in seeds:
        for run in s["runs"]:
            cells.setdefault((run["method"], run["setting"]), []).append(run["metrics"])
    rows = []
    for (method, setting), values in cells.items():
        mean = {m: statistics.fmean(v[m] for v in values) for m in METRICS}
        rows.append(
            {
                "method": method,
                "setting": setting,
                "metrics": mean,
                "relative": {m: (mean[m] - pre[m]) / abs(pre[m]) if pre[m] else float("nan") for m in METRICS},
                "seeds": len(values),
            }
        )
    return rows


# ------------------------------------------------------------------ plots

COLORS = {
    "morec": "tab:red",
    "static": "tab:blue",
    "mgda": "tab:green",
    "pareto_mtl": "tab:purple",
    "epo": "tab:orange",
}


def plot_projections(summaries: dict[str, dict[str, Any]], reference: np.ndarray, path: Path) -> Path:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    labels = {"hit": "Hit@10", "r_hit": "R-Hit@10", "min_hit": "min-Hit@10", "-pop_kl": "-Pop-KL@10"}
    for ax, j in zip(axes, (1, 2, 3), strict=True):
        for method, summary in summaries.items():
            pts = np.array(list(summary["points"].values()))
            ax.scatter(pts[:, j], pts[:, 0], c=COLORS.get(method, "k"), s=45, label=method)
            front = pts[non_dominated(pts[:, [0, j]])]
            front = front[np.argsort(front[:, j])]
            if len(front) > 1:
                ax.plot(front[:, j], front[:, 0], "--", c=COLORS.get(method, "k"), lw=0.8)
        ax.scatter([reference[j]], [reference[0]], c="k", marker="*", s=120, label="pretrained")
        ax.set_xlabel(labels[STUDY_OBJECTIVES[j]])
        ax.set_ylabel("Hit@10")
        ax.set_title(f"Hit@10 vs {labels[STUDY_OBJECTIVES[j]]} (test, seed means)")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------ time estimate


def full_study_estimate(settings: tuple[Setting, ...], config: Path, setup_s: float) -> dict[str, Any]:
    """Runs of the full study x a per-run time: ``setup_s`` (this run's CLI seconds outside the
    job: imports, dataset check, torchrun, Ray) + the study config's epochs x the seconds per
    fine-tuning epoch of the last full quality benchmark on ML-1M (its MoRec jobs, 2 ranks)."""
    from morec_dist.config import load_config

    c = load_config(config)
    per_seed = sum(len({run_key(m, s) for s in settings}) for m in STUDY_METHODS)
    out: dict[str, Any] = {
        "finetune_runs": per_seed * len(SEEDS),
        "pretrain_runs": len(SEEDS),
        "finetune_epochs": c.morec.epochs,
        "setup_seconds_per_job": setup_s,
    }
    quality = RESULTS / "quality.json"
    if not quality.exists():
        return {**out, "seconds": None, "basis": "no benchmarks/results/quality.json to take per-epoch times from"}
    q = json.loads(quality.read_text())
    source = Path(q["config"]["config_file"])
    epochs = load_config(source).morec.epochs if source.exists() else 2
    walls = [r["wall_s"] for r in q["rows"] if r["method"] == "morec" and r.get("wall_s")]
    per_epoch = max(statistics.median(walls) - setup_s, 1.0) / epochs
    pretrain_epochs = q["pretrain"].get("best_epoch", 6) + 1 + 3  # to the best epoch + patience 3
    pretrain_per_epoch = max(q["pretrain"]["wall_s"] - setup_s, 1.0) / pretrain_epochs
    seconds = out["finetune_runs"] * (setup_s + per_epoch * c.morec.epochs) + len(SEEDS) * (
        setup_s + pretrain_per_epoch * pretrain_epochs
    )
    return {
        **out,
        "seconds": seconds,
        "finetune_seconds_per_epoch": per_epoch,
        "pretrain_seconds_per_epoch": pretrain_per_epoch,
        "pretrain_epochs_assumed": pretrain_epochs,
        "basis": f"per fine-tune: setup + {c.morec.epochs} epochs x the median MoRec seconds per epoch of "
        f"{quality.name} ({q['mode']}, ML-1M, 2 ranks, {epochs} epochs each, shared machine); pretraining as long "
        "as that benchmark's; negatives that exclude the history may cost more",
    }


# ------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data", type=Path, default=None, help=f"default {DEFAULT_DATA}; quick: a small synthetic one")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per job (default 2; quick 1)")
    parser.add_argument("--work", type=Path, default=None, help="run directory (default runs/bench/pareto[-quick])")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"the seeds to run (default {list(SEEDS)}; quick: --seed). Finished runs are reused, so a subset "
        "summarises the part of the study that has run",
    )
    parser.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every fine-tune (repeatable), e.g. morec.epochs=5 for a shorter schedule",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    quick = args.quick
    data = args.data or (quick_dataset(args.seed) if quick else DEFAULT_DATA)
    nproc = args.nproc or (1 if quick else 2)
    settings = SETTINGS[:1] if quick else SETTINGS
    seeds = tuple(args.seeds) if args.seeds else (args.seed,) if quick else SEEDS
    finetune_overrides = [*(QUICK_FINETUNE if quick else FULL_FINETUNE), *args.finetune_set]
    out = args.out or RESULTS / ("pareto_quick.json" if quick else "pareto.json")
    work = args.work or REPO / "runs" / "bench" / ("pareto-quick" if quick else "pareto")
    recorder = Recorder(
        "pareto",
        mode="quick" if quick else "full",
        seed=args.seed,
        config={
            "config_file": str(args.config),
            "data": str(data),
            "nproc": nproc,
            "methods": list(STUDY_METHODS),
            "settings": [{"name": s.name, "w": s.weights(), "l_hat_factor": s.l_hat} for s in settings],
            "seeds": list(seeds),
            "study_seeds": list(SEEDS),  # a full study's; fewer ran when --seeds named a subset
            "pretrain_overrides": QUICK_PRETRAIN if quick else [],
            "finetune_overrides": finetune_overrides,
            "work": str(work),
        },
        note_text=note(args.note),
    )
    if not quick:
        from morec_dist.config import load_config
        from morec_dist.train.pipeline import ensure_dataset

        ensure_dataset(load_config(args.config, [f'data.path="{data}"']))
    per_seed = [run_seed(args.config, data, s, settings, work, nproc, quick, finetune_overrides) for s in seeds]
    reference = np.mean([objective_vector(s["pretrained"]) for s in per_seed], axis=0)
    summaries = {m: method_summary(m, per_seed, reference) for m in STUDY_METHODS}
    figure = plot_projections(summaries, reference, out.with_name(out.stem + ".png"))
    fine = [r["wall_s"] for s in per_seed for r in s["runs"]]
    runs_wall = sum(fine) + sum(s["pretrain_wall_s"] for s in per_seed)  # reused runs count their first wall
    setup = statistics.fmean(r["wall_s"] - r["job_wall_s"] for s in per_seed for r in s["runs"] if r["job_wall_s"])
    recorder.update(
        {
            "objectives": list(STUDY_OBJECTIVES),
            "reference": reference.tolist(),
            "per_seed": per_seed,
            "methods": summaries,
            "table": relative_table(per_seed),
            "figures": [figure.name],
            "run_seconds": {
                "finetune_mean": statistics.fmean(fine),
                "setup_mean": setup,
                "pretrain_mean": statistics.fmean(s["pretrain_wall_s"] for s in per_seed),
                "study": time.perf_counter() - started,
                "runs_total": runs_wall,
            },
            "full_study_estimate": full_study_estimate(SETTINGS, DEFAULT_CONFIG, setup),
        }
    )
    result = recorder.write(out)
    for m, s in summaries.items():
        lo, hi = s["hypervolume_interval"]
        print(f"{m}: hypervolume {s['hypervolume']:.3g} [{lo:.3g}, {hi:.3g}] front {s['front']}", flush=True)
    print(f"wrote {out} in {result['run_seconds']['study']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
