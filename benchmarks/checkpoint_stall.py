"""Training time lost per step checkpoint: synchronous against asynchronous (checkpoint.async_save).

    python -m benchmarks.checkpoint_stall --out FILE.json            # the ML-1M model and a 4 GB table set
    python -m benchmarks.checkpoint_stall --gb 1 --out FILE.json     # a smaller table set
    python -m benchmarks.checkpoint_stall --quick --out FILE.json    # the ML-1M model only
    python -m benchmarks.checkpoint_stall --repeats 15 --out FILE.json  # more ML-1M runs (a loaded machine)

One process (world size 1), the package's own save paths (``train/checkpoint.py``:
``save_checkpoint`` and ``start_checkpoint`` + ``commit``, DCP underneath) and a training
loop of fixed CPU steps that also update the tables in place (as the optimizer does, so the
asynchronous save must copy them first). For each state size: the loop's time without a
checkpoint (T0), with one synchronous checkpoint in its middle (T_sync) and with one
asynchronous one (T_async: started in the middle, committed at the first step boundary
after it finished, polled every step as the trainer does).

- ``stall_sync_s`` / ``stall_async_s``: the time the training thread is held by the
  checkpoint call (the whole save; the async call's copy and launch), the stall torchtitan
  reports; ``stall_ratio`` = async / sync (the issue's target: <= 0.1);
- ``commit_async_s``: the time the async save's ``commit()`` holds the training thread at
  the step boundary where it finds the save done (meta.json and the rename, unless the
  save thread did them already); ``stall_ratio_with_commit`` = (stall_async + commit_async)
  / stall_sync, the training thread's whole share of an async save;
- ``lost_sync_s`` / ``lost_async_s``: T - T0 of the whole loop, which also counts the
  background save's competition for the CPU (2 cores here), the loop long enough for the
  save to finish inside it; on a loaded machine these differences are noisy (each is the
  median of ``repeats`` runs), the stalls much less so;
- ``save_s``: the save's own time (for async: from the call to the commit);
- the async saves copy into ``StagingBuffers`` kept between saves, as a job's do: a first
  (cold) async save allocates them, its stall is ``stall_async_first_s``; the measured ones
  are a job's later saves.

- ``ml1m``: the ML-1M MF model: (6,041 + 3,884) x 64 float32 tables and a rowwise Adagrad
  state, written to local disk and to the loopback S3 server;
- ``tables_<N>gb``: N GB of float32 tables (4 equal tables) with rowwise state, local disk;
  skipped (and said so) when MemAvailable is under 2.5 N + 2 GiB (the async copy doubles it).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, Recorder, bench_parser, default_out, note

STEP_DIM = 384  # a step: two matmuls of this size on one thread (~10-20 ms on this machine)


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _state(rows: list[int], dim: int) -> dict[str, Any]:
    tables = {f"t{i}": torch.randn(n, dim) for i, n in enumerate(rows)}
    momentum = {f"t{i}": torch.zeros(n) for i, n in enumerate(rows)}  # rowwise Adagrad: one float a row
    return {"model": tables, "optim": {"state": momentum, "lr": 0.1}, "step": torch.tensor(0)}


def _step(state: dict[str, Any], a: torch.Tensor, step: int) -> None:
    (a @ a).relu_() @ a
    for table in state["model"].values():  # the optimizer touches a few rows every step
        table[(step * 97) % len(table)].add_(0.01)
    state["step"] += 1


_SAVES = [0]


def _loop(state: dict[str, Any], steps: int, root: Any, mode: str, buffers: Any = None) -> dict[str, float]:
    """The loop's seconds with a checkpoint of ``mode`` (none / sync / async) at steps // 3,
    under a new name each time, as step checkpoints are (``root/step-<n>``)."""
    _SAVES[0] += 1
    where = root / f"step-{_SAVES[0]}"
    from morec_dist.train.checkpoint import save_checkpoint, start_checkpoint

    a = torch.randn(STEP_DIM, STEP_DIM)
    at = steps // 3
    held = save_s = commit_s = 0.0
    pending = None
    started = time.perf_counter()
    for step in range(steps):
        _step(state, a, step)
        if step == at and mode == "sync":
            t = time.perf_counter()
            save_checkpoint(where, state, {"step": step})
            held = save_s = time.perf_counter() - t
        elif step == at and mode == "async":
            t = time.perf_counter()
            pending = start_checkpoint(where, state, {"step": step}, buffers=buffers)
            held = time.perf_counter() - t
        if pending is not None and pending.done():
            c = time.perf_counter()
            pending.commit()
            commit_s = time.perf_counter() - c
            save_s = time.perf_counter() - t
            pending = None
    total = time.perf_counter() - started
    if pending is not None:  # the loop was too short: count the wait as lost time
        c = time.perf_counter()
        pending.commit()
        commit_s = time.perf_counter() - c
        total = time.perf_counter() - started
        save_s = time.perf_counter() - t
    _remove(where)  # a 4 GB set would fill the disk otherwise
    return {"seconds": total, "held_s": held, "save_s": save_s, "commit_s": commit_s}


def _remove(where: Any) -> None:
    from morec_dist.data import storage

    if isinstance(where, Path):
        shutil.rmtree(where, ignore_errors=True)
    elif storage.exists(where):
        where.fs.delete_dir(where.path)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _case(name: str, rows: list[int], dim: int, targets: dict[str, Any], repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    state = _state(rows, dim)
    nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    out: dict[str, Any] = {"table_bytes": nbytes, "rows": sum(rows), "dim": dim}
    a = torch.randn(STEP_DIM, STEP_DIM)
    t = time.perf_counter()
    for step in range(20):
        _step(state, a, step)
    step_s = (time.perf_counter() - t) / 20
    from morec_dist.train.checkpoint import StagingBuffers

    for target, where in targets.items():
        buffers = StagingBuffers()
        probe = _loop(state, 10, where, "sync")  # how long a save takes: the loop must outlast it
        first = _loop(state, 10, where, "async", buffers)  # allocates the staging buffers
        steps = max(60, math.ceil(3 * probe["save_s"] / step_s) + 30)
        runs: dict[str, list[dict[str, float]]] = {"none": [], "sync": [], "async": []}
        for _ in range(repeats):  # interleaved, so a change of the machine's load hits all three
            for mode in runs:
                runs[mode].append(_loop(state, steps, where, mode, buffers))

        def med(mode: str, key: str, runs: dict[str, list[dict[str, float]]] = runs) -> float:
            return round(_median([r[key] for r in runs[mode]]), 4)

        out[target] = {
            "steps": steps,
            "repeats": repeats,
            "step_s": round(step_s, 4),
            "base_s": med("none", "seconds"),
            "stall_sync_s": med("sync", "held_s"),
            "stall_async_s": med("async", "held_s"),
            "stall_async_first_s": round(first["held_s"], 4),
            "commit_async_s": round(_median([r["commit_s"] for r in runs["async"]]), 6),
            "save_sync_s": med("sync", "save_s"),
            "save_async_s": med("async", "save_s"),
            "lost_sync_s": round(med("sync", "seconds") - med("none", "seconds"), 3),
            "lost_async_s": round(med("async", "seconds") - med("none", "seconds"), 3),
            "runs": runs,
        }
        out[target]["stall_ratio"] = round(out[target]["stall_async_s"] / out[target]["stall_sync_s"], 3)
        with_commit = _median([r["held_s"] + r["commit_s"] for r in runs["async"]])
        out[target]["stall_ratio_with_commit"] = round(with_commit / out[target]["stall_sync_s"], 3)
        print(name, target, {k: v for k, v in out[target].items() if k != "runs"}, flush=True)
    return out


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--gb", type=float, default=4.0, help="the large table set's size in GB")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each mode at the ML-1M size (medians)")
    args = parser.parse_args()
    recorder = Recorder(
        "checkpoint_stall",
        mode="quick" if args.quick else "full",
        seed=args.seed,
        config={"gb": args.gb, "step_dim": STEP_DIM, "repeats": args.repeats},
        note_text=note(args.note),
    )
    from morec_dist.data import storage
    from tests.s3_loopback import moto_s3

    torch.manual_seed(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-stall-", dir=REPO / ".data"))
    result: dict[str, Any] = {"mem_available_gib_start": round(_mem_available_gib(), 1)}
    try:
        with moto_s3() as s3:
            result["ml1m"] = _case(
                "ml1m",
                [6041, 3884],
                64,
                {"local": scratch / "ml1m", "s3": storage.location(s3.uri("ckpt/ml1m"))},
                repeats=args.repeats,
            )
        if not args.quick:
            rows = int(args.gb * 1e9 / 4 / 64 / 4)  # 4 tables of dim 64, float32
            need = 2.5 * args.gb + 2
            if _mem_available_gib() < need:
                result[f"tables_{args.gb:g}gb"] = {"skipped": f"MemAvailable {_mem_available_gib():.1f} GiB < {need}"}
            else:
                result[f"tables_{args.gb:g}gb"] = _case(
                    f"tables_{args.gb:g}gb", [rows] * 4, 64, {"local": scratch / "big"}, repeats=1
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    recorder.update(result)
    out = recorder.write(args.out or default_out("checkpoint_stall", args.quick))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
