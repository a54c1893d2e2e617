"""Evaluation and sampler signals at catalogue scale: one signal update and one full
evaluation at 10k, 1M and 10M items, 2 torchrun ranks (gloo, CPU).

    python -m benchmarks.eval_scale --quick   # 10k and 1M items, under two minutes
    python -m benchmarks.eval_scale           # 10k, 1M and 10M items

Each size is its own torchrun job (``benchmarks/dist_eval_scale.py``) through the
evaluator's code path (eval/ranking.py: each rank holds and scores only its item range;
the per-batch merge gives every rank the exact ranks and top-K lists), with a synthetic
model whose vectors are a function of the id (64 dims), seeded users, held-out items and
20 history items per user. Per size it records, for the slowest rank, the seconds of

- a signal update: ``--signal-users`` sampled validation users (``morec.sampler.
  validation_users``), top-100 lists (the alignment histogram), the held-out item and 10
  negatives' scores (the loss signals);
- a full evaluation: ``--eval-users`` users, top-10;

both including the item vectors of the rank's range, each rank's CPU seconds (a shared
machine's load inflates wall seconds far more), and each phase's peak RSS per rank (VmHWM
reset between phases). The growth from 1M to 10M items is reported as ratios.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Recorder, bench_env, bench_parser, default_out, note, torchrun

FULL_SIZES = [10_000, 1_000_000, 10_000_000]
QUICK_SIZES = [10_000, 1_000_000]


def growth(results: list[dict[str, Any]], phase: str) -> dict[str, float]:
    """Time and per-rank peak RSS at the largest size over the next largest."""
    a, b = results[-2], results[-1]
    return {
        "items_ratio": b["items"] / a["items"],
        "seconds_ratio": b[phase]["seconds"] / a[phase]["seconds"],
        "cpu_seconds_ratio": max(b[phase]["cpu_seconds_per_rank"]) / max(a[phase]["cpu_seconds_per_rank"]),
        "peak_rss_ratio": max(b[phase]["peak_rss_mb_per_rank"]) / max(a[phase]["peak_rss_mb_per_rank"]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--eval-users", type=int, default=1000)
    parser.add_argument("--signal-users", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    out = args.out or default_out("eval_scale", args.quick)
    recorder = Recorder(
        "eval_scale",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={
            "nproc": args.nproc,
            "sizes": sizes,
            "eval_users": args.eval_users,
            "signal_users": args.signal_users,
            "dim": 64,
            "batch_users": 1024,
        },
        note_text=note(args.note),
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="morec-eval-scale-") as tmp:
        for items in sizes:
            path = Path(tmp) / f"{items}.json"
            wall = torchrun(
                "benchmarks.dist_eval_scale",
                [
                    *("--items", str(items), "--eval-users", str(args.eval_users)),
                    *("--signal-users", str(args.signal_users), "--seed", str(args.seed), "--out", str(path)),
                ],
                nproc=args.nproc,
                log=out.parent / "logs" / f"{out.stem}-{items}.log",
                env=bench_env(),
            )
            result = {**json.loads(path.read_text()), "job_wall_s": wall}
            print(json.dumps({k: result[k] for k in ("items", "signal", "evaluation")}), flush=True)
            results.append(result)
    summary: dict[str, Any] = {"sizes": results}
    if len(results) >= 2:
        summary["growth_signal"] = growth(results, "signal")
        summary["growth_evaluation"] = growth(results, "evaluation")
    recorder.update(summary)
    return recorder.write(out)


if __name__ == "__main__":
    main()
