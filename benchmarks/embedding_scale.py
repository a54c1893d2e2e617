"""Embedding scale: the product's trainer at table sets of 1 to 16 GB on 2 ranks, and an 8 GB
set on 2 ranks of 6 GiB each (a GB of tables: 4M rows of dim 64 in fp32, 1.024e9 bytes).

    python -m benchmarks.embedding_scale --quick --out FILE.json   # 0.0625 and 0.25 GB
    python -m benchmarks.embedding_scale --out FILE.json           # 1, 4, 16 GB + 8 GB in 6 GiB cgroups

Each point is a synthetic dataset (``morec prepare synthetic``, cached by its size under
``--cache``: resumable) whose MF tables hold the size in all at dim 64 (items are a quarter of
the ids, at most 4M; users the rest, as in catalogues whose user table dominates), trained by
``benchmarks/dist_embedding.py``: the ``Trainer`` that ``morec train`` builds (born sharded,
row-wise, fused row-wise Adagrad), its reader and loop, 2048 rows per rank per step, a step
checkpoint, and a resume from it in fresh processes whose weights after 3 more steps must
equal the first run's (sha256 of every rank's shards). Per point and rank: peak RSS,
the placement's shard bytes and the optimizer state, step time per row.

The sizes run in two passes: ascending (train, checkpoint, resume), then descending (train
only, timed again). A point's step time is the median over both passes' steps, because the first
job of a run is slower whatever its size (quiet machine: 4 GB run first 28.3 ms per 1k rows, run
after 1 GB 21.5 and 22.7), so one ascending pass charges that to the smallest table set.

Figures: ``peak_within_target`` (peak RSS per rank <= 1.15 x (shards + optimizer state) + the
peak RSS of the smallest point), ``step_per_row_spread`` (max / min of the median step time per
row across sizes, both passes pooled; target <= 1.2; ``step_per_row_spread_by_pass`` beside
it), and the cgroup point's ``completed`` / ``resume_exact``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Recorder, bench_parser, default_out, morec_cli, note, torchrun

GIB = 1 << 30
DIM = 64
QUICK_SIZES_GB = (0.0625, 0.25)
FULL_SIZES_GB = (1.0, 4.0, 16.0)
CGROUP_POINT_GB, CGROUP_LIMIT_GB = 8.0, 6.0
TRAIN_ROWS = 2_000_000  # interactions: enough batches for every point's steps, a small disk
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def ids_for(size_gb: float) -> tuple[int, int]:
    """(users, items) whose two dim-64 fp32 tables hold ``size_gb`` GB in all, a GB being 4M
    rows of 256 bytes (1.024e9 bytes)."""
    total = int(size_gb * 4_000_000)
    items = min(total // 4, 4_000_000)
    return total - items, items


def dataset(cache: Path, size_gb: float, seed: int) -> Path:
    users, items = ids_for(size_gb)
    path = cache / f"embedding-{users}u-{items}i-s{seed}"
    if not (path / "manifest.json").exists():
        cmd = ["prepare", "synthetic", "--users", str(users), "--items", str(items)]
        cmd += ["--rows", str(TRAIN_ROWS), "--seed", str(seed), "--out", str(path), "--overwrite"]
        morec_cli(cmd, log=cache / f"{path.name}.log")
    return path


def make_cgroups(prefix: str, ranks: int, limit_bytes: int) -> list[Path]:
    groups = []
    for rank in range(ranks):
        group = Path(f"{prefix}-rank{rank}")
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        groups.append(group)
    return groups


def cgroup_figures(groups: list[Path]) -> list[dict[str, Any]]:
    return [
        {
            "limit_gb": int((g / "memory.limit_in_bytes").read_text()) / GIB,
            "max_usage_gb": int((g / "memory.max_usage_in_bytes").read_text()) / GIB,
            "limit_hits": int((g / "memory.failcnt").read_text()),
        }
        for g in groups
    ]


def remove_cgroups(groups: list[Path]) -> None:
    for group in groups:
        try:
            group.rmdir()
        except OSError:
            pass


def run_point(
    size_gb: float,
    data: Path,
    work: Path,
    log_dir: Path,
    seed: int,
    steps: int,
    cgroup: str | None,
    phases: tuple[str, ...] = ("train", "resume"),
) -> dict[str, Any]:
    """Train, checkpoint, then resume in fresh ranks; both phases' per-rank figures.
    ``phases=("train",)``: the timed training alone (the second pass)."""
    overrides = [f"data.path={data}", f"run.out_dir={work}", f"run.seed={seed}", "model.default_sharding=row_wise"]
    overrides += ["data.batch_size=2048", "data.num_negatives=10", "metrics.enabled=false"]
    if "resume" in phases:  # the first pass checks the dataset; the repeat reads the same files
        morec_cli(["inspect", str(data)], log=log_dir / f"{data.name}-inspect.log")
    ran = {}
    for phase in phases:
        out = work / f"{phase}.json"
        extra = ["--cgroup", cgroup] if cgroup else []
        args = ["--phase", phase, "--steps", str(steps), *extra, "--out", str(out), *overrides]
        wall = torchrun("benchmarks.dist_embedding", args, log=log_dir / f"{data.name}-{phase}.log")
        ran[phase] = {**json.loads(out.read_text()), "wall_s": wall}
    train = ran["train"]["ranks"]
    if "resume" not in ran:
        return {"ranks": [{"rank": r["rank"], "step_s": r["step_s"]} for r in train], "wall_s": ran["train"]["wall_s"]}
    resume = ran["resume"]["ranks"]
    return {
        "dataset": data.name,
        "users_items": list(ids_for(size_gb)),
        "ranks": train,
        "resume_ranks": [{k: v for k, v in r.items() if k != "placement"} for r in resume],
        "resume_exact": all(
            a["digest"] == b["digest"] and a["step"] == b["step"] for a, b in zip(train, resume, strict=True)
        ),
        "wall_s": {p: v["wall_s"] for p, v in ran.items()},
    }


def per_row_ms(step_s: list[float], rank: dict[str, Any]) -> float:
    return 1000 * statistics.median(step_s) / rank["rows_per_step"]


def pass_step_s(point: dict[str, Any]) -> list[list[list[float]]]:
    """[pass][rank] step times of a point: the first pass, and the repeat where it ran."""
    passes = [point["ranks"], *([point["repeat"]["ranks"]] if "repeat" in point else [])]
    return [[r["step_s"] for r in ranks] for ranks in passes]


def step_ms_per_1k_rows(point: dict[str, Any], which: int | None = None) -> float:
    """The slowest rank's median step time per 1k rows: over every pass's steps pooled, or pass ``which``'s."""
    passes = pass_step_s(point)
    chosen = passes if which is None else [passes[which]]
    ranks = point["ranks"]
    return 1000 * max(per_row_ms([t for p in chosen for t in p[i]], r) for i, r in enumerate(ranks))


def summarise(points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted(points, key=float)
    smallest = points[sizes[0]]["ranks"]
    passes = min(len(pass_step_s(points[s])) for s in sizes)
    rows = {}
    for size in sizes:
        ranks = points[size]["ranks"]
        held = [r["shard_bytes"] + r["optimizer_bytes"] for r in ranks]
        allowed = [1.15 * h / GIB + smallest[i]["peak_rss_mb"] / 1024 for i, h in enumerate(held)]
        rows[size] = {
            "peak_rss_gb": [r["peak_rss_mb"] / 1024 for r in ranks],
            "held_gb": [h / GIB for h in held],
            "allowed_gb": allowed,
            "peak_within_target": all(r["peak_rss_mb"] / 1024 <= a for r, a in zip(ranks, allowed, strict=True)),
            "step_ms_per_1k_rows": step_ms_per_1k_rows(points[size]),
            "step_ms_per_1k_rows_by_pass": [step_ms_per_1k_rows(points[size], i) for i in range(passes)],
            "setup_s": max(r["setup_s"] for r in ranks),
            "resume_exact": points[size]["resume_exact"],
        }

    def spread(key: str, i: int | None = None) -> float:
        values = [rows[s][key] if i is None else rows[s][key][i] for s in sizes]
        return max(values) / min(values)

    return {
        "by_size_gb": rows,
        "step_per_row_spread": spread("step_ms_per_1k_rows"),
        "step_per_row_spread_by_pass": [spread("step_ms_per_1k_rows_by_pass", i) for i in range(passes)],
    }


def plot(summary: dict[str, Any], path: Path) -> Path:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sizes = sorted(summary["by_size_gb"], key=float)
    x = [float(s) for s in sizes]
    rows = [summary["by_size_gb"][s] for s in sizes]
    axes[0].plot(x, [r["step_ms_per_1k_rows"] for r in rows], marker="o", label="both passes")
    passes = len(rows[0].get("step_ms_per_1k_rows_by_pass", []))
    for i, name in enumerate(("ascending pass", "descending pass")[:passes]):
        axes[0].plot(x, [r["step_ms_per_1k_rows_by_pass"][i] for r in rows], ls=":", marker=".", label=name)
    axes[0].legend(fontsize=8)
    axes[0].set_title("step time per 1k rows (slowest rank, median), row-wise")
    axes[0].set_ylabel("ms")
    for rank in range(len(rows[0]["peak_rss_gb"])):
        axes[1].plot(x, [r["peak_rss_gb"][rank] for r in rows], marker="o", label=f"peak RSS rank {rank}")
        axes[1].plot(x, [r["allowed_gb"][rank] for r in rows], ls="--", label=f"target rank {rank}")
    axes[1].set_title("peak RSS per rank")
    axes[1].set_ylabel("GiB")
    for ax in axes:
        ax.set_xlabel("embedding tables in all (GB of 4M rows)")
        ax.set_xscale("log", base=2)
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=REPO / ".data" / "bench-embedding")
    parser.add_argument("--no-cgroup", action="store_true", help="skip the 8 GB point in 6 GiB cgroups")
    parser.add_argument("--merge-into", type=Path, default=None, help="keep this result's size points, add ours")
    args = parser.parse_args(argv)
    sizes = args.sizes_gb or (QUICK_SIZES_GB if args.quick else FULL_SIZES_GB)
    steps = args.steps or (5 if args.quick else 20)
    out = args.out or default_out("embedding_scale", args.quick)
    cgroup_point = not (args.quick or args.no_cgroup)
    config = {
        "sizes_gb": list(sizes), "sharding": "row_wise", "dim": DIM, "rows_per_rank_step": 2048, "negatives": 10,
        "warmup_steps": 3, "steps": steps, "steps_after_checkpoint": 3, "optimizer": "rowwise_adagrad (fused)",
        "nproc": 2, "interactions": TRAIN_ROWS, "passes": "ascending (train, resume), then descending (train)",
        "cgroup_point": {"size_gb": CGROUP_POINT_GB, "limit_gb_per_rank": CGROUP_LIMIT_GB} if cgroup_point else None,
    }  # fmt: skip
    recorder = Recorder("embedding_scale", mode="quick" if args.quick else "full", seed=args.seed, config=config,
                        note_text=note(args.note))  # fmt: skip
    args.cache.mkdir(parents=True, exist_ok=True)
    logs = out.parent / "logs"
    points = {}
    with tempfile.TemporaryDirectory(prefix="morec-embedding-", dir=args.cache) as tmp:
        for size in sorted(sizes):
            data = dataset(args.cache, size, args.seed)
            points[str(size)] = run_point(size, data, Path(tmp) / f"{size}", logs, args.seed, steps, None)
            shutil.rmtree(Path(tmp) / f"{size}", ignore_errors=True)
            print(f"{size} GB: {json.dumps(summarise(points)['by_size_gb'][str(size)])}", flush=True)
        for size in sorted(sizes, reverse=True):  # the repeat, descending: no size always runs first
            data = dataset(args.cache, size, args.seed)
            work = Path(tmp) / f"{size}-repeat"
            points[str(size)]["repeat"] = run_point(size, data, work, logs, args.seed, steps, None, ("train",))
            shutil.rmtree(work, ignore_errors=True)
            print(f"{size} GB repeat: {json.dumps(summarise(points)['by_size_gb'][str(size)])}", flush=True)
        cgroup = None
        if cgroup_point:
            data = dataset(args.cache, CGROUP_POINT_GB, args.seed)
            prefix = str(CGROUP_ROOT / f"morec-bench-embedding-{os.getpid()}")
            groups = make_cgroups(prefix, 2, int(CGROUP_LIMIT_GB * GIB))
            try:
                try:
                    point = run_point(CGROUP_POINT_GB, data, Path(tmp) / "cgroup", logs, args.seed, steps, prefix)
                    cgroup = {"completed": True, **point}
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    cgroup = {"completed": False, "error": str(exc)[-1500:]}
                cgroup["cgroups"] = cgroup_figures(groups)
            finally:
                remove_cgroups(groups)
    if args.merge_into is not None:  # a run split in parts (a quiet machine for the large points)
        earlier = json.loads(args.merge_into.read_text())
        points = {**earlier["points"], **points}
        cgroup = cgroup or earlier.get("cgroup_point")
        recorder.update({"merged_from": str(args.merge_into), "merged_seconds": earlier.get("seconds")})
    summary = summarise(points)
    figure = plot(summary, out.with_suffix(".png"))
    recorder.update({"summary": summary, "points": points, "cgroup_point": cgroup, "figures": [figure.name]})
    result = recorder.write(out)
    print(
        json.dumps({"summary": summary, "cgroup": {k: v for k, v in (cgroup or {}).items() if k != "ranks"}}, indent=1)
    )
    return result


if __name__ == "__main__":
    main()
