"""Reader benchmark: weighted-sampling speed against a raw Parquet scan, exactness, and memory.

    python -m benchmarks.reader --quick --out FILE.json    # 1M and 5M rows, well under a minute
    python -m benchmarks.reader --out FILE.json            # 10M and 50M rows

Writes one JSON object with, at least: ``weighted_rows_per_s`` (exact group-first draws,
delivered as (user_id, item_id) arrays in draw order), ``raw_rows_per_s`` (a pyarrow scan of
the same two columns of the same train files, one thread, in the same run), ``ratio``,
``chi2_pvalue_min`` (group frequencies at several skewed p and uniformity inside the
smallest group), ``rss_mb_small`` / ``rss_mb_large`` (peak RSS of a process that streams
MoRec batches from each dataset) and ``rss_growth``; plus the end-to-end MoRec batch rate,
index build times and machine / version / seed information. Every measurement that
involves memory runs in a fresh subprocess so that peaks do not leak between them.
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
BLOCK_ROWS = 512  # draws per call in the reader: one weighted block of a step
OBJECTIVES = [("fairness", "fair_group"), ("alignment", "align_group"), ("revenue", "rev_group")]
SKEWS = {
    "train_share": None,
    "reversed": "reverse",
    "one_heavy": "one_heavy",
}


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


def _worker(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.reader", "--worker", *args],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine(load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    from benchmarks.common import machine_info

    info = machine_info()
    info["load_average"] = [round(x, 2) for x in load_at_start]
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ------------------------------------------------------------------ workers (subprocesses)


def _skewed(name: str, counts: np.ndarray) -> np.ndarray:
    share = counts / counts.sum()
    if SKEWS[name] == "reverse":
        p = share[::-1].copy()
    elif SKEWS[name] == "one_heavy":
        p = np.full(len(counts), 0.01)
        p[np.argmin(np.where(counts > 0, counts, np.inf))] = 1.0  # the smallest group gets most mass
    else:
        p = share
    p = np.where(counts > 0, p, 0.0)
    return p / p.sum()


def work_speed(data: Path, draws: int, chunk: int, seed: int, budget_mb: float) -> dict[str, Any]:
    """Raw scan and weighted draws, same columns, same files, one thread, this process.

    Weighted draws are measured twice: with the index resident (within its budget, the
    normal case up to budget-sized indexes) and with a budget of a quarter of the index
    (the bounded regime of datasets whose index outgrows the budget)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.data.group_index import ROW_BYTES, GroupIndex, GroupSampler, open_group_index

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    files = dataset.split_files("train")

    def raw_scan() -> tuple[int, float]:
        start, rows = time.perf_counter(), 0
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["user_id", "item_id"], use_threads=False):
                users, items = batch.column(0).to_numpy(), batch.column(1).to_numpy()
                rows += len(users) + 0 * len(items)
        return rows, time.perf_counter() - start

    index = open_group_index(dataset, "fair_group", resident_budget_mb=budget_mb)
    bounded = GroupIndex(index.path, resident_budget_mb=index.strata.rows * ROW_BYTES / 4 / (1 << 20))
    p = _skewed("train_share", index.counts.astype(float))
    rng = np.random.default_rng(seed)
    calls = max(1, draws // chunk)

    def weighted(sampler: GroupSampler, n_calls: int, size: int = chunk) -> tuple[int, float]:
        start = time.perf_counter()
        for _ in range(n_calls):
            sampler.draw(rng, p, size)
        return n_calls * size, time.perf_counter() - start

    raw_scan()  # warm the page cache and the mapping, so both sides read from memory
    weighted(GroupSampler(index), calls)
    # Interleaved rounds, best of each: other processes on the machine hit both alike.
    raw_best, weighted_best, bounded_best, block_best = (float("inf"),) * 4
    block_calls = max(1, calls * chunk // BLOCK_ROWS // 4)
    for _ in range(3):
        rows, seconds = raw_scan()
        raw_best = min(raw_best, seconds)
        weighted_best = min(weighted_best, weighted(GroupSampler(index), calls)[1])
        bounded_best = min(bounded_best, weighted(GroupSampler(bounded), max(1, calls // 8))[1])
        block_best = min(block_best, weighted(GroupSampler(index), block_calls, BLOCK_ROWS)[1])
    raw = rows / raw_best
    fast = calls * chunk / weighted_best
    return {
        "raw_rows_per_s": raw,
        "weighted_rows_per_s": fast,
        "ratio": fast / raw,
        "weighted_index_resident": not index._bounded,
        "weighted_rows_per_s_bounded": max(1, calls // 8) * chunk / bounded_best,
        "ratio_bounded": max(1, calls // 8) * chunk / bounded_best / raw,
        "weighted_draw_chunk": chunk,
        "weighted_rows_per_s_block512": block_calls * BLOCK_ROWS / block_best,
        "train_rows": rows,
        "load_average": os.getloadavg(),
    }


def work_exactness(data: Path, draws: int, seed: int) -> dict[str, Any]:
    from scipy import stats

    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.data.group_index import GroupSampler, open_group_index

    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    pvalues: dict[str, float] = {}
    for column in ("fair_group", "align_group", "rev_group"):
        index = open_group_index(dataset, column)
        sampler = GroupSampler(index)
        counts = index.counts.astype(float)
        for name in SKEWS:
            p = _skewed(name, counts)
            groups, positions = sampler.draw_positions(np.random.default_rng([seed, len(pvalues)]), p, draws)
            support = p > 0
            observed = np.bincount(groups - 1, minlength=len(p))
            pvalues[f"{column}/{name}/groups"] = float(stats.chisquare(observed[support], draws * p[support]).pvalue)
            if name == "one_heavy":  # uniformity over the rows of the smallest group, binned
                g = int(np.argmax(p))
                inside = positions[groups == g + 1] - index.strata.starts[g]
                bins = int(min(counts[g], max(2, len(inside) // 50)))
                binned = np.bincount((inside * bins // int(counts[g])).astype(np.int64), minlength=bins)
                expected = np.bincount(np.arange(int(counts[g])) * bins // int(counts[g]), minlength=bins)
                pvalues[f"{column}/{name}/within_group_{g + 1}"] = float(
                    stats.chisquare(binned, len(inside) * expected / expected.sum()).pvalue
                )
        index.close()
    return {"chi2_pvalues": pvalues, "chi2_pvalue_min": min(pvalues.values()), "chi2_draws": draws}


def work_rss(data: Path, batches: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Peak RSS of a process that streams MoRec batches (uniform + 3 weighted blocks)."""
    from morec_dist.data.reader import Reader

    with Reader(
        data, batch_size=batch_size, num_negatives=10, seed=seed, rank=0, world_size=2, objectives=OBJECTIVES
    ) as reader:
        it = iter(reader)
        next(it)
        start = time.perf_counter()
        rows = 0
        for _ in range(batches):
            rows += next(it).num_rows
        seconds = time.perf_counter() - start
        it.close()
    return {"rss_mb": _peak_rss_mb(), "morec_batch_rows_per_s": rows / seconds, "batches": batches}


# ------------------------------------------------------------------ driver


def run(quick: bool, out: Path, seed: int, cache: Path) -> dict[str, Any]:
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.data.group_index import DEFAULT_RESIDENT_BUDGET_MB, ensure_group_index

    sizes = (1_000_000, 5_000_000) if quick else (10_000_000, 50_000_000)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    result: dict[str, Any] = {"benchmark": "reader", "mode": "quick" if quick else "full", "seed": seed, "rows": list(sizes)}
    paths, build = [], {}
    for rows in sizes:
        t = time.perf_counter()
        path = _dataset(cache, rows, seed)
        generated = time.perf_counter() - t
        dataset = PreparedDataset.open(path, verify_checksums=False, verify_values=False)
        t = time.perf_counter()
        for _, column in OBJECTIVES:
            ensure_group_index(dataset, column)
        build[str(rows)] = {"dataset_s": round(generated, 2), "index_build_s_3_columns": round(time.perf_counter() - t, 2)}
        paths.append(path)
    result["prepare"] = build
    budget = str(DEFAULT_RESIDENT_BUDGET_MB)
    # one worker (no torch import) for speed on the large dataset and exactness on the small one
    speed = _worker(
        ["speed", str(paths[-1]), str(2_000_000 if quick else 10_000_000), "8192", str(seed), budget, str(paths[0]), str(500_000 if quick else 4_000_000)]
    )
    result.update({k: v for k, v in speed.items() if k != "train_rows"})
    result["resident_budget_mb"] = DEFAULT_RESIDENT_BUDGET_MB
    result["speed_dataset_rows"] = sizes[-1]
    rss = [_worker(["rss", str(p), str(200 if quick else 1000), "512", str(seed)]) for p in paths]
    result["rss_mb_small"], result["rss_mb_large"] = rss[0]["rss_mb"], rss[1]["rss_mb"]
    result["rss_growth"] = rss[1]["rss_mb"] / rss[0]["rss_mb"]
    result["morec_batch_rows_per_s"] = {str(s): r["morec_batch_rows_per_s"] for s, r in zip(sizes, rss)}
    from benchmarks.common import versions

    result["machine"] = _machine(load_at_start)
    result["versions"] = versions()
    result["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M and 5M rows instead of 10M and 50M")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/reader.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / ".data" / "bench", help="where synthetic datasets are kept")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, data, *rest = args.worker
        if kind == "speed":
            result = work_speed(Path(data), int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3]))
            result.update(work_exactness(Path(rest[4]), int(rest[5]), int(rest[2])))
        else:
            result = work_rss(Path(data), int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    result = run(args.quick, args.out, args.seed, args.cache)
    summary = {k: result[k] for k in ("weighted_rows_per_s", "raw_rows_per_s", "ratio", "chi2_pvalue_min", "rss_mb_small", "rss_mb_large", "rss_growth")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
