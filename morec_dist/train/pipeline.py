"""``morec run``: the whole method on one config, as ``make run`` shows it.

1. prepare the dataset if ``data.path`` holds no valid one (MovieLens-1M by default);
2. pretrain (``morec train``) on ``run.nproc`` local ranks;
3. fine-tune from the best pretrained checkpoint with each of ``run.methods`` (MoRec with
   a local Ray coordinator unless ``coordinator.ray_address`` is set; baselines);
4. print and write (``results.md``, ``results.json``) the table of the test metrics of
   accuracy and of the configured objectives' kinds (each kind's registry entry names
   them; the reference objectives: seven) with relative changes against the pretrained model,
   and, for a method that ran the budget law, the stated budget and whether it held (the
   selection slice of validation users and test) with a PNG of the controller's trace beside
   results.md (``train/budget_report.py``).
Each stage runs as its own torchrun job, exactly as a user would run it by hand.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from morec_dist.config import Config, ConfigError
from morec_dist.coordinator.objectives import OBJECTIVE_KINDS, kind_metrics
from morec_dist.data import storage
from morec_dist.data.dataset import DatasetError, PreparedDataset
from morec_dist.data.storage import StoragePath
from morec_dist.eval.metrics import metric_key
from morec_dist.train.budget_report import percent, relative_change
from morec_dist.train.run_dir import provenance, read_json, write_json_atomic


def table_metrics(k: int, kinds: Sequence[str] | None = None) -> tuple[str, ...]:
    """The table's metrics at K (``eval.ks[0]``, as the jobs' progress lines): the test
    metrics of accuracy and of ``kinds`` (the config's objective kinds; None: every
    registered kind), as each kind's registry entry names them."""
    names = kind_metrics(OBJECTIVE_KINDS.names() if kinds is None else kinds)
    return tuple(metric_key(name, k) for name in names)


def config_kinds(config: Config) -> list[str]:
    """The objective kinds a config trains, in its order."""
    return [o.kind for o in config.morec.objectives]


def ensure_dataset(config: Config) -> StoragePath:
    path = storage.location(config.data.path)
    try:
        PreparedDataset.open(path, verify_values=False)
    except DatasetError as exc:
        if storage.exists(path / "manifest.json"):
            raise  # a broken dataset is reported, never silently replaced
        if path.name != "movielens-1m":
            raise DatasetError(f"{path}: no prepared dataset ({exc}); prepare it with `morec prepare ...`") from None
        from morec_dist.data.prepare.movielens import prepare_movielens_1m

        prepare_movielens_1m(path)
    return path


def morec_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "morec_dist.cli", *args]


def run_stage(name: str, command: list[str]) -> None:
    print(f"\n==> {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise RuntimeError(f"stage {name!r} failed with exit code {code}")


def change_text(before: float, after: float) -> str:
    """The relative change as a table cell ("n/a" where it is undefined)."""
    return percent(relative_change(before, after), digits=1)


def results_table(
    rows: dict[str, dict[str, float]], base: str = "pretrain", k: int = 10, kinds: Sequence[str] | None = None
) -> str:
    columns = table_metrics(k, kinds)
    header = "| model | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in rows.items():
        cells = []
        for m in columns:
            value = metrics[m]
            if name == base:
                cells.append(f"{value:.4f}")
            else:
                cells.append(f"{value:.4f} ({change_text(rows[base][m], value)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_overrides(config: Config, stage_dir: Path, name: str) -> tuple[list[str], StoragePath]:
    """A stage's run.out_dir and, when ``checkpoint.dir`` is set, its own checkpoint
    directory below it (``<dir>/<stage>``: the stages' step checkpoints never mix); returns
    the overrides and where the stage's checkpoints go."""
    overrides = [f"run.out_dir={str(stage_dir)!r}".replace("'", '"')]
    if not config.checkpoint.dir:
        return overrides, stage_dir / "checkpoints"
    root = storage.location(config.checkpoint.dir) / name
    overrides.append(f"checkpoint.dir={storage.uri_of(root)!r}".replace("'", '"'))
    return overrides, root


def budget_section(rows: dict[str, dict[str, Any]], k: int, out: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """The accuracy budget's rows (``train/budget_report.py``) and the controller's trace PNG
    of each method that ran the budget law, written beside results.md."""
    from morec_dist.train.budget_report import budget_rows, plot_control_trace

    traces = []
    for name, metrics in rows.items():
        png = plot_control_trace(metrics, out / f"budget_trace_{name}.png", title=f"{name}: the budget law's trace")
        if png is not None:
            traces.append(png)
    return budget_rows(rows, k), traces


def budget_markdown(budget: list[dict[str, Any]], traces: list[Path]) -> str:
    """The budget's part of results.md: whether each stated budget held, and the traces."""
    from morec_dist.train.budget_report import budget_table

    if not budget:
        return ""
    lines = [
        "",
        "Accuracy budget (held-out Hit@K at most the budget below the pretrained model's): the selection slice "
        "of validation users, which the controller never sees, and the test split.",
        "",
        budget_table(budget),
        "",
    ]
    lines += [f"![{png.stem}]({png.name})" for png in traces]
    return "\n".join(lines) + "\n"


def run_pipeline(config_path: str | None, overrides: list[str], config: Config) -> dict[str, Any]:
    from morec_dist.train.methods import check_methods

    check_methods(config.run.methods)  # before any stage runs
    if storage.is_uri(config.run.out_dir):
        # the results table is a local report; the stages themselves take a URI (each `morec
        # train` / `finetune` / `evaluate` on its own, as the object-store Kubernetes variant runs them)
        raise ConfigError(
            "run.out_dir: `morec run` writes its results table to a local directory, not a URI; "
            "give a local run.out_dir (data.path and checkpoint.dir may be URIs)"
        )
    k = config.eval.ks[0]
    ensure_dataset(config)
    out = Path(config.run.out_dir)
    base_args = (["--config", config_path] if config_path else []) + list(overrides)
    pretrain_dir = out / "pretrain"
    pretrain_args, pretrain_checkpoints = stage_overrides(config, pretrain_dir, "pretrain")
    run_stage("pretrain", morec_command("train", *base_args, *pretrain_args))
    checkpoint = storage.uri_of(pretrain_checkpoints / "best")
    rows = {"pretrain": read_json(pretrain_dir / "metrics.json")}
    rows_popular = rows["pretrain"]["baselines"]["most_popular"]
    for method in config.run.methods:
        method_dir = out / method
        method_args, _ = stage_overrides(config, method_dir, method)
        run_stage(
            f"finetune ({method})",
            morec_command(
                "finetune",
                "--from",
                checkpoint,
                "--method",
                method,
                *base_args,
                *method_args,
            ),
        )
        rows[method] = read_json(method_dir / "metrics.json")
    table_rows = {"most popular": rows_popular, **{k: v for k, v in rows.items()}}
    kinds = config_kinds(config)
    table = results_table(
        {"pretrain": rows["pretrain"], **{n: v for n, v in table_rows.items() if n != "pretrain"}}, k=k, kinds=kinds
    )
    budget, traces = budget_section(rows, k, out)
    summary = {
        "table": {n: {m: v[m] for m in table_metrics(k, kinds)} for n, v in table_rows.items()},
        "budget": budget,
        "wall_s": {n: v.get("wall_s") for n, v in rows.items()},
        "target_loss": rows["pretrain"]["train_loss"],
        **provenance(config, config.run.nproc),
    }
    write_json_atomic(out / "results.json", summary)
    budget_text = budget_markdown(budget, traces)
    (out / "results.md").write_text(f"# Results ({config.data.path}, test split)\n\n{table}\n{budget_text}")
    print(
        f"\nTest metrics on {config.data.path} (relative change against the pretrained model):\n\n{table}\n"
        f"{budget_text}",
        flush=True,
    )
    print(f"Wrote {out / 'results.md'} and {out / 'results.json'}", flush=True)
    return summary
