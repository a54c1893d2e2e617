"""Reading a prepared dataset from an object store: the loopback S3 server against local disk.

    python -m benchmarks.object_store --out FILE.json           # 1M rows
    python -m benchmarks.object_store --quick --out FILE.json   # 200k rows

One synthetic dataset (``morec prepare synthetic``), uploaded to moto's S3 server on
127.0.0.1 (tests/s3_loopback.py: the real S3 protocol over HTTP, no network in between, so
this measures the protocol and request pattern, not a cloud's latency), read by the same
code from both places. Writes one JSON object with:

- ``weighted``: rows/s of the weighted blocks (3 objectives x 512 rows a step, p skewed,
  windows of one row group, one thread, no prefetch: the reader's own cost), local and s3,
  and their ratio;
- ``morec``: MoRec batches per second of rank 0 of 2 over one epoch or ``steps`` batches (uniform + 3 weighted blocks,
  negatives, KJTs, prefetch as configured), local and s3, and their ratio;
- ``requests_per_million_rows``: HTTP requests the server answered per 1M rows served, for
  each of the two loops (row groups are fetched whole; no request is per row);
- ``open_s`` and ``open_requests``: ``PreparedDataset.open`` with every check (sha256 of
  every file) from s3.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, Recorder, bench_parser, default_out, note

OBJECTIVES = [("fairness", "fair_group"), ("alignment", "align_group"), ("revenue", "rev_group")]
BLOCK = 512


def _dataset(rows: int, seed: int) -> Path:
    from morec_dist.data.dataset import DatasetError, PreparedDataset
    from morec_dist.data.prepare.synthetic import generate

    path = REPO / ".data" / "bench" / f"synthetic-{rows}-seed{seed}"
    try:
        PreparedDataset.open(path, verify_checksums=False, verify_values=False)
        return path
    except DatasetError:
        return Path(str(generate(path, users=rows // 25, items=rows // 100, rows=rows, seed=seed, overwrite=True)))


def _skewed(counts: np.ndarray) -> np.ndarray:
    p = counts[::-1].astype(np.float64) + 1.0  # the reverse of the train shares: small groups heavy
    return p / p.sum()


Timed = tuple[float, int, int]  # (the rate, requests answered during the timed loop, rows served)


def _weighted(data: Any, steps: int, seed: int, requests: Callable[[], int]) -> Timed:
    """Rows/s of the weighted blocks alone (windows of one row group, re-read every pass)."""
    from morec_dist.data.reader import Reader

    with Reader(data, batch_size=BLOCK, num_negatives=4, seed=seed, objectives=OBJECTIVES, in_memory_rows=0) as reader:
        ps = [_skewed(reader.dataset.train_counts(column)) for _, column in OBJECTIVES]
        before, started = requests(), time.perf_counter()
        for step in range(steps):
            for objective, p in zip(reader.weighted, ps, strict=True):
                objective.block(0, step, p, BLOCK)
        seconds, made = time.perf_counter() - started, requests() - before
    rows = steps * BLOCK * len(OBJECTIVES)
    return rows / seconds, made, rows


def _morec(data: Any, steps: int, seed: int, requests: Callable[[], int]) -> Timed:
    """MoRec batches per second of rank 0 of 2, end to end (the reader's open not timed), over
    ``steps`` batches or the epoch, whichever ends first."""
    from morec_dist.data.reader import Reader

    with Reader(
        data, batch_size=BLOCK, num_negatives=4, seed=seed, objectives=OBJECTIVES, rank=0, world_size=2
    ) as reader:
        reader.set_probabilities(1, {n: _skewed(reader.dataset.train_counts(c)) for n, c in OBJECTIVES})
        before, started, batches, rows = requests(), time.perf_counter(), 0, 0
        for batch in reader:
            batches, rows = batches + 1, rows + batch.num_rows
            if batches == steps:
                break
        return batches / (time.perf_counter() - started), requests() - before, rows


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    steps = 200 if args.quick else 3000
    recorder = Recorder(
        "object_store",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={"rows": rows, "steps": steps, "block": BLOCK, "objectives": len(OBJECTIVES)},
        note_text=note(args.note),
    )
    from morec_dist.data.dataset import PreparedDataset
    from tests.s3_loopback import moto_s3

    local = _dataset(rows, args.seed)
    with moto_s3() as s3:
        uri = s3.upload(local, "bench")
        before = s3.requests
        started = time.perf_counter()
        PreparedDataset.open(uri)
        open_s, open_requests = time.perf_counter() - started, s3.requests - before
        result: dict[str, Any] = {"open_s": round(open_s, 2), "open_requests": open_requests}
        for name, loop in (("weighted", _weighted), ("morec", _morec)):
            on_disk, _, _ = loop(local, steps, args.seed, lambda: 0)
            on_s3, made, served = loop(uri, steps, args.seed, lambda: s3.requests)
            result[name] = {
                "local": round(on_disk, 1),
                "s3": round(on_s3, 1),
                "s3_over_local": round(on_s3 / on_disk, 3),
                "requests": made,
                "rows_served": served,
                "requests_per_million_rows": round(made * 1e6 / served, 1),
            }
            print(name, result[name], flush=True)
    result["units"] = {"weighted": "rows/s", "morec": "batches/s of rank 0 of 2"}
    recorder.update(result)
    out = recorder.write(args.out or default_out("object_store", args.quick))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
