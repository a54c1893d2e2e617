"""Where the weighted blocks' time goes: the reader's compiled loops and reads under CPU timers.

    python -m benchmarks.reader_profile --rows 5000000 --steps 9000

Runs ``benchmarks.reader``'s weighted-block loop (3 objectives x 512 rows a step, p redrawn
every 200 steps among the skewed settings) on its synthetic dataset of ``--rows`` rows (made
by ``python -m benchmarks.reader`` first), with each kernel of ``data/kernels.py``, the
row-group reads and the staging refills wrapped in process-CPU-time counters. Prints each
part's nanoseconds per served row and its share of the loop; the rest is per-call Python.
The wrappers add a little time of their own (a few calls per 64-step run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks import reader as bench
from morec_dist.data import group_streams, kernels
from morec_dist.data import reader as data_reader

KERNELS = ("draw_groups", "scatter_by_group", "shuffle_rows", "shuffle_pairs", "lookup_table", "permutation")


def _timed(owner: Any, name: str, key: str, totals: dict[str, float]) -> None:
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.process_time() - start

    setattr(owner, name, wrapper)


def profile(data: Path, steps: int, seed: int) -> tuple[float, dict[str, float]]:
    """(total CPU seconds, CPU seconds per part) of ``steps`` weighted steps."""
    totals: dict[str, float] = {}
    for name in KERNELS:
        _timed(kernels, name, name, totals)
    _timed(group_streams.GroupStream, "_read_columns", "row-group decode", totals)
    _timed(data_reader._Staging, "_refill", "staging refills (incl. decode and shuffles)", totals)
    _timed(data_reader._Staging, "_grow", "staging growth", totals)
    _, _, objectives = bench._objectives(data, seed)
    settings = bench.skewed_settings(objectives, seed)
    bench.serve_blocks(objectives, settings, 0, 300)  # compile, read the resident groups, fill the staging
    totals.clear()
    start = time.process_time()
    bench.serve_blocks(objectives, settings, 300, steps)
    return time.process_time() - start, totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=bench.REPO / ".data" / "bench")
    args = parser.parse_args(argv)
    data = args.cache / f"synthetic-{args.rows}-seed{args.seed}"
    if not (data / "manifest.json").exists():
        raise SystemExit(f"{data}: missing; run python -m benchmarks.reader first (it makes the datasets)")
    total, parts = profile(data, args.steps, args.seed)
    served = args.steps * bench.BLOCK_ROWS * len(bench.OBJECTIVES)
    print(f"{served:,} rows served in {total:.3f} CPU s: {total / served * 1e9:.2f} ns a row")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:45s} {seconds / served * 1e9:6.2f} ns/row  {100 * seconds / total:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
