"""Reader benchmark: weighted blocks from per-group streams against a raw Parquet scan, exactness, memory.

    python -m benchmarks.reader --quick --out FILE.json   # 1M and 5M rows, under a minute once generated
    python -m benchmarks.reader --out FILE.json           # 5M, 50M and 200M rows (--max-rows to cap)

Synthetic datasets (``morec prepare synthetic``: 3 group columns of 10 groups, each with its
``by_group/`` copy). Writes one JSON object with, at least:

- ``weighted_rows_per_s``: weighted blocks (3 objectives x 512 rows a step, counts
  ~ Multinomial(512, p_k), rows from the per-group streams), p redrawn every 200 steps among
  skewed settings, one thread, no prefetch (the reader's own cost), on the largest dataset;
- ``raw_rows_per_s``: a one-thread pyarrow scan of the same projected columns (user_id,
  item_id) of the same files (the three columns' ``by_group/`` parts), in the same process,
  the faster of pyarrow's pre-buffered default and synchronous reads (both reported);
- ``ratio`` and per size ``ratio_by_rows``, and ``ratio_large_over_small``;
- ``chi2_pvalue_min``: group frequencies of the rows served, at several skewed p, per column;
- ``rss_mb_small`` / ``rss_mb_large`` (and ``rss_mb_by_rows``): peak RSS of a process that
  streams MoRec batches end to end (negatives and KJTs included, 2-rank shares), and their
  ``morec_batch_rows_per_s`` by size;
- ``cgroup``: the largest dataset's MoRec run under a memory cgroup (v1) limited to a quarter
  of that dataset's size on disk, when the machine allows creating one;
- ``disk_bytes`` per size, machine / version / seed information.

Every measurement that involves memory runs in a fresh subprocess so peaks do not leak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BLOCK_ROWS = 512
OBJECTIVES = [("fairness", "fair_group"), ("alignment", "align_group"), ("revenue", "rev_group")]
P_EVERY = 200  # steps between redraws of p
PIECE_STEPS = P_EVERY  # weighted steps timed as one piece: each has the same p changes and draw runs
ROUNDS = 5  # interleaved rounds of both sides; each piece counts its best (3 left a ~20% spread)
SKEWS = ("train_share", "reversed", "one_heavy", "dirichlet")
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


# ------------------------------------------------------------------ helpers


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _dataset(cache: Path, rows: int, seed: int) -> Path:
    from morec_dist.data.dataset import DatasetError, PreparedDataset
    from morec_dist.data.prepare.synthetic import generate

    path = cache / f"synthetic-{rows}-seed{seed}"
    try:
        PreparedDataset.open(path, verify_checksums=False, verify_values=False)
        return path
    except DatasetError:
        users, items = max(1000, rows // 25), max(1000, rows // 100)
        return generate(path, users=users, items=items, rows=rows, seed=seed, overwrite=True)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _worker(args: list[str], prefix: list[str] | None = None) -> dict[str, Any]:
    command = [*(prefix or []), sys.executable, "-m", "benchmarks.reader", "--worker", *args]
    out = subprocess.run(
        command, cwd=REPO, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine(load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    from benchmarks.common import machine_info

    info = machine_info()
    info["load_average"] = [round(x, 2) for x in load_at_start]
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def skewed(name: str, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    share = counts / counts.sum()
    if name == "reversed":
        p = share[::-1].copy()
    elif name == "one_heavy":
        p = np.full(len(counts), 0.01)
        p[np.argmin(np.where(counts > 0, counts, np.inf))] = 1.0  # the smallest group gets most mass
    elif name == "dirichlet":
        p = rng.dirichlet(np.full(len(counts), 0.3))
    else:
        p = share
    p = np.where(counts > 0, p, 0.0)
    return p / p.sum()


def skewed_settings(objectives: list, seed: int, count: int = 64) -> list[list[np.ndarray]]:
    """``count`` settings of p, one per objective, cycling through SKEWS."""
    rng = np.random.default_rng(seed)
    return [
        [skewed(SKEWS[(i + j) % len(SKEWS)], o.counts.astype(float), rng) for j, o in enumerate(objectives)]
        for i in range(count)
    ]


def serve_blocks(objectives: list, settings: list[list[np.ndarray]], first: int, n: int) -> None:
    """Weighted blocks of steps [first, first + n), p changing every P_EVERY steps."""
    for s in range(first, first + n):
        for objective, p in zip(objectives, settings[(s // P_EVERY) % len(settings)], strict=True):
            objective.block(0, s, p, BLOCK_ROWS)


# ------------------------------------------------------------------ workers (subprocesses)


def _objectives(data: Path, seed: int, rank: int = 0, world_size: int = 1):
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.data.group_streams import GroupLayout
    from morec_dist.data.reader import WeightedObjective

    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    layout = GroupLayout(dataset.path, dataset.manifest)
    objectives = [
        WeightedObjective(dataset, layout, name, column, k, seed=seed, rank=rank, world_size=world_size)
        for k, (name, column) in enumerate(OBJECTIVES, start=1)
    ]
    return dataset, layout, objectives


def work_speed(data: Path, steps: int, seed: int) -> dict[str, Any]:
    """Raw scan and weighted blocks: same projected columns, same files, one thread."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    dataset, layout, objectives = _objectives(data, seed)
    files = [path for _, column in OBJECTIVES for group in layout.groups(column) for path, _ in group]

    def raw_scan(pre_buffer: bool) -> tuple[int, list[float]]:
        """Rows scanned and the seconds of each file."""
        rows, seconds = 0, []
        for path in files:
            start = time.perf_counter()
            for batch in pq.ParquetFile(path, pre_buffer=pre_buffer).iter_batches(
                batch_size=65536, columns=["user_id", "item_id"], use_threads=False
            ):
                users, items = batch.column(0).to_numpy(), batch.column(1).to_numpy()
                rows += len(users) + 0 * len(items)
            seconds.append(time.perf_counter() - start)
        return rows, seconds

    settings = skewed_settings(objectives, seed)
    first_step = [0]

    def weighted(n_steps: int) -> list[float]:
        """The seconds of each piece of PIECE_STEPS steps."""
        seconds = []
        for lo in range(first_step[0], first_step[0] + n_steps, PIECE_STEPS):
            start = time.perf_counter()
            serve_blocks(objectives, settings, lo, min(PIECE_STEPS, first_step[0] + n_steps - lo))
            seconds.append(time.perf_counter() - start)
        first_step[0] += n_steps
        return seconds

    raw_scan(True)  # warm the page cache, so both sides read from memory
    weighted(max(1, steps // 10))
    # Interleaved rounds; each side's time is the sum over its pieces (a file; the 200 steps
    # between two changes of p, which all have the same runs of drawn steps) of the piece's
    # best round, so a burst of load from other processes does not decide either total. The
    # raw scan runs with and without pyarrow's pre-buffering (its default hands the reads to
    # an I/O thread, the reader's row groups read synchronously): the baseline is the faster.
    raw_rounds: dict[bool, list[list[float]]] = {True: [], False: []}
    weighted_rounds = []
    for _ in range(ROUNDS):
        for pre_buffer in (True, False):
            rows, seconds = raw_scan(pre_buffer)
            raw_rounds[pre_buffer].append(seconds)
        weighted_rounds.append(weighted(steps))
    raw_by_setting = {pre: rows / float(np.min(r, axis=0).sum()) for pre, r in raw_rounds.items()}
    raw = max(raw_by_setting.values())
    weighted_best = float(np.min(weighted_rounds, axis=0).sum())
    fast = steps * BLOCK_ROWS * len(objectives) / weighted_best
    return {
        "raw_rows_per_s": raw,
        "raw_rows_per_s_pre_buffer": raw_by_setting[True],
        "raw_rows_per_s_no_pre_buffer": raw_by_setting[False],
        "weighted_rows_per_s": fast,
        "ratio": fast / raw,
        "raw_rows_scanned": rows,
        "weighted_steps": steps,
        "raw_seconds_by_round": [round(min(sum(a), sum(b)), 3) for a, b in zip(*raw_rounds.values(), strict=True)],
        "weighted_seconds_by_round": [round(sum(r), 3) for r in weighted_rounds],
        "load_average": os.getloadavg(),
    }


def work_exactness(data: Path, draws: int, seed: int) -> dict[str, Any]:
    """Group frequencies of the rows the blocks serve, against p, at each skew and column."""
    from scipy import stats

    dataset, _, objectives = _objectives(data, seed)
    rng = np.random.default_rng(seed)
    pvalues: dict[str, float] = {}
    for objective in objectives:
        group_of_item = dataset.item_column(objective.column).astype(np.int64)
        for i, name in enumerate(SKEWS):
            p = skewed(name, objective.counts.astype(float), rng)
            pairs = np.concatenate(
                [objective.block(1, 10_000 * i + s, p, BLOCK_ROWS) for s in range(draws // BLOCK_ROWS)]
            )
            groups = group_of_item[pairs[:, 1]]
            observed = np.bincount(groups - 1, minlength=len(p))
            support = p > 0
            pvalues[f"{objective.column}/{name}"] = float(
                stats.chisquare(observed[support], len(groups) * p[support]).pvalue
            )
    return {
        "chi2_pvalues": pvalues,
        "chi2_pvalue_min": min(pvalues.values()),
        "chi2_draws": draws // BLOCK_ROWS * BLOCK_ROWS,
    }


def work_rss(data: Path, batches: int, seed: int) -> dict[str, Any]:
    """Peak RSS and rows/s of a process streaming MoRec batches (uniform + 3 weighted blocks,
    negatives, KJTs), rank 0 of 2, p redrawn every 200 steps."""
    from morec_dist.data.reader import Reader

    rng = np.random.default_rng(seed)
    with Reader(
        data, batch_size=BLOCK_ROWS, num_negatives=10, seed=seed, rank=0, world_size=2, objectives=OBJECTIVES
    ) as reader:
        counts = {o.name: o.counts.astype(float) for o in reader.weighted}
        it = iter(reader)
        next(it)
        start, rows = time.perf_counter(), 0
        for step in range(batches):
            if step % P_EVERY == 0:
                reader.set_probabilities(
                    step + 1, {n: skewed(SKEWS[(step // P_EVERY) % len(SKEWS)], c, rng) for n, c in counts.items()}
                )
            try:
                rows += next(it).num_rows
            except StopIteration:
                it = iter(reader)
        seconds = time.perf_counter() - start
        it.close()
    return {"rss_mb": _peak_rss_mb(), "morec_batch_rows_per_s": rows / seconds, "batches": batches}


# ------------------------------------------------------------------ memory cgroup


def _cgroup_run(data: Path, limit_bytes: int, batches: int, seed: int) -> dict[str, Any]:
    """The MoRec worker in a fresh memory cgroup (v1) of ``limit_bytes``; page cache counts
    against the limit, so the dataset cannot simply stay cached."""
    group = CGROUP_ROOT / f"morec-bench-reader-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as exc:
        return {"ran": False, "why": f"cannot create a memory cgroup under {CGROUP_ROOT}: {exc}"}
    try:
        prefix = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"']
        try:
            result = _worker(["rss", str(data), str(batches), str(seed)], prefix)
            completed, error = True, None
        except subprocess.CalledProcessError as exc:
            result, completed, error = {}, False, (exc.stderr or "")[-500:]
        failcnt = int((group / "memory.failcnt").read_text())
        usage_max = int((group / "memory.max_usage_in_bytes").read_text())
        return {
            "ran": True, "completed": completed, "limit_mb": limit_bytes / 2**20, "max_usage_mb": usage_max / 2**20,
            "limit_hits": failcnt, "error": error, **{f"inside_{k}": v for k, v in result.items()},
        }  # fmt: skip
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------ driver


def run(quick: bool, out: Path, seed: int, cache: Path, max_rows: int | None) -> dict[str, Any]:
    sizes = [1_000_000, 5_000_000] if quick else [5_000_000, 50_000_000, 200_000_000]
    if max_rows:
        sizes = [s for s in sizes if s <= max_rows]
    started, load_at_start = time.perf_counter(), os.getloadavg()
    result: dict[str, Any] = {"benchmark": "reader", "mode": "quick" if quick else "full", "seed": seed, "rows": sizes}
    paths, prepare, disk = [], {}, {}
    for rows in sizes:
        t = time.perf_counter()
        paths.append(_dataset(cache, rows, seed))
        prepare[str(rows)] = {"dataset_s_or_cached": round(time.perf_counter() - t, 2)}
        disk[str(rows)] = _disk_bytes(paths[-1])
    result["prepare"], result["disk_bytes"] = prepare, disk
    steps, draws, batches = (600, 100_000, 300) if quick else (3000, 400_000, 2000)
    # One fresh process per size: MoRec batches first (so its peak RSS is the reader's
    # alone), then the speed rounds; the exactness draws ride along on the smallest size.
    # Importing torch and torchrec costs ~10-20 s a process here: one process per size,
    # not one per measurement, keeps --quick under a minute.
    per_size = [
        _worker(["size", str(path), str(batches), str(steps), str(draws if i == 0 else 0), str(seed)])
        for i, path in enumerate(paths)
    ]
    speeds = {str(rows): m["speed"] for rows, m in zip(sizes, per_size, strict=True)}
    large = speeds[str(sizes[-1])]
    result.update({k: large[k] for k in ("weighted_rows_per_s", "raw_rows_per_s", "ratio")})
    result["ratio_by_rows"] = {k: v["ratio"] for k, v in speeds.items()}
    result["speed_by_rows"] = speeds
    result["ratio_large_over_small"] = large["ratio"] / speeds[str(sizes[0])]["ratio"]
    result.update(per_size[0]["exact"])
    rss = [m["rss"] for m in per_size]
    result["rss_mb_small"], result["rss_mb_large"] = rss[0]["rss_mb"], rss[-1]["rss_mb"]
    result["rss_growth"] = rss[-1]["rss_mb"] / rss[0]["rss_mb"]
    result["rss_mb_by_rows"] = {str(s): r["rss_mb"] for s, r in zip(sizes, rss, strict=True)}
    result["morec_batch_rows_per_s"] = {str(s): r["morec_batch_rows_per_s"] for s, r in zip(sizes, rss, strict=True)}
    if not quick:
        result["cgroup"] = _cgroup_run(paths[-1], disk[str(sizes[-1])] // 4, batches, seed)
    from benchmarks.common import versions

    result["machine"] = _machine(load_at_start)
    result["versions"] = versions()
    result["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M and 5M rows instead of 5M, 50M and 200M")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/reader.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".data" / "bench", help="where synthetic datasets are kept"
    )
    parser.add_argument(
        "--max-rows", type=int, default=None, help="skip dataset sizes above this (full mode on a small disk)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, data, *rest = args.worker
        if kind == "size":
            batches, steps, draws, seed = (int(x) for x in rest)
            result = {"rss": work_rss(Path(data), batches, seed), "speed": work_speed(Path(data), steps, seed)}
            if draws:
                result["exact"] = work_exactness(Path(data), draws, seed)
        elif kind == "speed":
            result = work_speed(Path(data), int(rest[0]), int(rest[1]))
        elif kind == "exact":
            result = work_exactness(Path(data), int(rest[0]), int(rest[1]))
        else:
            result = work_rss(Path(data), int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    result = run(args.quick, args.out, args.seed, args.cache, args.max_rows)
    keys = (
        "weighted_rows_per_s",
        "raw_rows_per_s",
        "ratio",
        "ratio_large_over_small",
        "chi2_pvalue_min",
        "rss_mb_small",
        "rss_mb_large",
        "rss_growth",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
