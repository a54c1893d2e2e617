"""The rank program of the embedding-scale benchmark (started by ``benchmarks.embedding_scale``).

It drives the product's own trainer, as ``morec train`` builds it, on one prepared synthetic
dataset: ``Trainer`` (the model on the meta device, the planner's placement under the
config's budgets, this rank's shards only), the uniform reader, the accuracy-only strategy,
``train_epoch`` and the step checkpoints of ``Checkpointing``. Per-epoch validation is the
one part of ``morec train`` left out: it scores the catalogue, which is the evaluation
benchmark's subject, not this one's.

``--phase train``: ``--warmup`` + ``--steps`` timed steps, a step checkpoint, then
``--after`` more steps and a digest of this rank's weights. ``--phase resume``: a fresh
trainer restores that checkpoint (trainer, reader, RNG) and trains the same ``--after``
steps; equal digests mean the resume was exact. Per rank: set-up time, median step time,
peak RSS over the phase (kernel high-water mark, reset through ``/proc/self/clear_refs``),
the placement's bytes. With ``--cgroup DIR`` each rank first moves itself into the memory
cgroup ``DIR-rank<r>`` that the driver made. Rank 0 writes all ranks' figures to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from benchmarks.common import peak_rss_mb, reset_peak_rss, rss_mb
from morec_dist.config import load_config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.distributed import init_distributed, shutdown_distributed
from morec_dist.model.placement import TableSpec, optimizer_state_bytes
from morec_dist.train.job_state import JobState
from morec_dist.train.loop import train_epoch
from morec_dist.train.resume import Checkpointed, Checkpointing
from morec_dist.train.runner import make_reader
from morec_dist.train.strategies import AccuracyOnly
from morec_dist.train.trainer import Trainer, build_features

JOB = "embedding-scale"


def join_cgroup(prefix: str, rank: int) -> str:
    group = f"{prefix}-rank{rank}"
    Path(group, "cgroup.procs").write_text(str(os.getpid()))
    return group


def weights_digest(model: torch.nn.Module, rows_per_chunk: int = 1 << 16) -> str:
    """sha256 over this rank's local weights (every shard, in key order), read in place a
    chunk of rows at a time (no copy of a shard: the 6 GiB cgroup point has no room for one)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensors = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        for t in tensors:
            h.update(key.encode())
            flat = t.detach().reshape(t.shape[0], -1) if t.dim() else t.detach().reshape(1, 1)
            for start in range(0, flat.shape[0], rows_per_chunk):
                h.update(flat[start : start + rows_per_chunk].contiguous().numpy().data)
    return h.hexdigest()


def run_steps(trainer: Trainer, reader: Any, strategy: Any, steps: int) -> list[float]:
    """``steps`` steps through the product's loop in one epoch pass, as ``morec train`` runs
    them, each timed from the end of the previous one (``after_step`` marks it). One pass,
    not a ``train_epoch`` call per step: that would open and close the reader's iteration
    at every step and time its start-up, which the product pays once per epoch."""
    marks = [time.perf_counter()]

    def mark(progress: Any) -> bool:
        marks.append(time.perf_counter())
        return False

    first = trainer.step
    stats = train_epoch(
        trainer, reader, strategy, epoch=reader.epoch, log_every=0, max_steps=first + steps, after_step=mark
    )
    if stats.steps != steps:
        raise RuntimeError(f"the reader ran out of batches at step {trainer.step}; prepare more rows")
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("train", "resume"), required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--after", type=int, default=3, help="steps after the checkpoint, in both phases")
    parser.add_argument("--cgroup", default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="config overrides (data.path=..., run.out_dir=...)")
    args = parser.parse_args()
    ctx = init_distributed()
    group = join_cgroup(args.cgroup, ctx.rank) if args.cgroup else None
    config = load_config(None, args.overrides)
    # the driver verified the dataset once (`morec inspect`), as the `morec` parent does for its ranks
    dataset = PreparedDataset.open(config.data.path, verify_checksums=False, verify_values=False)
    reset_peak_rss()
    rss_before = rss_mb()
    t = time.perf_counter()
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    reader, strategy = make_reader(config, trainer), AccuracyOnly()
    checkpoints = Checkpointing(config, trainer, JOB)
    checkpoints.attach(Checkpointed(reader, strategy, JobState()))
    setup_s = time.perf_counter() - t
    rss_after_setup = rss_mb()
    reader.set_epoch(0)
    times: list[float] = []
    if args.phase == "train":
        times = run_steps(trainer, reader, strategy, args.warmup + args.steps)[args.warmup :]
        checkpoints.save()
    else:
        point = checkpoints.resume_point(True)
        if point is None:
            raise RuntimeError(f"no checkpoint under {checkpoints.root} to resume")
        checkpoints.restore(point)
    run_steps(trainer, reader, strategy, args.after)
    specs = [TableSpec(name, rows, dim, 4) for name, (rows, dim) in trainer.model_identity()["tables"].items()]
    optimizer = sum(optimizer_state_bytes(s, config.optim.embedding_optimizer) for s in specs)
    mine = {
        "rank": ctx.rank,
        "cgroup": group,
        "setup_s": setup_s,
        "step_s": times,
        "rows_per_step": config.data.batch_size,
        "rss_mb_before": rss_before,
        "rss_mb_after_setup": rss_after_setup,
        "peak_rss_mb": peak_rss_mb(),
        "shard_bytes": trainer.placement.rank_bytes(ctx.rank),
        # the optimizer state follows the rows: this rank's share of the tables' state
        "optimizer_bytes": optimizer
        * trainer.placement.rank_bytes(ctx.rank)
        // max(sum(trainer.placement.rank_bytes(r) for r in range(ctx.world_size)), 1),
        "placement": trainer.placement.record(),
        "step": trainer.step,
        "digest": weights_digest(trainer.model),
    }
    reader.close()
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if ctx.rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"world_size": ctx.world_size, "ranks": everyone}, indent=1))
    shutdown_distributed(exit_code=0)


if __name__ == "__main__":
    main()
