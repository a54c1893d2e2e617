"""Step checkpoints, exact resume and graceful preemption of a training job.

Owns ``<run.out_dir>/checkpoints/step-<N>``: what goes into a step checkpoint, when one is
taken, which one a job resumes from, and how the state comes back.

- **When**: every ``checkpoint.every_steps`` steps (at a step boundary, all ranks), at the
  end of every epoch (after its evaluation), and on SIGTERM: the handler only sets a flag;
  after each step the ranks agree on it with an all_reduce (so all stop at the same step),
  checkpoint, and exit with ``EXIT_PREEMPTED`` (143, "terminated by SIGTERM"). The newest
  ``checkpoint.keep_last`` are kept.
- **What**: the Trainer (sharded model + optimizer + step/epoch, DCP); per rank
  (``rank-<r>.json``): the reader's position and probabilities snapshot, the RNG states
  (torch, numpy, python), the running sums of the epoch in progress and the strategy's
  bookkeeping; in ``meta.json``: the config, world size, model identity, the job's
  bookkeeping (history, best epoch, ...) and, for MoRec, the coordinator's state (taken
  after every rank flushed its reports, so it holds every step < N).
- **Resume**: a job started with ``run.resume`` (the default; ``--no-resume`` refuses)
  and a complete step checkpoint under its out_dir restores all of it and continues at
  step N. With the same world size the continuation is exact: every batch is a pure
  function of (seed, rank, epoch, step, p version) and every coordinator decision a pure
  function of the reports, so weights and coordinator trace end bit-identical to an
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
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from morec_dist.config import Config
from morec_dist.train.checkpoint import (
    CheckpointError,
    check_compatible,
    dcp_load,
    latest_checkpoint,
    prune_checkpoints,
    read_meta,
    read_rank_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from morec_dist.train.loop import EpochProgress
from morec_dist.train.run_dir import provenance

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a launcher sees a preemption, not a success
# After SIGTERM a rank that cannot reach its step boundary (a peer died inside a collective)
# leaves after this long anyway; a checkpoint cut short stays a harmless .tmp.
SIGTERM_GRACE_S = 25.0
FORMAT = 1


# ------------------------------------------------------------------- restarted groups


def join_restarted_group() -> None:
    """Join the process group of a group torchrun *restarted* (``--max-restarts``), with
    this attempt's keys under their own store prefix.

    torch 2.13's standalone agent keeps its TCPStore across restarts, and the keys the
    gloo rendezvous writes (``default_pg/...``) are the same in every attempt: a restarted
    rank can read the address of a peer of the failed attempt and hang or fail in
    connectFullMesh. The first attempt takes the normal path (``init_distributed``)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    from datetime import timedelta

    from morec_dist.model.sharding import pick_device_and_backend

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timedelta(minutes=10),
    )
    device, backend = pick_device_and_backend(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"/morec/attempt-{restart}", store),
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )


# ------------------------------------------------------------------------ RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON (torch CPU, numpy's legacy global, python)."""
    np_state: Any = np.random.get_state()  # the legacy tuple (numpy types it as tuple | dict)
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


# ------------------------------------------------------------------------ preemption


class PreemptionFlag:
    """SIGTERM sets a flag (nothing else happens in the handler); ``agreed`` makes every
    rank see the same answer at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second SIGTERM: stop waiting for the step boundary
            raise SystemExit(EXIT_PREEMPTED)
        self.requested = True
        print("SIGTERM: checkpointing at the next step boundary, then exiting", file=sys.stderr, flush=True)
        timer = threading.Timer(SIGTERM_GRACE_S, os._exit, args=(EXIT_PREEMPTED,))
        timer.daemon = True
        timer.start()

    def agreed(self, pg: Any = None, world_size: int = 1) -> bool:
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int64)
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        return bool(flag.item())


# ------------------------------------------------------------------------ resume point


@dataclass
class ResumePoint:
    """What a job restores from a step checkpoint, already mapped onto this rank."""

    path: Path
    meta: dict[str, Any]
    rank_state: dict[str, Any]
    same_world: bool

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def job(self) -> dict[str, Any]:
        return self.meta.get("job", {})

    @property
    def coordinator(self) -> dict[str, Any] | None:
        return self.meta.get("coordinator")

    @property
    def next_epoch(self) -> int:
        return int(self.job.get("next_epoch", 0))

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


def reader_state_for(saved: dict[str, Any], reader: Any) -> dict[str, Any]:
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


class Checkpointing:
    """One job's step checkpoints: finding the one to resume, saving, pruning, SIGTERM."""

    def __init__(self, config: Config, trainer: Any, job: str):
        self.config = config
        self.trainer = trainer
        self.job = job
        self.root = Path(config.run.out_dir) / "checkpoints"
        self.every = config.checkpoint.every_steps
        self.keep_last = config.checkpoint.keep_last
        self.preemption = PreemptionFlag().install()
        self.last_saved_step = -1
        self.saved: list[int] = []

    @property
    def ctx(self) -> Any:
        return self.trainer.ctx

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
                    f"[{self.job}] not resuming (--no-resume / run.resume=false); {path} is ignored and will be "
                    "superseded",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        meta = read_meta(path)
        if meta.get("job_kind") != self.job:
            raise CheckpointError(
                f"{path}: a checkpoint of job {meta.get('job_kind')!r}, this is {self.job!r}; use another run.out_dir"
            )
        check_compatible(meta, self.trainer.model_identity(), path)
        saved_world = int(meta.get("world_size", 0))
        same = saved_world == ctx.world_size
        if not same and not self.config.checkpoint.reshard:
            raise CheckpointError(
                f"{path}: written by {saved_world} ranks, this job has {ctx.world_size}; "
                "set checkpoint.reshard=true to resume at another world size (not bit-exact)"
            )
        rank_state = read_rank_state(path, ctx.rank if same else 0)
        return ResumePoint(path, meta, rank_state, same)

    def restore(self, point: ResumePoint, reader: Any, strategy: Any = None) -> None:
        """Collective: trainer (DCP, resharding if needed), reader, RNG, strategy."""
        ctx = self.ctx
        state = self.trainer.state_dict()
        dcp_load(state, point.path)
        self.trainer.load_state_dict(state)
        saved_reader = point.rank_state["reader"]
        reader.load_state_dict(saved_reader if point.same_world else reader_state_for(saved_reader, reader))
        if point.same_world:
            set_rng_state(point.rank_state["rng"])
        if strategy is not None:
            load_strategy_state(strategy, point.rank_state.get("strategy", {}), point.same_world)
        self.last_saved_step = point.step
        mode = "exact" if point.same_world else f"resharded from {point.meta.get('world_size')} ranks (not bit-exact)"
        if ctx.rank == 0:
            print(
                f"[{self.job}] resuming from {point.path} at step {point.step}, epoch {point.next_epoch} ({mode})",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------- saving
    def due(self, step: int, epoch_ending: bool) -> tuple[bool, bool]:
        """(save now, stop after saving) after ``step`` steps; a collective (the SIGTERM flag)."""
        stop = self.preemption.agreed(self.ctx.pg, self.ctx.world_size)
        if epoch_ending:  # the epoch-end checkpoint (after evaluation) follows
            return False, stop
        periodic = bool(self.every) and step % self.every == 0
        return (periodic or stop) and step != self.last_saved_step, stop

    def save(
        self,
        *,
        reader: Any,
        next_epoch: int,
        job_state: dict[str, Any],
        epoch_progress: EpochProgress | None = None,
        strategy: Any = None,
        coordinator: Callable[[], dict[str, Any] | None] | None = None,
    ) -> Path:
        """Collective: write ``step-<trainer.step>`` atomically, then prune old ones."""
        ctx, trainer = self.ctx, self.trainer
        coordinator_state = coordinator() if coordinator is not None else None
        rank_state = {
            "format": FORMAT,
            "rank": ctx.rank,
            "reader": reader.state_dict(),
            "rng": rng_state(),
            "epoch_progress": epoch_progress.as_dict() if epoch_progress else None,
            "strategy": strategy_state(strategy) if strategy is not None else {},
        }
        meta = {
            "format": FORMAT,
            "job_kind": self.job,
            "model": trainer.model_identity(),
            "step": trainer.step,
            "epoch": trainer.epoch,
            "job": {**job_state, "next_epoch": next_epoch},
            "coordinator": coordinator_state,
            **provenance(self.config, ctx.world_size),
        }
        path = save_checkpoint(self.root / f"step-{trainer.step}", trainer.state_dict(), _jsonable(meta), rank_state)
        if ctx.rank == 0:
            prune_checkpoints(self.root, self.keep_last)
        self.last_saved_step = trainer.step
        self.saved.append(trainer.step)
        if ctx.rank == 0:
            print(f"[{self.job}] checkpoint {path} (step {trainer.step})", file=sys.stderr, flush=True)
        return path

    def exit_preempted(self) -> None:
        """After the SIGTERM checkpoint: leave every rank with EXIT_PREEMPTED."""
        from morec_dist.model.sharding import shutdown_distributed
        from morec_dist.train.launch import report_preempted

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


# ------------------------------------------------------------------ strategy state

# Per-rank bookkeeping of the strategies (lists and running sums); nothing else in them is state.
_STRATEGY_LISTS = ("sampler_updates", "trace")
_STRATEGY_TENSORS = ("sums", "alpha_sums")


def strategy_state(strategy: Any) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in _STRATEGY_LISTS:
        if hasattr(strategy, name):
            state[name] = [list(x) if isinstance(x, tuple) else x for x in getattr(strategy, name)]
    for name in _STRATEGY_TENSORS:
        if hasattr(strategy, name):
            state[name] = getattr(strategy, name).tolist()
    if hasattr(strategy, "steps"):
        state["steps"] = int(strategy.steps)
    return state


def load_strategy_state(strategy: Any, state: dict[str, Any], same_world: bool) -> None:
    for name in _STRATEGY_LISTS:
        if name in state and hasattr(strategy, name):
            value = state[name]
            setattr(strategy, name, [tuple(x) for x in value] if name == "trace" else value)
    if not same_world:
        return  # running sums of another rank layout mean nothing here
    for name in _STRATEGY_TENSORS:
        if name in state and hasattr(strategy, name):
            setattr(strategy, name, torch.tensor(state[name], dtype=torch.float64))
    if "steps" in state and hasattr(strategy, "steps"):
        strategy.steps = int(state["steps"])


def checkpointed_epoch(
    trainer: Any,
    reader: Any,
    strategy: Any,
    checkpoints: Checkpointing,
    job: dict[str, Any],
    *,
    epoch: int,
    metrics: Any,
    resumed: Any,
    save_extra: dict[str, Any] | None = None,
) -> Any:
    """One epoch of ``train_epoch`` with the step checkpoints (and a preemption stop) of a job.

    ``save_extra`` goes to every step checkpoint (a fine-tuning job's strategy and
    coordinator). Adds the epoch's time and rows to ``job`` and returns its stats.
    """
    from morec_dist.train.loop import train_epoch

    config = trainer.config
    max_steps = config.train.max_steps
    save_extra = save_extra or {}
    reader.set_epoch(epoch)
    trainer.epoch = epoch

    def after_step(done: Any) -> bool:
        ending = reader.step >= reader.num_batches or bool(max_steps and trainer.step >= max_steps)
        save, stop = checkpoints.due(trainer.step, ending)
        if save:
            checkpoints.save(reader=reader, next_epoch=epoch, job_state=job, epoch_progress=done, **save_extra)
        return stop and not ending  # the epoch-end checkpoint handles a stop at the epoch's last step

    stats = train_epoch(
        trainer,
        reader,
        strategy,
        epoch=epoch,
        log_every=config.train.log_every,
        max_steps=max_steps,
        metrics=metrics,
        resumed=resumed,
        after_step=after_step,
    )
    if stats.interrupted:
        checkpoints.exit_preempted()
    job["train_seconds"] += stats.seconds
    job["train_rows"] += stats.rows
    return stats
