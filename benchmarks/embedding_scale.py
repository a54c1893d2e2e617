"""Embedding scale: step time and memory per rank against table size, row-wise and table-wise.

    python -m benchmarks.embedding_scale --quick --out FILE.json   # 16 and 64 MB of tables
    python -m benchmarks.embedding_scale --out FILE.json           # 0.25 to 4 GB of tables in all

One 2-rank torchrun job (``benchmarks/dist_embedding.py``) trains the project's MF model
(two tables of equal size, dim 64, fused row-wise Adagrad) at each total size, sharded
table-wise (each table lives on one rank) and row-wise (each table split over both
ranks), on synthetic skewed ids: 2048 rows per rank per step, 10 negatives. The model is
built on the meta device, so each rank only ever allocates its own shards. Per point and
rank: median / p90 step time, peak RSS (reset before each point), RSS after set-up and
the shard bytes held; ``rss_per_table_gb`` is the fitted slope of peak RSS against the
shard bytes a rank holds (1.0 = no copy beyond the shards themselves).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Recorder, bench_parser, default_out, note, torchrun

QUICK_SIZES_MB = (16, 64)
FULL_SIZES_MB = (256, 1024, 2048, 4096)


def summarise(points: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sharding in sorted({p["sharding"] for p in points}):
        rows = [p for p in points if p["sharding"] == sharding]
        shards = np.array([r["local_table_mb"] for p in rows for r in p["ranks"]])
        peaks = np.array([r["peak_rss_mb"] for p in rows for r in p["ranks"]])
        slope = float(np.polyfit(shards, peaks, 1)[0]) if len(set(shards.tolist())) > 1 else float("nan")
        out[sharding] = {
            "total_table_mb": [p["total_table_mb"] for p in rows],
            "step_ms_median": [max(r["step_ms_median"] for r in p["ranks"]) for p in rows],
            "peak_rss_mb_per_rank": [[r["peak_rss_mb"] for r in p["ranks"]] for p in rows],
            "local_table_mb_per_rank": [[r["local_table_mb"] for r in p["ranks"]] for p in rows],
            "rss_per_table_gb": slope,
        }
    return out


def plot(summary: dict[str, Any], path: Path) -> Path:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sharding, s in summary.items():
        x = [mb / 1024 for mb in s["total_table_mb"]]
        axes[0].plot(x, s["step_ms_median"], marker="o", label=sharding)
        for rank in range(len(s["peak_rss_mb_per_rank"][0])):
            axes[1].plot(
                x,
                [peaks[rank] / 1024 for peaks in s["peak_rss_mb_per_rank"]],
                marker="o",
                ls="-" if rank == 0 else "--",
                label=f"{sharding} rank {rank}",
            )
    axes[0].set_title("step time (slowest rank, median)")
    axes[0].set_ylabel("ms")
    axes[1].set_title("peak RSS per rank")
    axes[1].set_ylabel("GiB")
    for ax in axes:
        ax.set_xlabel("embedding tables in all (GiB)")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes_mb or (QUICK_SIZES_MB if args.quick else FULL_SIZES_MB)
    steps = args.steps or (10 if args.quick else 30)
    out = args.out or default_out("embedding_scale", args.quick)
    config = {
        "sizes_mb": list(sizes),
        "sharding": ["table_wise", "row_wise"],
        "dim": 64,
        "rows_per_rank_step": 2048,
        "negatives": 10,
        "warmup_steps": 3,
        "steps": steps,
        "optimizer": "rowwise_adagrad (fused)",
        "nproc": 2,
    }
    recorder = Recorder(
        "embedding_scale",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config=config,
        note_text=note(args.note),
    )
    with tempfile.TemporaryDirectory(prefix="morec-embedding-") as tmp:
        raw_path = Path(tmp) / "points.json"
        torchrun(
            "benchmarks.dist_embedding",
            ["--sizes-mb", *map(str, sizes), "--steps", str(steps), "--seed", str(args.seed), "--out", str(raw_path)],
            log=out.parent / "logs" / f"{out.stem}-ranks.log",
        )
        raw = json.loads(raw_path.read_text())
    summary = summarise(raw["points"])
    figure = plot(summary, out.with_suffix(".png"))
    recorder.update({"summary": summary, "points": raw["points"], "figures": [figure.name]})
    result = recorder.write(out)
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
