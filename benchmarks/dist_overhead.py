"""The rank program of the overhead benchmark (started by ``benchmarks.overhead`` under torchrun).

One sharded model, two ways of training it, measured in alternating windows in the same
job so that both see the same machine load:

- **plain**: the uniform reader with batch size (K+1)*B and the accuracy-only strategy,
  i.e. ordinary TorchRec training (sharded EBCs, fused optimizer, the project's loop);
- **morec**: the MoRec reader (a uniform block of B plus K weighted blocks of B, with the
  coordinator's p_k) and ``MorecStrategy`` (decision before the step, combined loss with
  the coordinator's beta, fire-and-forget report after it), against the Ray actor.

Both run through ``morec_dist.train.loop.train_epoch`` (the production loop), so a window's
time excludes evaluation. Sampler updates need a validation pass (an evaluation), so the
measured windows contain none; one signal measurement is timed on its own and reported
with its amortised cost at the configured cadence. The step counter of each method is
kept separately so that the coordinator sees consecutive steps.

Writes rank 0's measurements as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from morec_dist.config import load_config
from morec_dist.distributed import init_distributed, shutdown_distributed
from morec_dist.train.loop import train_epoch
from morec_dist.train.methods import build_morec
from morec_dist.train.runner import make_reader, open_dataset_for_job
from morec_dist.train.strategies import AccuracyOnly
from morec_dist.train.trainer import Trainer, build_features


class Method:
    """A reader, a strategy and its own step counter on the shared trainer."""

    def __init__(self, name: str, reader: Any, strategy: Any, client: Any = None):
        self.name, self.reader, self.strategy, self.client = name, reader, strategy, client
        self.step = 0
        self.windows: list[dict[str, float]] = []

    def wait_seconds(self) -> float:
        return float(self.client.stats()["wait_seconds"]) if self.client is not None else 0.0

    def run(self, trainer: Trainer, steps: int, record: bool) -> None:
        """``steps`` training steps (crossing epochs if needed); records rows/s of the window."""
        rows, seconds, reader_wait, done = 0, 0.0, 0.0, 0
        coordinator_wait = self.wait_seconds()
        while done < steps:
            trainer.step = self.step
            stats = train_epoch(
                trainer,
                self.reader,
                self.strategy,
                epoch=self.reader.epoch,
                log_every=0,
                max_steps=self.step + steps - done,
            )
            self.step = trainer.step
            if stats.steps == 0:
                raise RuntimeError(f"{self.name}: the reader yielded no batch at step {self.step}")
            done += stats.steps
            rows += stats.rows
            seconds += stats.seconds
            reader_wait += stats.reader_wait_s
        # the slowest rank sets the pace of a collective step
        seconds = all_reduce_max(seconds, trainer)
        coordinator_wait = all_reduce_max(self.wait_seconds() - coordinator_wait, trainer)
        if record:
            self.windows.append(
                {
                    "steps": done,
                    "rows": rows,
                    "seconds": seconds,
                    "rows_per_s": rows / seconds,
                    "reader_wait_s": reader_wait,
                    "coordinator_wait_s": coordinator_wait,
                }
            )


def all_reduce_max(value: float, trainer: Trainer) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    if trainer.ctx.pg is not None and trainer.ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=trainer.ctx.pg)
    return float(tensor.item())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--warmup-steps", type=int, required=True)
    parser.add_argument("--window-steps", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--target-loss", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    ctx = init_distributed()
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    blocks = len(config.morec.objectives) + 1
    plain_config = copy.deepcopy(config)
    plain_config.data.batch_size = blocks * config.data.batch_size  # the same rows per step
    t = time.perf_counter()
    reader, strategy, client = build_morec(config, trainer, args.target_loss)
    morec_setup_s = time.perf_counter() - t
    methods = [
        Method("plain", make_reader(plain_config, trainer), AccuracyOnly()),
        Method("morec", reader, strategy, client),
    ]
    for method in methods:
        method.run(trainer, args.warmup_steps, record=False)
    for r in range(args.rounds):
        # alternate the order so that neither method always follows the other
        for method in methods if r % 2 == 0 else methods[::-1]:
            method.run(trainer, args.window_steps, record=True)
    # one sampler-signal measurement (a data-parallel validation pass), timed on its own
    t = time.perf_counter()
    strategy.measure_signals(methods[1].step)
    signal_s = all_reduce_max(time.perf_counter() - t, trainer)
    client.close()  # drains the global protocol's collectives (a flush for per_rank)
    for method in methods:
        method.reader.close()
    if ctx.rank == 0:
        result = {
            "world_size": ctx.world_size,
            "blocks": blocks,
            "rows_per_step_per_rank": blocks * config.data.batch_size,
            "morec_setup_s": morec_setup_s,
            "sampler_signal_s": signal_s,
            "windows": {m.name: m.windows for m in methods},
            "client": client.stats(),
            "protocol": config.coordinator.protocol,
            "steps": {m.name: m.step for m in methods},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    shutdown_distributed(exit_code=0)


if __name__ == "__main__":
    main()
