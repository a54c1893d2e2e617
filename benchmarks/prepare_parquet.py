"""`morec prepare parquet` at scale: rows/s and peak memory (driver and all Ray processes).

    python -m benchmarks.prepare_parquet --quick            # 200k rows, about a minute
    python -m benchmarks.prepare_parquet --rows 5e6 20e6 50e6

Per size: a raw interaction log is written as Parquet (64-bit hashed user and item ids,
Zipf item popularity, log-normal user activity, ratings 1..5 of which >= 4 are positives,
one file per 1M rows) with an items table (price, a string category, a list column of
tags); then the real CLI runs in a subprocess under ``/usr/bin/time -v`` while a side
thread samples, every 0.5 s, the resident memory of its whole process tree (the driver,
the local Ray's GCS / raylet and every worker): the sum of RSS and the sum of PSS (which
counts shared object-store pages once). Written: wall seconds, input rows/s, positives/s,
the driver's max RSS and the tree's peak PSS / RSS, the output's size on disk.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import REPO, Recorder, bench_parser, default_out, note

CHUNK = 1_000_000


def write_raw(root: Path, rows: int, users: int, items: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 0])
    user_ids = rng.integers(1, 2**62, users, dtype=np.int64)  # "64-bit hashes"
    item_ids = rng.integers(1, 2**62, items, dtype=np.int64)
    item_w = 1.0 / np.arange(1, items + 1) ** 0.9
    item_cdf = np.cumsum(rng.permutation(item_w)) / item_w.sum()
    user_w = rng.lognormal(0, 1, users)
    user_cdf = np.cumsum(user_w) / user_w.sum()
    (root / "inter").mkdir(parents=True, exist_ok=True)
    for c, start in enumerate(range(0, rows, CHUNK)):
        n = min(CHUNK, rows - start)
        r = np.random.default_rng([seed, 1, c])
        u = np.searchsorted(user_cdf, r.random(n)).clip(max=users - 1)
        i = np.searchsorted(item_cdf, r.random(n)).clip(max=items - 1)
        pq.write_table(
            pa.table(
                {
                    "uid": user_ids[u],
                    "iid": item_ids[i],
                    "ts": 1_600_000_000 + start + np.arange(n),
                    "stars": r.integers(1, 6, n).astype(np.float32),
                }
            ),
            root / "inter" / f"part-{c:05d}.parquet",
        )
    categories = np.array([f"cat-{k:03d}" for k in range(60)])
    pq.write_table(
        pa.table(
            {
                "iid": item_ids,
                "price": np.round(np.clip(14 * np.exp(0.9 * rng.standard_normal(items)), 0.99, 999.99), 2),
                "category": categories[np.minimum(rng.zipf(1.5, items) - 1, 59)],
                "tags": [[f"t{t}" for t in rng.choice(20, k, replace=False)] for k in rng.integers(0, 4, items)],
            }
        ),
        root / "items.parquet",
    )
    (root / "mapping.toml").write_text(
        f"""[input]
interactions = "{root}/inter"
items = "{root}/items.parquet"
[columns]
user = "uid"
item = "iid"
timestamp = "ts"
rating = "stars"
rating_threshold = 4
price = "price"
category = "category"
[features]
item = ["tags"]
[split]
rule = "leave_one_out"
"""
    )


def _tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return 0, 0
    rss = re.search(r"^Rss:\s+(\d+)", text, re.M)
    pss = re.search(r"^Pss:\s+(\d+)", text, re.M)
    return (int(rss.group(1)) if rss else 0), (int(pss.group(1)) if pss else 0)


class TreeSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop, self.peak_rss_kb, self.peak_pss_kb, self.peak_procs = pid, threading.Event(), 0, 0, 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            pids = _tree(self.pid)
            mem = [_mem_kb(p) for p in pids]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(m[0] for m in mem))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(m[1] for m in mem))
            self.peak_procs = max(self.peak_procs, len(pids))


def run_one(work: Path, rows: int, seed: int, num_cpus: int, object_store_mb: int) -> dict:
    raw, out = work / f"raw-{rows}", work / f"out-{rows}"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    write_raw(raw, rows, users=max(1000, rows // 50), items=max(100, rows // 500), seed=seed)
    gen_s = time.perf_counter() - t0
    cmd = [
        "/usr/bin/time",
        "-v",
        str(REPO / ".venv" / "bin" / "morec"),
        "prepare",
        "parquet",
        "--mapping",
        str(raw / "mapping.toml"),
        "--out",
        str(out),
        "--num-cpus",
        str(num_cpus),
        "--object-store-mb",
        str(object_store_mb),
    ]
    log = work / f"log-{rows}.txt"
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"prepare parquet failed ({rc}); see {log}:\n{text[-3000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if peak is None:
        raise RuntimeError(f"no /usr/bin/time -v peak RSS in {log}")
    driver_kb = int(peak.group(1))
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    positives = manifest["num_positives"]
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    raw_disk = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    stages = re.findall(r"\[prepare parquet\s+([\d.]+)s\] (\w[^\n]*)", text)
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rows": rows,
        "positives": positives,
        "users": manifest["num_users"],
        "items": manifest["num_items"],
        "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall),
        "positives_per_s": round(positives / wall),
        "driver_max_rss_mb": round(driver_kb / 1024),
        "tree_peak_pss_mb": round(sampler.peak_pss_kb / 1024),
        "tree_peak_rss_mb": round(sampler.peak_rss_kb / 1024),
        "tree_peak_processes": sampler.peak_procs,
        "raw_input_mb": round(raw_disk / 2**20),
        "output_mb": round(disk / 2**20),
        "generate_raw_s": round(gen_s, 1),
        "stages": [(float(t), s[:80]) for t, s in stages],
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=float, nargs="+", default=None)
    parser.add_argument("--work", type=Path, default=REPO / ".data" / "bench-prepare-parquet")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--object-store-mb", type=int, default=2048)
    args = parser.parse_args()
    sizes = [int(r) for r in (args.rows or ([200_000] if args.quick else [5e6, 20e6, 50e6]))]
    rec = Recorder(
        "prepare_parquet",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={"rows": sizes, "num_cpus": args.num_cpus, "object_store_mb": args.object_store_mb},
        note_text=note(args.note),
    )
    results = []
    for rows in sizes:
        print(f"prepare parquet: {rows:,} rows ...", file=sys.stderr, flush=True)
        results.append(run_one(args.work, rows, args.seed, args.num_cpus, args.object_store_mb))
        print(f"  {results[-1]}", file=sys.stderr, flush=True)
        rec.update({"runs": results})
        rec.write(args.out or default_out("prepare_parquet", args.quick))  # after each size: a partial result survives
    print(rec.result["runs"])


if __name__ == "__main__":
    main()
