"""The Pareto study of issue 23: methods compared at matched accuracy, resumable run by run.

    python -m benchmarks.pareto --quick     # 2 knob values per method, 1 seed, 1 and 2 epochs, synthetic data
    python -m benchmarks.pareto             # benchmarks/pareto_design.py's design on MovieLens-1M (hours)

What is run (``pareto_design``): per seed one pretrained model (``morec train``); per method
and knob value one fine-tune of 2 epochs (``morec finetune``, 2 ranks, the real CLI), then its
continuation to 10 epochs; per seed and length the weight interpolations. Every model is
ranked once per user on valid and test (``dist_pareto_eval``, one torchrun per seed and
length), and every endpoint is computed from those rankings (``pareto_endpoints``): the
operating point of each method for each budget is chosen on the selection slice of
validation users, and reported on test.

Resuming: every run lives in ``<work>/seed<S>/<label>-<hash>`` where the hash is that of its
arguments; ``study_run.json`` holds the arguments and, once ``metrics.json`` is there, its
wall time, so a finished run is reused, a run killed half-way restarts in its directory (the
CLI resumes its step checkpoints) and a directory of other arguments is cleared first. The
rankings are npz files beside the runs, written once. Stop the study at any point and start
it again: it continues where it stopped and rewrites the results JSON (``partial`` until
every seed and length has run) after each seed and length.

The 10-epoch runs do not train their first 2 epochs again: a 10-epoch run starts from a copy
of its 2-epoch run's epoch-end step checkpoint with ``morec.epochs=10 --resume-changed``.
That equals an uninterrupted 10-epoch run because ``morec.epochs`` only bounds the runner's
epoch loop (``train/runner.py``: nothing else reads it; ``FinetuneJob.epochs``) and a resume
at an epoch end is exact for the same world size (``train/resume.py``); the quick mode
checks it every time (``extension_check``: a direct 2-epoch run against 1 + 1).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import pareto_design as design
from benchmarks.common import REPO, RESULTS, Recorder, bench_parser, morec_cli, note, torchrun
from benchmarks.pareto_design import StudyMethod
from benchmarks.pareto_endpoints import slice_metrics
from morec_dist.train.run_dir import write_json_atomic

DEFAULT_CONFIG = REPO / "configs" / "ml1m_pareto.toml"
DEFAULT_DATA = REPO / ".data" / "movielens-1m"
QUICK_DATA = {"users": 600, "items": 300, "rows": 15_000}
QUICK_PRETRAIN = ["train.epochs=1", "train.log_every=0"]
QUICK_FINETUNE = ["morec.sampler.update_every_steps=20", "train.log_every=0"]  # the budget law measures every 20
QUICK_EPOCHS = (1, 2)
FULL_FINETUNE = ["train.log_every=0"]
EVAL_NPROC = 1  # ranking a model costs seconds; one rank saves a process group per call


@dataclass(frozen=True)
class Study:
    """One invocation's plan: where, on what, with which design."""

    config: Path
    data: Path
    work: Path
    nproc: int
    methods: tuple[StudyMethod, ...]
    seeds: tuple[int, ...]
    epochs: tuple[int, ...]
    pretrain_overrides: tuple[str, ...]
    finetune_overrides: tuple[str, ...]
    control_fraction: float | None  # the budget controller's control slice share (None: no split here)


def quick_dataset(seed: int) -> Path:
    """A small synthetic dataset of the same schema (the quick mode checks the pipeline only)."""
    from morec_dist.data.dataset import DatasetError, PreparedDataset
    from morec_dist.data.prepare.synthetic import generate

    path = REPO / ".data" / "bench" / f"synthetic-pareto23-quick-seed{seed}"
    try:
        PreparedDataset.open(path, verify_checksums=False, verify_values=False)
    except DatasetError:
        generate(
            path,
            seed=seed,
            overwrite=True,
            users=QUICK_DATA["users"],
            items=QUICK_DATA["items"],
            rows=QUICK_DATA["rows"],
        )
    return path


# ------------------------------------------------------------------ cached runs


def args_hash(args: list[str]) -> str:
    """The run's identity: a hash of its arguments (its out_dir excluded: that is derived from it)."""
    return hashlib.sha256(json.dumps(args).encode()).hexdigest()[:10]


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


def cached_cli(args: list[str], out: Path, log: Path, prepare: Any = None) -> float:
    """Run ``morec <args>`` into ``out``, or reuse ``out`` when a run with exactly these
    arguments finished there. ``prepare(out)`` runs before a (re)start (the extension copies
    its starting checkpoint). The marker ``study_run.json`` is written before the run and
    again with ``wall_s`` once ``metrics.json`` is there (atomically both times)."""
    wall = finished_run(out, args)
    if wall is not None:
        return wall
    clear_stale_run(out, args)
    out.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(out)
    write_json_atomic(out / "study_run.json", {"args": args})
    wall = morec_cli(args, log=log)
    write_json_atomic(out / "study_run.json", {"args": args, "wall_s": wall})
    return wall


def run_out(work: Path, seed: int, label: str, args: list[str], flags: list[str]) -> tuple[Path, list[str]]:
    """(directory, full command line) of a run: ``<work>/seed<S>/<label>-<hash of args and
    flags>``. The flags go right after the subcommand and the overrides last, ending with the
    run's ``run.out_dir`` (``morec finetune`` appends its local Ray address as one more override)."""
    out = work / f"seed{seed}" / f"{label}-{args_hash([*args, *flags])}"
    return out, [args[0], *flags, *args[1:], f'run.out_dir="{out}"']


# ------------------------------------------------------------------ the runs of one seed


def pretrain(study: Study, seed: int) -> dict[str, Any]:
    base = ["train", "--config", str(study.config), f'data.path="{study.data}"', f"run.seed={seed}"]
    out, args = run_out(study.work, seed, "pretrain", [*base, *study.pretrain_overrides], ["--nproc", str(study.nproc)])
    wall = cached_cli(args, out, out.parent / "logs" / "pretrain.log")
    return {"dir": out, "checkpoint": out / "checkpoints" / "best", "wall_s": wall}


def finetune_args(study: Study, seed: int, pre: Path, method: StudyMethod, value: float, epochs: int) -> list[str]:
    return [
        "finetune",
        "--from",
        str(pre),
        "--method",
        str(method.cli_method),
        "--config",
        str(study.config),
        f'data.path="{study.data}"',
        f"run.seed={seed}",
        *study.finetune_overrides,
        *method.overrides(value),
        f"morec.epochs={epochs}",
    ]


def latest_step(checkpoints: Path) -> Path:
    steps = sorted(checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in steps if (p / "meta.json").exists()]
    if not complete:
        raise FileNotFoundError(f"{checkpoints}: no complete step checkpoint to continue")
    return complete[-1]


def finetune(study: Study, seed: int, pre: Path, method: StudyMethod, value: float, epochs: int, start: Path | None):
    """One fine-tune of ``epochs`` epochs; ``start``: the shorter run it continues (its latest
    epoch-end checkpoint copied in, ``--resume-changed``), None for a run from the pretrained model."""
    args = finetune_args(study, seed, pre, method, value, epochs)
    flags = ["--nproc", str(study.nproc), *(["--resume-changed"] if start is not None else [])]
    out, args = run_out(study.work, seed, f"{method.label(value)}-e{epochs}", args, flags)

    def copy_start(out: Path) -> None:
        if start is not None and not list((out / "checkpoints").glob("step-*")):
            step = latest_step(start / "checkpoints")
            shutil.copytree(step, out / "checkpoints" / step.name)

    wall = cached_cli(args, out, out.parent / "logs" / f"{out.name}.log", prepare=copy_start)
    return {"dir": out, "checkpoint": out / "checkpoints" / "final", "wall_s": wall, "continues": start}


# ------------------------------------------------------------------ rankings and metrics


def control_fraction(config: Path) -> float | None:
    """The study config's share of validation users in the budget controller's control slice."""
    from morec_dist.config import load_config

    control = getattr(load_config(config).morec, "control", None)
    return getattr(control, "control_fraction", None)


def selection_mask(users: np.ndarray, seed: int, fraction: float | None) -> np.ndarray | None:
    """The selection slice of validation users: the budget controller's own hash split
    (``eval/slices.py``, seeded by the run's seed), the users it does not control on. None
    where this tree has no such split."""
    try:
        from morec_dist.eval.slices import control_mask
    except ImportError:
        return None
    if fraction is None:
        return None
    return ~control_mask(users, seed, fraction)


def evaluate_models(study: Study, seed: int, config_from: Path, jobs: list[dict[str, Any]]) -> float:
    """Rank every model of ``jobs`` whose npz is missing, in one torchrun; its wall seconds."""
    missing = [j for j in jobs if not Path(j["out"]).exists()]
    if not missing:
        return 0.0
    where = study.work / f"seed{seed}"
    spec = {"config_from": str(config_from), "meta_out": str(where / "item_meta.npz"), "jobs": missing}
    path = where / "eval_jobs.json"
    write_json_atomic(path, spec)
    return torchrun(
        "benchmarks.dist_pareto_eval", ["--jobs", str(path)], nproc=EVAL_NPROC, log=where / "logs" / "eval.log"
    )


def rankings_path(run_dir: Path) -> Path:
    return run_dir / "rankings.npz"


def model_metrics(npz: Path, meta: dict[str, np.ndarray], seed: int, fraction: float | None) -> dict[str, Any]:
    """Test metrics (all users), validation metrics (all users) and the selection slice's."""
    r = np.load(npz)
    mask = selection_mask(r["valid_users"], seed, fraction)

    def of(split: str, keep: np.ndarray | None = None) -> dict[str, Any]:
        return slice_metrics(r[f"{split}_ranks"], r[f"{split}_top"], r[f"{split}_targets"], meta, keep)

    return {"test": of("test"), "valid": of("valid"), "selection": of("valid", mask)}


def paired_hit_noise(pre_npz: Path, run_npz: Path, k: int = 10) -> dict[str, float]:
    """How large a relative test Hit@K change is at the noise level on this split: the
    standard error of the per-user paired difference (run minus pretrained, same users)
    relative to the pretrained Hit, and the unpaired one of a single Hit estimate."""
    a, b = np.load(pre_npz), np.load(run_npz)
    ha = (a["test_ranks"] <= k).astype(np.float64)
    hb = (b["test_ranks"] <= k).astype(np.float64)
    base = ha.mean()
    return {
        "users": float(ha.size),
        "paired_se_relative": float((hb - ha).std(ddof=1) / np.sqrt(ha.size) / base),
        "single_se_relative": float(ha.std(ddof=1) / np.sqrt(ha.size) / base),
    }


# ------------------------------------------------------------------ one seed, one length


def seed_length(study: Study, seed: int, epochs: int, pre: dict[str, Any], shorter: dict | None) -> dict[str, Any]:
    """Train (or reuse) every method's runs of ``epochs`` epochs on ``seed``, rank every model,
    and return {"pretrained", "runs", "walls", "dirs"} (the records of ``pareto_endpoints``)."""
    dirs: dict[str, dict[str, Path]] = {}
    walls: dict[str, list[float]] = {"finetune": [], "continue": []}
    failed: list[str] = []
    for method in study.methods:
        if method.cli_method is None:
            continue
        dirs[method.name] = {}
        for value in method.values:
            key = f"{value:g}"
            start = shorter["dirs"][method.name].get(key) if shorter else None
            if shorter and start is None:
                failed.append(f"{method.label(value)}-e{epochs}: its shorter run failed")
                continue
            try:
                run = retried(finetune, study, seed, pre["checkpoint"], method, value, epochs, start)
            except RuntimeError as exc:  # left out: this seed stays incomplete, a later start tries again
                failed.append(f"{method.label(value)}-e{epochs}: {str(exc).splitlines()[0]}")
                print(f"seed {seed} e{epochs} {method.label(value)} FAILED: {exc}", flush=True)
                continue
            dirs[method.name][key] = run["dir"]
            walls["continue" if start else "finetune"].append(run["wall_s"])
            print(f"seed {seed} e{epochs} {method.label(value)}: {run['wall_s']:.0f} s", flush=True)
    jobs = [{"out": str(rankings_path(pre["dir"])), "checkpoint": str(pre["checkpoint"])}]
    jobs += [
        {"out": str(rankings_path(d)), "checkpoint": str(d / "checkpoints" / "final")}
        for ds in dirs.values()
        for d in ds.values()
    ]
    mixes = interpolation_jobs(study, seed, epochs, pre, dirs)
    eval_wall = retried(evaluate_models, study, seed, pre["checkpoint"], jobs + [j for _, j in mixes])
    meta = dict(np.load(study.work / f"seed{seed}" / "item_meta.npz"))
    runs = {
        m: {k: model_metrics(rankings_path(d), meta, seed, study.control_fraction) for k, d in ds.items()}
        for m, ds in dirs.items()
    }
    for name, job in mixes:
        runs.setdefault(name, {})[f"{job['alpha']:g}"] = model_metrics(
            Path(job["out"]), meta, seed, study.control_fraction
        )
    for m, ds in dirs.items():
        for k, d in ds.items():
            check_against_job(runs[m][k], d)
    return {
        "pretrained": model_metrics(rankings_path(pre["dir"]), meta, seed, study.control_fraction),
        "runs": runs,
        "walls": {**walls, "eval": eval_wall},
        "dirs": dirs,
        "failed": failed,
    }


RETRIES, RETRY_WAIT_S = 2, 120.0


def retried(run: Any, *args: Any, retries: int = RETRIES, wait_s: float = RETRY_WAIT_S) -> Any:
    """``run(*args)``, tried again after ``wait_s`` up to ``retries`` times when a job fails
    (the machine is shared: a job can die of another's memory or port; the CLI resumes it)."""
    for attempt in range(retries + 1):
        try:
            return run(*args)
        except RuntimeError as exc:
            if attempt == retries:
                raise
            print(f"retrying in {wait_s:.0f} s after: {str(exc).splitlines()[0]}", flush=True)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def interpolation_jobs(study: Study, seed: int, epochs: int, pre: dict[str, Any], dirs: dict[str, dict[str, Path]]):
    """(method name, eval job) of every interpolation knob value: pretrained mixed with its source run."""
    out = []
    for method in study.methods:
        if method.source is None:
            continue
        src_name, src_value = method.source
        src = dirs.get(src_name, {}).get(f"{src_value:g}")
        if src is None:  # its source failed: no interpolation on this seed and length
            continue
        where = study.work / f"seed{seed}" / f"{method.name}-e{epochs}-{args_hash([str(pre['checkpoint']), str(src)])}"
        for alpha in method.values:
            out.append(
                (
                    method.name,
                    {
                        "out": str(where / f"alpha{alpha:g}.npz"),
                        "mix": [str(pre["checkpoint"]), str(src / "checkpoints" / "final")],
                        "alpha": alpha,
                    },
                )
            )
    return out


def check_against_job(metrics: dict[str, Any], run_dir: Path, tolerance: float = 1e-9) -> None:
    """The study's ranking of a run's final model gives the job's own test metrics (same
    protocol), and for a budget-law run the job's own selection-slice Hit@K (same split)."""
    job = json.loads((run_dir / "metrics.json").read_text())
    pairs = [(key, job[key], metrics["test"][key]) for key in ("hit@10", "r_hit@10", "min_hit@10", "pop_kl@10")]
    budget = job.get("budget") or {}
    if budget.get("selection_after") is not None and budget.get("k") == 10:
        pairs.append(("selection hit@10", budget["selection_after"], metrics["selection"]["hit@10"]))
    for key, theirs, ours in pairs:
        if abs(float(theirs) - float(ours)) > tolerance:
            raise RuntimeError(f"{run_dir}: {key} {ours} from the rankings, {theirs} in metrics.json")


# ------------------------------------------------------------------ the study


def available_methods(study_config: Path, methods: tuple[StudyMethod, ...]) -> tuple[list[StudyMethod], dict[str, str]]:
    """The methods whose overrides this tree's config accepts (a method of a feature not yet
    here, e.g. the budget law, is left out with the reason), interpolations with their source."""
    from morec_dist.config import ConfigError, load_config

    keep, skipped = [], {}
    for m in methods:
        try:
            load_config(study_config, m.overrides(m.values[0]))
        except ConfigError as exc:
            skipped[m.name] = str(exc)
            continue
        keep.append(m)
    names = {m.name for m in keep}
    for m in list(keep):
        if m.source and m.source[0] not in names:
            keep.remove(m)
            skipped[m.name] = f"its source {m.source[0]} is not available"
    return keep, skipped


def planned_counts(study: Study) -> dict[str, int]:
    trained = sum(len(m.values) for m in study.methods if m.cli_method)
    seeds, lengths = len(study.seeds), len(study.epochs)
    return {
        "pretrain": seeds,
        "finetune": seeds * trained,
        "continue": seeds * trained * (lengths - 1),
        "eval": seeds * lengths,
    }


def time_estimate(study: Study, walls: dict[str, list[float]], job_fraction: float) -> dict[str, Any]:
    """Seconds left: every run not yet done x the mean measured seconds of its kind; a
    continuation not yet measured is estimated from the fine-tunes' seconds per epoch
    (``job_fraction``: the share of a fine-tune's wall inside the job, the rest setup)."""
    planned = planned_counts(study)
    # an evaluation that found every ranking already there took 0 s: not a measurement
    mean = {k: statistics.fmean(x for x in v if x > 0) for k, v in walls.items() if any(x > 0 for x in v)}
    if "continue" not in mean and "finetune" in mean and len(study.epochs) > 1:
        first, last = study.epochs[0], study.epochs[-1]
        per_epoch = mean["finetune"] * job_fraction / first
        mean["continue"] = mean["finetune"] * (1 - job_fraction) + per_epoch * (last - first)
    done = {k: len(v) for k, v in walls.items()}
    seconds, unmeasured = seconds_left(planned, done, mean)
    return {"planned": planned, "done": done, "mean_seconds": mean, "seconds_left": seconds, "unmeasured": unmeasured}


def seconds_left(planned: dict[str, int], done: dict[str, int], mean: dict[str, float]) -> tuple[float, list[str]]:
    """Seconds of the runs not yet done at their kind's mean, and the kinds left out for want of
    a measurement (an invocation that found every ranking there timed no evaluation)."""
    left = {k: max(n - done.get(k, 0), 0) for k, n in planned.items()}
    unmeasured = sorted(k for k, n in left.items() if n and k not in mean)
    return sum(n * mean[k] for k, n in left.items() if n and k in mean), unmeasured


def lengths_summary(study: Study, records: dict[int, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    from benchmarks.pareto_endpoints import summarise_length

    knobs = {m.name: [f"{v:g}" for v in m.values] for m in study.methods}
    names = set(knobs)
    controls = [c for c in ("interpolation", "continuation") if c in names]
    return {
        str(e): summarise_length(
            records[e],
            knobs,
            design.BUDGETS,
            reference=design.REFERENCE_METHOD,
            controller=design.CONTROLLER_METHOD,
            controls=controls,
        )
        for e in study.epochs
    }


def noise_levels(study: Study, state: dict[int, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The 1% budget against the noise: per length, the paired standard error of the
    controller's set-point-1% run against its pretrained model, per seed."""
    out: dict[str, Any] = {}
    for e in study.epochs:
        rows = []
        for seed, lengths in state.items():
            run = lengths.get(e, {}).get("dirs", {}).get(design.CONTROLLER_METHOD, {}).get(f"{design.BUDGETS[0]:g}")
            pre = lengths.get(e, {}).get("pre_dir")
            if run is not None and pre is not None:
                rows.append({"seed": seed, **paired_hit_noise(rankings_path(pre), rankings_path(run))})
        out[str(e)] = rows
    return out


def strip(value: Any) -> Any:
    """A records tree without the per-group dicts and the all-users validation metrics of
    every run (the rankings npz keep everything)."""
    if isinstance(value, dict):
        return {str(k): strip(v) for k, v in value.items() if k not in ("group_hit@10", "valid")}
    return value


def extension_check(study: Study, seed: int, pre: dict[str, Any], state: dict[int, Any]) -> dict[str, Any] | None:
    """A direct run of the longest length against the study's continued one (same method,
    knob and seed): their test metrics must be equal for the continuation to stand for it."""
    if len(study.epochs) < 2:
        return None
    trained = [m for m in study.methods if m.cli_method]
    method = next((m for m in trained if m.name == design.CONTROLLER_METHOD), trained[0])
    value, longest = method.values[0], study.epochs[-1]
    direct = finetune(study, seed, pre["checkpoint"], method, value, longest, None)
    extended = state[longest]["dirs"][method.name][f"{value:g}"]
    a = json.loads((direct["dir"] / "metrics.json").read_text())
    b = json.loads((extended / "metrics.json").read_text())
    keys = ("hit@10", "ndcg@10", "r_hit@10", "min_hit@10", "pop_kl@10")
    diff = max(abs(float(a[k]) - float(b[k])) for k in keys)
    return {
        "method": method.label(value),
        "seed": seed,
        "epochs": f"{study.epochs[0]} + {longest - study.epochs[0]} against {longest} directly",
        "direct": {k: a[k] for k in keys},
        "continued": {k: b[k] for k in keys},
        "max_abs_difference": diff,
        "equal": diff == 0.0,
        "direct_wall_s": direct["wall_s"],
    }


def write_results(study: Study, recorder: Recorder, out: Path, state: dict, walls: dict, extra: dict) -> dict[str, Any]:
    """Summarise what has run (complete seeds per length) into ``out``, with the plots."""
    from benchmarks.pareto_endpoints import targets_check
    from benchmarks.pareto_plots import plot_study

    records = {
        e: {s: {"pretrained": ls[e]["pretrained"], "runs": ls[e]["runs"]} for s, ls in state.items() if e in ls}
        for e in study.epochs
    }
    lengths = lengths_summary(study, records)
    complete = all(lengths[str(e)].get("seeds") == sorted(study.seeds) for e in study.epochs)
    names = [m.name for m in study.methods]
    controls = [c for c in ("interpolation", "continuation") if c in names]
    fraction = statistics.fmean(extra.pop("job_fractions", [0.75]) or [0.75])
    figures = plot_study(lengths, out.with_name(out.stem))
    recorder.update(
        {
            "design": "issue23",
            "partial": not complete,
            "progress": {str(e): lengths[str(e)].get("seeds", []) for e in study.epochs},
            "lengths": lengths,
            "targets": targets_check(
                lengths, design.BUDGETS, design.CONTROLLER_METHOD, design.REFERENCE_METHOD, controls
            ),
            "noise": noise_levels(study, state),
            "per_seed": {str(e): strip(records[e]) for e in study.epochs},
            "walls": walls,
            "time_estimate": time_estimate(study, walls, fraction),
            "figures": [f.name for f in figures],
            **extra,
        }
    )
    return recorder.write(out)


def job_fraction(run_dir: Path, wall: float) -> float:
    job = json.loads((run_dir / "metrics.json").read_text()).get("wall_s")
    return float(job) / wall if job and wall else 0.75


def run_study(study: Study, recorder: Recorder, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Every length in order (all seeds of the first, then the next: the most informative
    runs first), writing the results after each seed and length."""
    state: dict[int, dict[Any, Any]] = {}
    walls: dict[str, list[float]] = {"pretrain": [], "finetune": [], "continue": [], "eval": []}
    fractions: list[float] = []
    failures: list[str] = []
    pres: dict[int, dict[str, Any]] = {}
    for i, epochs in enumerate(study.epochs):
        for seed in study.seeds:
            shorter = state.get(seed, {}).get(study.epochs[i - 1]) if i else None
            if i and shorter is None:
                continue  # its shorter length did not run (it failed): a later start tries again
            try:
                if seed not in pres:
                    pres[seed] = retried(pretrain, study, seed)
                    walls["pretrain"].append(pres[seed]["wall_s"])
                done = seed_length(study, seed, epochs, pres[seed], shorter)
            except RuntimeError as exc:  # the seed is left out of the summary; the others go on
                failures.append(f"seed {seed}, {epochs} epochs: {str(exc).splitlines()[0]}")
                print(f"seed {seed}, {epochs} epochs FAILED: {exc}", flush=True)
                continue
            done["pre_dir"] = pres[seed]["dir"]
            state.setdefault(seed, {})[epochs] = done
            failures += [f"seed {seed}: {f}" for f in done["failed"]]
            for kind in ("finetune", "continue"):
                walls[kind] += done["walls"][kind]
            walls["eval"].append(done["walls"]["eval"])
            if i == 0:  # the fine-tunes from the pretrained model, in the order they ran
                fractions += [
                    job_fraction(d, w) for d, w in zip(first_dirs(done), done["walls"]["finetune"], strict=True)
                ]
            write_results(study, recorder, out, state, walls, {**extra, "job_fractions": fractions, "failed": failures})
            print(f"seed {seed}, {epochs} epochs done; wrote {out}", flush=True)
    first = study.seeds[0]
    check = None
    if study.epochs[-1] in state.get(first, {}):
        try:
            check = extension_check(study, first, pres[first], state[first])
        except RuntimeError as exc:
            failures.append(f"extension check: {str(exc).splitlines()[0]}")
    extra = {**extra, "job_fractions": fractions, "failed": failures, "extension_check": check}
    return write_results(study, recorder, out, state, walls, extra)


def first_dirs(done: dict[str, Any]) -> list[Path]:
    return [d for ds in done["dirs"].values() for d in ds.values()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data", type=Path, default=None, help=f"default {DEFAULT_DATA}; quick: a small synthetic one")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per training job (default 2; quick 1)")
    parser.add_argument("--work", type=Path, default=None, help="run directory (default runs/bench/pareto23[-quick])")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {list(design.SEEDS)}")
    parser.add_argument("--epochs", type=int, nargs="+", default=None, help=f"default {list(design.EPOCHS)}")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="a subset of the design's methods (default: all; a partial study)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    data = (args.data or (quick_dataset(args.seed) if quick else DEFAULT_DATA)).resolve()
    epochs = tuple(args.epochs or (QUICK_EPOCHS if quick else design.EPOCHS))
    if list(epochs) != sorted(set(epochs)):
        parser.error(f"--epochs: expected increasing lengths, got {list(epochs)}")
    grid = design.quick_design() if quick else design.STUDY
    if args.methods:
        unknown = set(args.methods) - {m.name for m in grid}
        if unknown:
            parser.error(f"--methods: {sorted(unknown)} not in the design {[m.name for m in grid]}")
        grid = tuple(m for m in grid if m.name in args.methods)
    design.check_equal_knobs(grid)
    design.check_sources(grid)
    methods, skipped = available_methods(args.config, grid)
    if skipped and not quick:
        parser.error(f"methods this tree cannot run: {skipped}")
    fraction = control_fraction(args.config)
    selection = selection_mask(np.arange(1, 11), 0, fraction) is not None
    if not selection and not quick:
        parser.error("no selection slice of validation users in this tree (the budget controller's split)")
    study = Study(
        config=args.config.resolve(),
        data=data,
        work=(args.work or REPO / "runs" / "bench" / ("pareto23-quick" if quick else "pareto23")).resolve(),
        nproc=args.nproc or (1 if quick else 2),
        methods=tuple(methods),
        seeds=tuple(args.seeds or ((args.seed,) if quick else design.SEEDS)),
        epochs=epochs,
        pretrain_overrides=tuple(QUICK_PRETRAIN if quick else []),
        finetune_overrides=tuple(QUICK_FINETUNE if quick else FULL_FINETUNE),
        control_fraction=fraction if selection else None,
    )
    out = args.out or RESULTS / ("pareto23_quick.json" if quick else "pareto23.json")
    recorder = Recorder(
        "pareto23",
        mode="quick" if quick else "full",
        seed=args.seed,
        config=study_record(study, skipped),
        note_text=note(args.note),
    )
    if not quick:
        from morec_dist.config import load_config
        from morec_dist.train.pipeline import ensure_dataset

        ensure_dataset(load_config(study.config, [f'data.path="{data}"']))
    extra = {
        "selection_slice": "the budget controller's selection slice"
        if selection
        else "all validation users (no split in this tree)"
    }
    started = time.perf_counter()
    result = run_study(study, recorder, out, extra)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def study_record(study: Study, skipped: dict[str, str]) -> dict[str, Any]:
    return {
        "config_file": str(study.config),
        "data": str(study.data),
        "work": str(study.work),
        "nproc": study.nproc,
        "eval_nproc": EVAL_NPROC,
        "seeds": list(study.seeds),
        "epochs": list(study.epochs),
        "budgets": list(design.BUDGETS),
        "reference_method": design.REFERENCE_METHOD,
        "controller_method": design.CONTROLLER_METHOD,
        "methods": [
            {
                "name": m.name,
                "cli_method": m.cli_method,
                "knob": m.knob,
                "values": list(m.values),
                "fixed": list(m.fixed),
                "source": m.source,
            }
            for m in study.methods
        ],
        "skipped_methods": skipped,
        "pretrain_overrides": list(study.pretrain_overrides),
        "finetune_overrides": list(study.finetune_overrides),
    }


if __name__ == "__main__":
    main()
