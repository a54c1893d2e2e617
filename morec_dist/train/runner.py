"""The one job runner (like torchtitan's ``Trainer.train``): setup, resume, the epoch loop
with its checkpoint cadence, evaluation after every epoch, and the final record.

A job (``pretrain.py``, ``finetune.py``) supplies the parts that differ as hooks of a
``Job``: what it trains with (``build``: reader, strategy, coordinator), what it does before
the first step of a fresh run, what it records after each epoch (and whether it stops), and
its final fields. Everything else is here, once:

1. join the process group (``distributed.py``), open the dataset, build the ``Trainer``;
2. find the step checkpoint to resume (``resume.py``), let the job build its parts, restore
   trainer, reader, RNG, strategy and the ``JobState`` from it;
3. per epoch: ``train_epoch`` (its steps run by the driver ``train.pipeline`` picks,
   ``train/pipelined.py``) with step checkpoints every ``checkpoint.every_steps`` and a
   SIGTERM stop at a step boundary, evaluation on valid, the job's epoch hook, the epoch-end
   checkpoint, the preemption check. A SIGTERM at the epoch's last step, or during its
   evaluation, checkpoints that step; the resumed job evaluates the epoch without training it
   again (``steps_done``, ``finished_epoch``);
4. close the parts, the job's final record, and ``metrics.json`` (rank 0, atomically).

The evaluation helpers every job uses (``evaluation``, ``evaluated_metrics``, ``select_metric``, ``report_k``) and
the job setup (``open_dataset_for_job``, ``make_reader``, ``load_pretrained``, ``setup_job``) live here too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from morec_dist.config import Config
from morec_dist.coordinator.objectives import OBJECTIVE_KINDS, kind_metrics
from morec_dist.data import storage
from morec_dist.data.dataset import VERIFIED_ENV, PreparedDataset
from morec_dist.data.reader import Reader
from morec_dist.data.storage import StoragePath
from morec_dist.distributed import DistContext, init_job_distributed
from morec_dist.eval.evaluator import evaluate
from morec_dist.eval.ranking import EvalOptions, EvaluationInterrupted
from morec_dist.train.checkpoint import check_compatible, load_checkpoint, read_meta
from morec_dist.train.job_state import JobState
from morec_dist.train.loop import (
    EpochProgress,
    PlainDriver,
    StepDriver,
    Strategy,
    epoch_stats,
    open_rank_observer,
    progress,
    train_epoch,
)
from morec_dist.train.pipelined import make_driver
from morec_dist.train.preemption import EXIT_PREEMPTED, exit_interrupted, sigterm_requested
from morec_dist.train.resume import Checkpointed, Checkpointing, ResumePoint
from morec_dist.train.run_dir import provenance, run_path, write_json_atomic
from morec_dist.train.trainer import EpochStats, Trainer, build_features

if TYPE_CHECKING:
    from morec_dist.coordinator.client import RankClient
    from morec_dist.observe.metrics import RankMetrics

# ---------------------------------------------------------------------------- setup


def open_dataset_for_job(config: Config, ctx: DistContext) -> PreparedDataset:
    # rank 0 verifies checksums and values (unless the parent just did); the others trust the same files
    verified = os.environ.get(VERIFIED_ENV) == storage.uri_of(storage.location(config.data.path))
    full = ctx.rank == 0 and not verified
    return PreparedDataset.open(config.data.path, verify_checksums=full, verify_values=full)


def make_reader(config: Config, trainer: Trainer, **kwargs: Any) -> Reader:
    """This rank's reader of the trainer's dataset, with the trainer's features."""
    ctx = trainer.ctx
    return Reader(
        trainer.dataset,
        batch_size=config.data.batch_size,
        num_negatives=config.data.num_negatives,
        negative_alpha=config.data.negative_alpha,
        exclude_history_negatives=config.data.negatives_exclude_history,
        history_splits=tuple(config.data.negatives_history_splits),
        seed=kwargs.pop("seed", config.run.seed),
        rank=ctx.rank,
        world_size=ctx.world_size,
        features=trainer.features,
        prefetch_batches=config.data.prefetch_batches,
        **kwargs,
    )


def load_pretrained(trainer: Trainer, checkpoint: StoragePath) -> dict[str, Any]:
    """Collective: a saved model (``checkpoints/best`` / ``final``) into the trainer; its meta."""
    meta = read_meta(checkpoint)
    check_compatible(meta, trainer.model_identity(), checkpoint)
    load_checkpoint(checkpoint, trainer.model_state())
    return meta


def setup_job(config: Config) -> tuple[DistContext, PreparedDataset, Trainer]:
    """This rank's context, the dataset and the Trainer (sharded model + optimizer)."""
    ctx = init_job_distributed()
    dataset = open_dataset_for_job(config, ctx)
    trainer = Trainer(config, ctx, dataset, build_features(config, dataset))
    progress(
        ctx.rank, "table placement (sharding type / kernel, GiB per rank):\n" + "\n".join(trainer.placement.lines())
    )
    if trainer.huge_pages is not None and trainer.huge_pages.advised_bytes:
        huge = trainer.huge_pages
        collapsed, advised = huge.collapsed_bytes / 2**30, huge.advised_bytes / 2**30
        progress(ctx.rank, f"huge pages: {collapsed:.2f} of {advised:.2f} GiB of the tables and their optimizer state")
    return ctx, dataset, trainer


# ----------------------------------------------------------------------- evaluation


def report_k(config: Config) -> int:
    """The K of progress lines, the selection metric and the results table: ``eval.ks[0]``."""
    return config.eval.ks[0]


def select_metric(config: Config) -> str:
    """The metric early stopping and the best epoch are chosen by: NDCG at ``eval.ks[0]``."""
    return f"ndcg@{report_k(config)}"


def evaluated_metrics() -> list[str]:
    """The test metrics every job reports: those every registered objective kind names
    (``ObjectiveKind.test_metrics``; a plugin's kind included), accuracy's first."""
    return kind_metrics(OBJECTIVE_KINDS.names())


def evaluation(trainer: Trainer, split: str, on_sigterm: Callable[[], NoReturn] | None = None) -> dict[str, float]:
    """The evaluation protocol's metrics (every K of ``eval.ks``) of the trainer's model.
    A SIGTERM during it ends the job (``on_sigterm``, or with no new checkpoint)."""
    c, ctx = trainer.config, trainer.ctx
    options = EvalOptions(batch_users=c.eval.batch_users, stop=sigterm_requested)
    try:
        result = evaluate(
            trainer.model, trainer.dataset, split, c.eval.ks, trainer.features, ctx, options, evaluated_metrics()
        )
    except EvaluationInterrupted:
        if on_sigterm is not None:
            on_sigterm()
        exit_interrupted(ctx, f"evaluation on {split}")
    return result.metrics


# ------------------------------------------------------------------------- the job


@dataclass
class JobParts:
    """What a job trains with: built by ``Job.build``, checkpointed, closed at the end."""

    reader: Reader
    strategy: Strategy
    client: RankClient | None = None  # the coordinator client (MoRec), closed by the job's ``finish``
    coordinator: Callable[[], dict[str, Any] | None] | None = None  # its state for a step checkpoint
    extra_readers: list[Reader] = field(default_factory=list)  # closed with the reader

    def close(self) -> None:
        for reader in (self.reader, *self.extra_readers):
            reader.close()


@dataclass
class JobRun:
    """One running job, as its hooks see it."""

    config: Config
    ctx: DistContext
    dataset: PreparedDataset
    trainer: Trainer
    checkpoints: Checkpointing
    point: ResumePoint | None
    state: JobState = field(default_factory=JobState)
    parts: JobParts | None = None
    driver: StepDriver = field(default_factory=PlainDriver)  # how steps run (train.pipeline)
    epoch_sums: EpochProgress | None = None  # this rank's sums of the epoch after its latest step


class Job(Protocol):
    """The hooks of a training job; ``run_job`` does everything else."""

    kind: str  # the job's name in step checkpoints and metrics.json ("pretrain", "finetune:morec")

    def epochs(self, config: Config) -> int: ...

    def build(self, run: JobRun) -> JobParts:
        """After the trainer is built and the resume point found, before anything is restored."""
        ...

    def before_training(self, run: JobRun) -> None:
        """A fresh start only (not a resume): e.g. the metrics before the first step."""
        ...

    def end_epoch(self, run: JobRun, epoch: int, stats: EpochStats, valid: dict[str, float]) -> None:
        """Record the epoch into ``run.state`` (history, best, early stopping) and print it."""
        ...

    def finish(self, run: JobRun) -> dict[str, Any]:
        """After the last epoch (parts closed): the job's own fields of metrics.json."""
        ...

    def final_line(self, result: dict[str, Any]) -> str: ...


def checkpointed_epoch(
    run: JobRun, epoch: int, *, metrics: RankMetrics | None, resumed: EpochProgress | None
) -> EpochStats:
    """One epoch of ``train_epoch`` with the step checkpoints (and a preemption stop) of a job;
    adds the epoch's time and rows to the job state."""
    config, trainer, checkpoints, parts = run.config, run.trainer, run.checkpoints, run.parts
    assert parts is not None
    max_steps = config.train.max_steps
    reader = run.driver.reader_view(parts.reader)  # the trained position, if the driver draws ahead
    reader.set_epoch(epoch)
    trainer.epoch = epoch
    run.state.next_epoch = epoch  # a checkpoint inside the epoch continues it

    def after_step(done: EpochProgress) -> bool:
        run.epoch_sums = done
        ending = reader.step >= reader.num_batches or bool(max_steps and trainer.step >= max_steps)
        save, stop = checkpoints.due(trainer.step, ending)
        if save:  # in the background when configured, except the SIGTERM one (the job exits next)
            checkpoints.save(epoch_progress=done, background=not stop)
        return stop

    stats = train_epoch(
        trainer,
        reader,
        parts.strategy,
        epoch=epoch,
        log_every=config.train.log_every,
        max_steps=max_steps,
        metrics=metrics,
        resumed=resumed,
        after_step=after_step,
        driver=run.driver,
    )
    if stats.interrupted:
        checkpoints.exit_preempted()
    return counted(run, stats)


def counted(run: JobRun, stats: EpochStats) -> EpochStats:
    """``stats`` added to the job's training time and rows."""
    run.state.train_seconds += stats.seconds
    run.state.train_rows += stats.rows
    return stats


def steps_done(run: JobRun, epoch: int) -> bool:
    """Whether every step of the resumed ``epoch`` ran before the stop: it was checkpointed at
    its last step (or at ``train.max_steps``) by a SIGTERM at that step or during the epoch-end
    evaluation. The reader's position is then the next epoch's start."""
    assert run.parts is not None
    reader = run.driver.reader_view(run.parts.reader)
    max_steps = run.config.train.max_steps
    return int(reader.state_dict()["epoch"]) > epoch or bool(max_steps and run.trainer.step >= max_steps)


def finished_epoch(run: JobRun, epoch: int, resumed: EpochProgress) -> EpochStats:
    """A resumed epoch whose steps all ran: its statistics from the checkpointed sums (what
    ``train_epoch`` returned at its end), no step taken."""
    assert run.parts is not None
    run.trainer.epoch = epoch
    run.epoch_sums = resumed
    return counted(run, epoch_stats(run.trainer, run.parts.strategy, resumed))


def checkpoint_last_step_and_exit(run: JobRun) -> NoReturn:
    """SIGTERM during the epoch-end evaluation: the epoch's last step is checkpointed (unless
    it is the checkpoint this job resumed from), so a resume evaluates the epoch instead of
    training it again (with ``checkpoint.every_steps = 0`` the previous checkpoint is the
    previous epoch's end)."""
    checkpoints, trainer = run.checkpoints, run.trainer
    progress(trainer.ctx.rank, f"SIGTERM during the epoch-end evaluation: checkpointing step {trainer.step}")
    if trainer.step != checkpoints.last_saved_step:
        checkpoints.save(epoch_progress=run.epoch_sums)
    checkpoints.exit_preempted()
    raise SystemExit(EXIT_PREEMPTED)  # not reached: exit_preempted leaves through os._exit


def run_job(config: Config, job: Job, resume: bool | None = None) -> dict[str, Any]:
    """Run ``job`` on this rank from setup to ``metrics.json``; returns the record."""
    started = time.perf_counter()
    ctx, dataset, trainer = setup_job(config)
    checkpoints = Checkpointing(config, trainer, job.kind)
    point = checkpoints.resume_point(config.run.resume if resume is None else resume)
    run = JobRun(config, ctx, dataset, trainer, checkpoints, point)
    parts = run.parts = job.build(run)
    run.driver = make_driver(config, ctx, trainer, parts.strategy)
    metrics, exporter = open_rank_observer(config, ctx)
    if metrics is not None:
        metrics.observe_placement(trainer.placement.rank_tables(ctx.rank))
    checkpoints.attach(Checkpointed(run.driver.reader_view(parts.reader), parts.strategy, run.state, parts.coordinator))
    resumed = None
    if point is not None:
        checkpoints.restore(point)
        resumed = point.epoch_progress
    else:
        job.before_training(run)
    start_epoch = run.state.next_epoch
    max_steps = config.train.max_steps
    for epoch in range(start_epoch, job.epochs(config)):
        carried = resumed if epoch == start_epoch else None
        if carried is not None and steps_done(run, epoch):
            stats = finished_epoch(run, epoch, carried)
        elif run.state.stopped or (max_steps and trainer.step >= max_steps):
            break
        else:
            stats = checkpointed_epoch(run, epoch, metrics=metrics, resumed=carried)
        valid = evaluation(trainer, "valid", on_sigterm=lambda: checkpoint_last_step_and_exit(run))
        job.end_epoch(run, epoch, stats, valid)
        run.state.next_epoch = epoch + 1
        checkpoints.save()
        if checkpoints.preemption.agreed(ctx):
            checkpoints.exit_preempted()
    parts.close()
    if exporter is not None:
        exporter.stop()
    result = {
        **job.finish(run),
        "resumed_from": str(point.path) if point is not None else None,
        "checkpoints_written": checkpoints.saved,
        "checkpoint_stall_s": checkpoints.stalls,
        **checkpoints.config_record(),  # the fingerprint, and earlier configurations (--resume-changed)
        "wall_s": time.perf_counter() - started,
        "train_rows_per_s": run.state.train_rows_per_s,
        "step_driver": run.driver.name,  # "sparse_dist" (TorchRec's pipeline) or "none" (train.pipeline)
        "placement": trainer.placement.record(),
        **provenance(config, ctx.world_size),
    }
    if ctx.rank == 0:
        path = run_path(config.run.out_dir) / "metrics.json"  # a URI too: the stage's marker on a store
        write_json_atomic(path, result)
        progress(ctx.rank, f"{job.final_line(result)}; wrote {path}")
    return result
