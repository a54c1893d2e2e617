"""Step checkpoints and exact resume of a training job.

Owns ``<run.out_dir>/checkpoints/step-<N>`` (or ``<checkpoint.dir>/step-<N>``, a path or a
filesystem URI such as s3://...): what goes into a step checkpoint, when one is
taken, which one a job resumes from, and how the state comes back. Its neighbours own one
thing each: ``preemption.py`` the SIGTERM flag, ``rng.py`` the RNG states,
``distributed.py`` the rejoin of a restarted group, ``job_state.py`` the job's bookkeeping,
``runner.py`` the epoch loop that calls ``due`` / ``save``.

- **When**: every ``checkpoint.every_steps`` steps (at a step boundary, all ranks), at the
  end of every epoch (after its evaluation), and on SIGTERM: the handler only sets a flag;
  after each step the ranks agree on it with an all_reduce (so all stop at the same step),
  checkpoint, and exit with ``EXIT_PREEMPTED`` (143, "terminated by SIGTERM"); at the epoch's
  last step, or during its evaluation, the checkpoint is that last step's and the resumed job
  evaluates the epoch without training it again (``runner.steps_done``). The newest
  ``checkpoint.keep_last`` are kept. With ``checkpoint.async_save`` the periodic ones are
  written in the background (``checkpoint.start_checkpoint``): the step waits only for the
  state to be copied; rank 0 commits the save (meta.json) at a later step boundary once it
  has finished, and every rank waits for it before the next save (the epoch-end and SIGTERM
  saves stay synchronous, so a job never ends with a save in flight). ``stalls`` records
  how long each save held training up.
- **What**: the Trainer (sharded model + optimizer + step/epoch, DCP); per rank
  (``rank-<r>.json``): the reader's position and probabilities snapshot, the RNG states
  (torch, numpy, python), the running sums of the epoch in progress and the strategy's
  ``state_dict()``; in ``meta.json``: the config, world size, model identity, the job's
  ``JobState`` (history, best epoch, next epoch, ...) and, for MoRec, the coordinator's state (taken
  after every rank flushed its reports, so it holds every step < N); the fingerprint of the
  config's trajectory keys (``fingerprint.py``) and the earlier configurations of a run
  resumed under a changed one.
- **Resume**: a job started with ``run.resume`` (the default; ``--no-resume`` refuses)
  and a complete step checkpoint under its out_dir restores all of it and continues at
  step N. A checkpoint written under another configuration (another fingerprint) is
  refused, naming the keys that differ, unless ``run.resume_changed`` (``--resume-changed``):
  then the earlier configuration and the step at which the new one took over are kept in
  every later checkpoint and in ``metrics.json``. With the same world size and
  configuration the continuation is exact: every batch is a pure function of (seed, rank,
  epoch, step, p version) and every coordinator decision a pure function of the reports,
  so weights and coordinator trace end bit-identical to an
  uninterrupted run.
- **Resharding** (another world size, ``checkpoint.reshard``): DCP reshards model and
  optimizer; each new rank continues the saved epoch at the same *fraction* of its batches
  (``step * new_batches // old_batches``) with rank 0's probabilities snapshot, and the
  coordinator state is re-labelled for the new world size (it holds no pending reports at
  a checkpoint). Which rows the rest of that epoch shows differs from an uninterrupted run
  (some are seen twice, some not at all); from the next epoch on the stream is the normal
  one for the new world size. Exactness is only promised for the same world size.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.distributed as dist

from morec_dist.config import Config
from morec_dist.data.storage import StoragePath
from morec_dist.distributed import DistContext
from morec_dist.train.checkpoint import (
    CheckpointError,
    PendingCheckpoint,
    StagingBuffers,
    check_compatible,
    checkpoint_root,
    dcp_load,
    latest_checkpoint,
    prune_checkpoints,
    read_meta,
    read_rank_state,
    remove_partial_checkpoints,
    save_checkpoint,
    start_checkpoint,
)
from morec_dist.train.fingerprint import changed_keys, describe, fingerprint
from morec_dist.train.job_state import JobState
from morec_dist.train.loop import EpochProgress, Strategy
from morec_dist.train.preemption import EXIT_PREEMPTED, PreemptionFlag
from morec_dist.train.rng import rng_state, set_rng_state
from morec_dist.train.run_dir import provenance
from morec_dist.train.trainer import Trainer

# 2: the job's bookkeeping is a JobState and the strategy's a state_dict, both with exact keys
FORMAT = 2


@dataclass
class ResumePoint:
    """What a job restores from a step checkpoint, already mapped onto this rank."""

    path: StoragePath
    meta: dict[str, Any]
    rank_state: dict[str, Any]
    same_world: bool
    changes: dict[str, list[Any]] = field(default_factory=dict)  # trajectory keys: [saved, now]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def job(self) -> dict[str, Any]:
        return self.meta["job"]

    @property
    def coordinator(self) -> dict[str, Any] | None:
        return self.meta.get("coordinator")

    @property
    def next_epoch(self) -> int:
        return int(self.job["next_epoch"])

    @property
    def epoch_progress(self) -> EpochProgress | None:
        if not self.same_world:
            return None
        partial = self.rank_state.get("epoch_progress")
        return EpochProgress(**partial) if partial else None


def coordinator_state_for(state: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The saved coordinator state, relabelled for ``world_size`` (resharding). A step
    checkpoint holds no pending report (every rank flushed), so only the label changes."""
    if state.get("world_size") == world_size:
        return state
    if state.get("pending"):
        raise CheckpointError(f"coordinator state holds pending reports {sorted(state['pending'])}; cannot reshard it")
    return {**state, "world_size": world_size}


class ReaderState(Protocol):
    """What a step checkpoint saves and restores of a reader: the ``Reader``, or the step
    driver's view of it when the driver draws ahead (``train/pipelined.py``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def reader_state_for(saved: dict[str, Any], reader: ReaderState) -> dict[str, Any]:
    """Rank 0's saved reader state mapped onto ``reader`` (another rank / world size): the
    same epoch at the same fraction of its batches, the same probabilities snapshot. Group
    stream cursors are per rank share, which another world size cuts differently: they are
    dropped, and every group stream starts a new pass."""
    mine = reader.state_dict()
    old_batches = max(int(saved["num_batches"]), 1)
    step = int(saved["step"]) * mine["num_batches"] // old_batches
    mapped = {
        **saved,
        "rank": mine["rank"],
        "world_size": mine["world_size"],
        "num_batches": mine["num_batches"],
        "step": step,
    }
    mapped.pop("cursors", None)
    return mapped


def strategy_state_for(saved: dict[str, Any], strategy: Strategy, same_world: bool) -> dict[str, Any]:
    """The saved strategy state for this rank: on another world size its ``rank_local``
    keys (running sums of another rank layout) are the fresh strategy's own."""
    if same_world:
        return saved
    fresh = strategy.state_dict()
    return {**saved, **{key: fresh[key] for key in strategy.rank_local}}


@dataclass
class Checkpointed:
    """The parts of a job a step checkpoint holds besides the trainer."""

    reader: ReaderState
    strategy: Strategy
    job: JobState
    coordinator: Callable[[], dict[str, Any] | None] | None = None  # a collective, for MoRec


class Checkpointing:
    """One job's step checkpoints: finding the one to resume, saving, pruning, SIGTERM."""

    def __init__(self, config: Config, trainer: Trainer, job: str):
        self.config = config
        self.fingerprint = fingerprint(config.to_dict())  # fixed for the job: not recomputed per save
        self.trainer = trainer
        self.job = job
        self.root = checkpoint_root(config.run.out_dir, config.checkpoint.dir)
        self.every = config.checkpoint.every_steps
        self.keep_last = config.checkpoint.keep_last
        self.preemption = PreemptionFlag().install()
        self.last_saved_step = -1
        self.saved: list[int] = []
        self.stalls: list[float] = []  # seconds each save held the step up (the copy only, when async)
        self.pending: PendingCheckpoint | None = None  # an asynchronous save not committed yet
        self.buffers = StagingBuffers()  # the background saves' copy of the state, kept between saves
        self._pending_step = -1
        self.parts: Checkpointed | None = None
        # the configurations this run trained under before the current one (--resume-changed)
        self.config_history: list[dict[str, Any]] = []

    @property
    def ctx(self) -> DistContext:
        return self.trainer.ctx

    def attach(self, parts: Checkpointed) -> None:
        """What ``save`` writes and ``restore`` fills, once the job has built it."""
        self.parts = parts

    def _parts(self) -> Checkpointed:
        if self.parts is None:
            raise RuntimeError("Checkpointing: attach() the job's parts before saving or restoring")
        return self.parts

    # ------------------------------------------------------------------ finding
    def resume_point(self, enabled: bool) -> ResumePoint | None:
        """The latest complete step checkpoint, checked against this job, or None."""
        ctx = self.ctx
        if ctx.rank == 0:
            remove_partial_checkpoints(self.root)
        if dist.is_initialized():
            dist.barrier(group=ctx.pg)
        path = latest_checkpoint(self.root)
        if path is None:
            return None
        if not enabled:
            if ctx.rank == 0:
                print(
                    f"[{self.job}] not resuming (--no-resume / run.resume=false); "
                    f"{path} is ignored and will be superseded",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        meta = read_meta(path)
        if meta.get("job_kind") != self.job:
            raise CheckpointError(
                f"{path}: a checkpoint of job {meta.get('job_kind')!r}, this is {self.job!r}; use another run.out_dir"
            )
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: step checkpoint format {meta.get('format')!r}, this version reads {FORMAT}; "
                "start afresh with --no-resume or another run.out_dir"
            )
        check_compatible(meta, self.trainer.model_identity(), path)
        changes = self.check_config(meta, path)
        saved_world = int(meta.get("world_size", 0))
        same = saved_world == ctx.world_size
        if not same and not self.config.checkpoint.reshard:
            raise CheckpointError(
                f"{path}: written by {saved_world} ranks, this job has {ctx.world_size}; "
                "set checkpoint.reshard=true to resume at another world size (not bit-exact)"
            )
        rank_state = read_rank_state(path, ctx.rank if same else 0)
        return ResumePoint(path, meta, rank_state, same, changes)

    def check_config(self, meta: dict[str, Any], path: StoragePath) -> dict[str, list[Any]]:
        """The trajectory keys the checkpoint's config and this job's differ in: none, or
        allowed by ``run.resume_changed`` (recorded in ``config_history``); else a refusal."""
        saved = meta.get("config") or {}
        changes = changed_keys(saved, self.config.to_dict())
        if changes and not self.config.run.resume_changed:
            raise CheckpointError(
                f"{path}: written under another configuration ({describe(changes)}); start afresh with "
                "--no-resume, or use another run.out_dir (--resume-changed continues it, recorded as a changed run)"
            )
        self.config_history = list(meta.get("config_history") or [])
        if changes:
            step = int(meta["step"])
            entry = {"config": saved, "fingerprint": fingerprint(saved), "replaced_at_step": step, "changed": changes}
            self.config_history.append(entry)
        return changes

    def config_record(self) -> dict[str, Any]:
        """What meta.json and metrics.json say about the configurations the run trained under."""
        return {"config_fingerprint": self.fingerprint, "config_history": self.config_history}

    def restore(self, point: ResumePoint) -> None:
        """Collective: trainer (DCP, resharding if needed), reader, RNG, strategy, job state."""
        ctx, parts = self.ctx, self._parts()
        state = self.trainer.state_dict()
        dcp_load(state, point.path)
        self.trainer.load_state_dict(state)
        saved_reader = point.rank_state["reader"]
        parts.reader.load_state_dict(saved_reader if point.same_world else reader_state_for(saved_reader, parts.reader))
        if point.same_world:
            set_rng_state(point.rank_state["rng"])
        parts.strategy.load_state_dict(
            strategy_state_for(point.rank_state["strategy"], parts.strategy, point.same_world)
        )
        parts.job.load_state_dict(point.job)
        self.last_saved_step = point.step
        mode = "exact" if point.same_world else f"resharded from {point.meta.get('world_size')} ranks (not bit-exact)"
        if point.changes:  # neither configuration's run: never "exact"
            mode = f"under a changed configuration from step {point.step}: {describe(point.changes)}; --resume-changed"
        if ctx.rank == 0:
            print(
                f"[{self.job}] resuming from {point.path} at step {point.step}, epoch {point.next_epoch} ({mode})",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------- saving
    def due(self, step: int, epoch_ending: bool) -> tuple[bool, bool]:
        """(save now, stop after saving) after ``step`` steps; a collective (the SIGTERM flag).
        Commits a finished background save first (rank 0; nothing waits)."""
        self._settle(wait=False)
        stop = self.preemption.agreed(self.ctx)
        if epoch_ending and not stop:  # the epoch-end checkpoint (after evaluation) follows
            return False, False
        # a stop at the epoch's last step saves that step too: the evaluation would only see
        # the flag and leave, and the epoch-end checkpoint would never be written
        periodic = bool(self.every) and step % self.every == 0
        return (periodic or stop) and step != self.last_saved_step, stop

    def _settle(self, wait: bool) -> None:
        """The background save, if any: committed (rank 0) and forgotten once finished; with
        ``wait``, every rank first waits for its own part of it."""
        pending = self.pending
        if pending is None or not (wait or pending.done()):
            return
        if self.ctx.rank == 0:
            pending.commit()
            prune_checkpoints(self.root, self.keep_last)
            print(f"[{self.job}] checkpoint {pending.final} (step {self._pending_step})", file=sys.stderr, flush=True)
        else:
            pending.wait()
        self.pending = None

    def save(self, epoch_progress: EpochProgress | None = None, background: bool = False) -> StoragePath:
        """Collective: write ``step-<trainer.step>`` atomically, then prune old ones; with
        ``background`` and ``checkpoint.async_save``, start it and return (committed later)."""
        started = time.perf_counter()
        self._settle(wait=True)  # one save in flight at most, committed in step order
        ctx, trainer, parts = self.ctx, self.trainer, self._parts()
        coordinator_state = parts.coordinator() if parts.coordinator is not None else None
        rank_state = {
            "format": FORMAT,
            "rank": ctx.rank,
            "reader": parts.reader.state_dict(),
            "rng": rng_state(),
            "epoch_progress": epoch_progress.as_dict() if epoch_progress else None,
            "strategy": parts.strategy.state_dict(),
        }
        meta = {
            "format": FORMAT,
            "job_kind": self.job,
            "model": trainer.model_identity(),
            "step": trainer.step,
            "epoch": trainer.epoch,
            "job": parts.job.state_dict(),
            "coordinator": coordinator_state,
            **provenance(self.config, ctx.world_size),
            **self.config_record(),
        }
        target = self.root / f"step-{trainer.step}"
        self.last_saved_step = trainer.step
        self.saved.append(trainer.step)
        if background and self.config.checkpoint.async_save:
            self.pending = start_checkpoint(
                target, trainer.state_dict(), _jsonable(meta), _jsonable(rank_state), self.buffers
            )
            self._pending_step = trainer.step
            self.stalls.append(time.perf_counter() - started)
            return target
        path = save_checkpoint(target, trainer.state_dict(), _jsonable(meta), _jsonable(rank_state))
        if ctx.rank == 0:
            prune_checkpoints(self.root, self.keep_last)
        self.stalls.append(time.perf_counter() - started)
        if ctx.rank == 0:
            print(f"[{self.job}] checkpoint {path} (step {trainer.step})", file=sys.stderr, flush=True)
        return path

    def exit_preempted(self) -> None:
        """After the SIGTERM checkpoint: leave every rank with EXIT_PREEMPTED."""
        from morec_dist.distributed import shutdown_distributed
        from morec_dist.train.launch import report_preempted

        self._settle(wait=True)
        report_preempted()  # for the launcher: torchrun's own exit code does not say 143
        if self.ctx.rank == 0:
            print(
                f"[{self.job}] preempted: checkpoint at step {self.last_saved_step} written; exiting {EXIT_PREEMPTED}",
                file=sys.stderr,
                flush=True,
            )
        shutdown_distributed(exit_code=EXIT_PREEMPTED)


def _jsonable(payload: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(payload, default=float))
