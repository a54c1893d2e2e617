"""The epoch loop shared by every job: batches in, strategy loss, optimizer step, stats out.

A ``Strategy`` decides what one step optimises from the batch's scores and per-row losses
(pretraining: the mean; MoRec: the coordinated combination; baselines: theirs; see
``morec_dist.train.strategies``); the loop owns timing, progress lines and the all-rank
epoch statistics. How a step runs is a ``StepDriver``'s: ``PlainDriver`` here (before_step,
draw, forward, strategy loss, backward and optimizer step, one step at a time), or TorchRec's
``TrainPipelineSparseDist`` (``train/pipelined.py``); the loop's bookkeeping is the same for both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from morec_dist.config import Config
from morec_dist.data.batch import Batch
from morec_dist.distributed import DistContext, all_reduce_sum
from morec_dist.train.trainer import EpochStats, Trainer

if TYPE_CHECKING:
    from morec_dist.observe.metrics import Exporter, RankMetrics


class Strategy(Protocol):
    """What one step optimises (``morec_dist.train.strategies``); a ``Stateful`` whose
    ``state_dict`` is exactly what it exports into step checkpoints."""

    name: str
    rank_local: tuple[str, ...]  # state keys a resume at another world size starts afresh

    def before_step(self, step: int) -> None:
        """Called before the step's batch is drawn (e.g. to apply new sampling probabilities);
        under the pipelined driver (``pipeline_exact`` strategies only) before the step runs,
        after its batch was drawn."""
        ...

    def step_loss(self, scores: torch.Tensor, per_row: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        """The scalar to back-propagate for this step."""
        ...

    def after_step(self, per_row: torch.Tensor, batch: Batch, step: int) -> None:
        """Called after the optimizer step (e.g. to report losses)."""
        ...

    def epoch_summary(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exactly the keys of ``state_dict``; a missing or unknown one is an error."""
        ...


@dataclass
class EpochProgress:
    """This rank's running sums of the epoch in progress (checkpointed, so a resumed epoch
    reports the same statistics as an uninterrupted one)."""

    loss_sum: float = 0.0
    rows: int = 0
    steps: int = 0
    wait: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "loss_sum": self.loss_sum,
            "rows": self.rows,
            "steps": self.steps,
            "wait": self.wait,
            "seconds": self.seconds,
        }


# Called after every step with the epoch's progress; True = stop the epoch now (preemption).
StepHook = Callable[[EpochProgress], bool]


def progress(rank: int, message: str) -> None:
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def open_rank_observer(config: Config, ctx: DistContext) -> tuple[RankMetrics | None, Exporter | None]:
    """(RankMetrics, exporter) when ``metrics.enabled``, else (None, None)."""
    if not config.metrics.enabled:
        return None, None
    from morec_dist.observe.metrics import open_rank_metrics

    return open_rank_metrics(config.metrics, ctx.rank, ctx.local_rank)


def observe(
    metrics: Any, strategy: Any, step: int, batch: Batch, per_row: torch.Tensor, duration: float, wait: float
) -> None:
    """One step into the rank's Prometheus metrics (block losses read by block name)."""
    names = getattr(strategy, "block_names", ["accuracy"])
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(
        0, batch.block_ids.cpu(), per_row.detach().cpu().to(torch.float64)
    )
    counts = torch.bincount(batch.block_ids.cpu(), minlength=len(names)).clamp_min(1)
    metrics.observe_step(
        step=step,
        rows=batch.num_rows,
        duration_s=duration,
        reader_wait_s=wait,
        block_losses=dict(zip(names, (sums / counts).tolist(), strict=True)),
        staleness=getattr(strategy, "staleness_steps", 0),
        report_latency_s=getattr(strategy, "last_report_s", 0.0),
        waited=getattr(strategy, "last_waited", False),
    )


@dataclass
class StepResult:
    """One trained step, as the loop books it."""

    batch: Batch
    per_row: torch.Tensor  # detached per-row losses
    started: float  # perf_counter before the step (its draw included)
    wait: float  # seconds this step spent waiting for the reader


class StepSource(Protocol):
    """One epoch's steps: each ``next_step`` trains one step (``trainer.step`` advanced) or
    returns None at the end of the reader's epoch; ``waited`` is the seconds spent waiting
    for the reader so far (the last, empty draw included); ``close`` ends the epoch's iteration."""

    @property
    def waited(self) -> float: ...

    def next_step(self) -> StepResult | None: ...

    def close(self) -> None: ...


class StepDriver(Protocol):
    """How steps run: ``epoch`` opens one epoch of ``reader`` (positioned at it);
    ``reader_view`` is what the step checkpoints and the runner read as the reader's position
    (a driver that draws ahead reports the trained position)."""

    name: str

    def reader_view(self, reader: Any) -> Any: ...

    def epoch(self, trainer: Trainer, reader: Any, strategy: Strategy) -> StepSource: ...


class PlainSteps:
    """One step at a time: before_step, draw, forward, strategy loss, backward, optimizer."""

    def __init__(self, trainer: Trainer, reader: Any, strategy: Strategy):
        self.trainer, self.strategy = trainer, strategy
        self.batches = iter(reader)
        self.waited = 0.0

    def next_step(self) -> StepResult | None:
        trainer, strategy = self.trainer, self.strategy
        strategy.before_step(trainer.step)
        t0 = time.perf_counter()
        batch = next(self.batches, None)
        step_wait = time.perf_counter() - t0
        self.waited += step_wait
        if batch is None:
            return None
        batch = batch.to(trainer.ctx.device)
        scores = trainer.model(batch)
        per_row = trainer.loss_fn(scores)
        loss = strategy.step_loss(scores, per_row, batch, trainer.step)
        trainer.apply(loss)
        return StepResult(batch, per_row.detach(), t0, step_wait)

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


class PlainDriver:
    name = "none"

    def reader_view(self, reader: Any) -> Any:
        return reader

    def epoch(self, trainer: Trainer, reader: Any, strategy: Strategy) -> StepSource:
        return PlainSteps(trainer, reader, strategy)


def train_epoch(
    trainer: Trainer,
    reader: Any,
    strategy: Strategy,
    *,
    epoch: int,
    log_every: int,
    max_steps: int = 0,
    metrics: Any = None,
    resumed: EpochProgress | None = None,
    after_step: StepHook | None = None,
    driver: StepDriver | None = None,
) -> EpochStats:
    """One pass of ``reader`` (already positioned at ``epoch``, possibly mid-epoch with the
    ``resumed`` sums of its first part); returns all-rank stats. ``after_step`` may
    checkpoint and may stop the epoch early (``EpochStats.interrupted``). ``driver`` runs
    the steps (default: ``PlainDriver``)."""
    ctx = trainer.ctx
    trainer.model.train()
    done = resumed or EpochProgress()
    loss_sum, rows, steps, wait = done.loss_sum, done.rows, done.steps, done.wait
    interrupted = False
    started = time.perf_counter() - done.seconds
    source = (driver or PlainDriver()).epoch(trainer, reader, strategy)
    total = getattr(reader, "num_batches", 0)
    while True:
        if max_steps and trainer.step >= max_steps:
            break
        result = source.next_step()
        wait = done.wait + source.waited
        if result is None:
            break
        batch, per_row = result.batch, result.per_row
        strategy.after_step(per_row, batch, trainer.step - 1)
        if metrics is not None:
            observe(
                metrics, strategy, trainer.step - 1, batch, per_row, time.perf_counter() - result.started, result.wait
            )
        loss_sum += float(per_row.sum())
        rows += batch.num_rows
        steps += 1
        if log_every and steps % log_every == 0:
            elapsed = time.perf_counter() - started
            progress(
                ctx.rank,
                f"[{strategy.name}] epoch {epoch} step {steps}/{total} loss {loss_sum / max(rows, 1):.4f} "
                f"rows/s/rank {rows / elapsed:,.0f} reader wait {100 * wait / elapsed:.1f}%",
            )
        if after_step is not None and after_step(
            EpochProgress(loss_sum, rows, steps, wait, time.perf_counter() - started)
        ):
            interrupted = True
            break
    source.close()
    done = EpochProgress(loss_sum, rows, steps, wait, time.perf_counter() - started)
    return epoch_stats(trainer, strategy, done, interrupted)


def epoch_stats(trainer: Trainer, strategy: Strategy, done: EpochProgress, interrupted: bool = False) -> EpochStats:
    """The all-rank statistics of an epoch from this rank's sums (a collective)."""
    g_loss, g_rows, g_wait = all_reduce_sum([done.loss_sum, float(done.rows), done.wait], trainer.ctx)
    return EpochStats(
        loss_sum=g_loss,
        rows=int(g_rows),
        steps=done.steps,
        seconds=done.seconds,
        reader_wait_s=g_wait / trainer.ctx.world_size,
        extra=strategy.epoch_summary(),
        interrupted=interrupted,
    )
