"""PID sensitivity: MoRec fine-tuning over a small Kp x Ki grid on MovieLens-1M.

    python -m benchmarks.sensitivity --quick --out FILE.json   # 2 grid points, few steps
    python -m benchmarks.sensitivity --out FILE.json           # 3 x 3 grid, one epoch each
    python -m benchmarks.sensitivity --from CKPT_DIR --target-loss L ...   # reuse a pretrained model

Every grid point fine-tunes the same pretrained model with the reference preferences and
l_hat = the pretrained training loss, changing only (Kp, Ki). Per point: the accuracy drop
(relative change of hit@10 against the pretrained model), the gains of the other
objectives (R-Hit@10, min-Hit@10, and Pop-KL@10 where lower is better), the mean beta and
how far the global accuracy loss ended from l_hat. Plots: heatmaps of the accuracy change
and the mean gain over the grid, and the beta traces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, Recorder, bench_parser, default_out, note
from benchmarks.quality import (
    DEFAULT_CONFIG,
    DEFAULT_DATA,
    METRICS,
    common_overrides,
    finetune,
    pretrain,
    quick_dataset,
    row_of,
    trace_of,
)

KP_FULL = (0.01, 0.05, 0.25)
KI_FULL = (0.0, 0.001, 0.01)


def grid_for(quick: bool) -> tuple[tuple[float, ...], tuple[float, ...], list[str], list[str]]:
    # the sweep is of the paper's PID (its Kp, Ki): morec.pid.law = "paper"
    paper = "morec.pid.law=paper"
    if quick:
        return (
            (0.05, 0.25),
            (0.001,),
            ["train.epochs=1"],
            [paper, "morec.epochs=1", "train.max_steps=20", "train.log_every=0"],
        )
    return KP_FULL, KI_FULL, [], [paper, "morec.epochs=1", "train.log_every=0"]


def point_summary(row: dict[str, Any], kp: float, ki: float) -> dict[str, Any]:
    trace = row["trace"]
    beta = np.asarray(trace["beta"], dtype=np.float64)
    loss = np.asarray(trace["accuracy_loss"], dtype=np.float64)
    tail = max(1, len(loss) // 5)  # the last fifth of the run
    return {
        "kp": kp,
        "ki": ki,
        "accuracy_change": row["relative"]["hit@10"],
        "gains": row["gains"],
        "mean_gain": row["mean_gain"],
        "metrics": row["metrics"],
        "beta_mean": float(beta.mean()) if beta.size else float("nan"),
        "beta_final": float(beta[-1]) if beta.size else float("nan"),
        "final_loss_minus_target": float(loss[-tail:].mean() - trace["target_loss"][-1]) if loss.size else float("nan"),
        "trace": {k: v[:: max(1, len(trace["step"]) // 400)] for k, v in trace.items()},
    }


def plot(points: list[dict[str, Any]], kps: tuple[float, ...], kis: tuple[float, ...], path: Path) -> Path:
    from benchmarks.common import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in (
        (axes[0], "accuracy_change", "hit@10 change vs pretrained (%)"),
        (axes[1], "mean_gain", "mean objective gain (%)"),
    ):
        grid = np.full((len(kps), len(kis)), np.nan)
        for p in points:
            grid[kps.index(p["kp"]), kis.index(p["ki"])] = 100 * p[key]
        limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        image = ax.imshow(grid, cmap="RdYlGn", aspect="auto", vmin=-limit, vmax=limit)  # 0 = white: no change
        for i in range(len(kps)):
            for j in range(len(kis)):
                ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(kis)), [f"{k:g}" for k in kis])
        ax.set_yticks(range(len(kps)), [f"{k:g}" for k in kps])
        ax.set_xlabel("Ki")
        ax.set_ylabel("Kp")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    for p in points:
        axes[2].plot(p["trace"]["step"], p["trace"]["beta"], label=f"Kp {p['kp']:g}, Ki {p['ki']:g}", lw=1)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("beta")
    axes[2].set_title("beta traces")
    axes[2].legend(fontsize=6)
    return save_figure(fig, path)


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
        "--from", dest="checkpoint", default=None, help="pretrained checkpoint directory (default: pretrain here)"
    )
    parser.add_argument(
        "--pretrain-metrics", type=Path, default=None, help="its metrics.json (for l_hat and the baseline metrics)"
    )
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    args.data = args.data or (quick_dataset(args.seed) if args.quick else DEFAULT_DATA)
    out = args.out or default_out("sensitivity", args.quick)
    work = args.work or REPO / "runs" / "bench" / ("sensitivity-quick" if args.quick else "sensitivity")
    kps, kis, pre_overrides, ft_overrides = grid_for(args.quick)
    base = common_overrides(args.data, args.seed)
    recorder = Recorder(
        "sensitivity",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={
            "config_file": str(args.config),
            "data": str(args.data),
            "overrides": base,
            "kp": list(kps),
            "ki": list(kis),
            "finetune_overrides": ft_overrides,
            "work": str(work),
        },
        note_text=note(args.note),
    )
    if args.checkpoint:
        metrics_path = args.pretrain_metrics or Path(args.checkpoint).parent.parent / "metrics.json"
        pre = json.loads(Path(metrics_path).read_text())
        pre["checkpoint_dir"] = args.checkpoint
    else:
        from morec_dist.config import load_config
        from morec_dist.train.pipeline import ensure_dataset

        ensure_dataset(load_config(args.config, base))  # prepares MovieLens-1M when it is missing
        pre = pretrain(args.config, base, work, pre_overrides)
    baseline = {m: pre[m] for m in METRICS}
    target = float(pre["train_loss"])
    points = []
    for kp in kps:
        for ki in kis:
            name = f"kp{kp:g}-ki{ki:g}"
            metrics = finetune(
                args.config,
                pre["checkpoint_dir"],
                "morec",
                name,
                base,
                work,
                [*ft_overrides, f"morec.pid.kp={kp}", f"morec.pid.ki={ki}", f"morec.pid.target_loss={target}"],
            )
            row = row_of(name, "morec", metrics, baseline, trace=trace_of(metrics))
            points.append(point_summary(row, kp, ki))
            p = points[-1]
            print(
                f"{name}: hit@10 {100 * p['accuracy_change']:+.2f}%  mean gain {100 * p['mean_gain']:+.2f}%  beta "
                f"mean {p['beta_mean']:.3f}",
                flush=True,
            )
    figure = plot(points, kps, kis, out.with_suffix(".png"))
    recorder.update(
        {
            "target_loss": target,
            "pretrained": {"checkpoint": pre["checkpoint_dir"], **{m: pre[m] for m in METRICS}},
            "points": points,
            "figures": [figure.name],
        }
    )
    return recorder.write(out)


if __name__ == "__main__":
    main()
