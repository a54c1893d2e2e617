"""Checkpoints of sharded training state, written atomically with torch.distributed.checkpoint.

A checkpoint is a directory: DCP shards of the model and optimizer state (every rank writes
its own shards; DCP reshards on load, so a checkpoint from 2 ranks loads on 1) and
``meta.json`` (config, step, model identity, world size, versions, and the trainer's extra
state). It is written into ``<name>.tmp`` and renamed into place only after every rank has
finished, so a crash never leaves a half-written checkpoint under a valid name; the
presence of meta.json (written last) is what makes a directory a checkpoint.

Step checkpoints (``<run.out_dir>/checkpoints/step-<N>``, see ``morec_dist.train.resume``)
also hold one small JSON file per rank (``rank-<r>.json``: reader position, RNG states,
loop counters), written into the ``.tmp`` directory before the rename, so they are part
of the same atomic step. ``latest_checkpoint`` only ever returns a complete ``step-<N>``
(a ``.tmp`` / ``.old`` leftover of a crash is never taken). Nothing here unpickles: DCP
reads tensors, everything else is JSON.

A checkpoint may also live at a filesystem URI (``s3://bucket/run/checkpoints/step-N?...``,
``checkpoint.dir``): an object store has no rename, so the shards go straight under their
final prefix (DCP through ``checkpoint_storage.py``), the rank files beside them, and rank 0
writes ``meta.json`` last, after every rank's shards: the same rule, a checkpoint exists
exactly when its meta.json does. A prefix being rewritten (``best``) loses its meta.json
first, so it is never a mix of two saves.

``start_checkpoint`` is the asynchronous save (``checkpoint.async_save``): the state is
staged (copied) at the call, and everything else runs on the job's one background save
thread: the staging place and the rank files, then ``dcp.save`` on a process group of its
own, and on rank 0 the commit (meta.json, rename) on that thread as soon as its save has
finished, which DCP's final gather makes "every rank's shards are written" (``commit()``
at the step boundary then only waits). A crash before the commit leaves the
previous checkpoint the latest. The copy goes into CPU buffers a ``StagingBuffers`` keeps
from one save to the next (allocating and faulting in a 4 GB copy cost more than copying
into it), so a job's first background save pays the allocation and later ones a copy;
the price is one more copy of the checkpointed state in host memory. The thread is kept
too: ``dcp.async_save`` starts a new one per save, which at the ML-1M size cost more than
the copy (benchmarks/checkpoint_stall.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element  # the helper DefaultLoadPlanner uses (torch 2.13)
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from morec_dist.data import storage
from morec_dist.data.storage import Location, StoragePath
from morec_dist.train.checkpoint_meta import META, CheckpointError, checkpoint_location, read_meta

STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER_DIR = re.compile(r"^step-(\d+)\.(tmp|old)$")  # a save cut short by a crash


def _barrier(group: Any = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_write(path: StoragePath, text: str) -> None:
    if isinstance(path, Location):  # an upload is durable once it completes
        with path.fs.open_output_stream(path.path) as out:
            out.write(text.encode("utf-8"))
        return
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _dcp_target(where: StoragePath) -> dict[str, Any]:
    """dcp.save / async_save keyword arguments for a local directory or a Location."""
    if isinstance(where, Location):
        from morec_dist.train.checkpoint_storage import storage_writer

        return {"storage_writer": storage_writer(where)}
    return {"checkpoint_id": str(where)}


def _remove_remote(where: Location) -> None:
    """meta.json first (the checkpoint stops existing before any shard goes), then the rest."""
    if storage.exists(where / META):
        where.fs.delete_file((where / META).path)
    for path in storage.files_below(where):
        where.fs.delete_file(path)


def checkpoint_root(out_dir: str, where: str = "") -> StoragePath:
    """Where a job's checkpoints go: ``checkpoint.dir`` if set (a path or a URI), else
    ``<run.out_dir>/checkpoints`` (on the store when run.out_dir is a URI)."""
    return checkpoint_location(where) if where else checkpoint_location(out_dir) / "checkpoints"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def save_checkpoint(
    path: str | Path | Location,
    state: dict[str, Any],
    meta: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
) -> StoragePath:
    """Collective: every rank calls it with its state (model / optimizer state dicts) and,
    optionally, its own JSON-able ``rank_state`` (written as ``rank-<r>.json``)."""
    pending = _begin(checkpoint_location(path), rank_state)
    dcp.save(state, **_dcp_target(pending.staging))
    _barrier()
    pending.meta = meta
    if _is_rank0():
        pending.commit()
    _barrier()
    return pending.final


@dataclass
class PendingCheckpoint:
    """A save in flight: where it goes, its meta, its background future (async only)."""

    final: StoragePath
    meta: dict[str, Any] | None = None
    future: Future[Any] | None = None
    committed: bool = False  # an async save's rank 0 commits on the save thread itself

    @property
    def staging(self) -> StoragePath:
        """``<name>.tmp`` locally; the final prefix itself on a store."""
        return _staging_of(self.final)

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> None:
        """This rank's part of the save has finished (raises what the save raised)."""
        if self.future is not None:
            self.future.result()

    def commit(self) -> None:
        """Rank 0, after its save finished: meta.json last, then (locally) the rename. An
        asynchronous save has done this on its own thread already (nothing left but the wait)."""
        self.wait()
        if not self.committed:
            self._commit()

    def _commit(self) -> None:
        assert self.meta is not None, "commit() needs the checkpoint's meta"
        _fsync_write(self.staging / META, json.dumps(self.meta, indent=1, sort_keys=True, default=str))
        if isinstance(self.final, Path) and isinstance(self.staging, Path):
            old = self.final.with_name(self.final.name + ".old")
            if self.final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(self.final, old)
            os.rename(self.staging, self.final)
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True


def _staging_of(final: StoragePath) -> StoragePath:
    """Where a save is written before its commit: ``<name>.tmp`` locally, the prefix itself on a store."""
    return final.with_name(final.name + ".tmp") if isinstance(final, Path) else final


def _begin(final: StoragePath, rank_state: dict[str, Any] | None, group: Any = None) -> PendingCheckpoint:
    """Collective over ``group``: an empty staging place (rank 0), then every rank's own JSON in it."""
    staging = _staging_of(final)
    if _is_rank0():
        if isinstance(staging, Path):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        else:
            _remove_remote(staging)
    _barrier(group)
    if rank_state is not None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        _fsync_write(staging / rank_file(rank), json.dumps(rank_state, sort_keys=True))
    return PendingCheckpoint(final)


class StagingBuffers(BlockingAsyncStager):
    """DCP's blocking stager with its CPU copy kept between saves (``cache_staged_state_dict``),
    pinned only where there is an accelerator (torch 2.13 pins unconditionally, which fails on
    a CPU-only build). One per job: the state's structure is the same at every save; a save
    may reuse the buffers only after the previous one finished (``Checkpointing`` waits)."""

    def __init__(self) -> None:
        super().__init__(cache_staged_state_dict=True)
        self._worker: ThreadPoolExecutor | None = None

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        """Runs ``fn(*args)`` on the job's background save thread (started on first use)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="morec-checkpoint")
        return self._worker.submit(fn, *args)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # the helper BlockingAsyncStager itself uses (torch 2.13)
        from torch.distributed._state_dict_utils import _create_cpu_state_dict

        if self.state_dict_cache is None:
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_into(state_dict, self.state_dict_cache, self.type_check)


_PLAIN = (int, float, bool, str, bytes, io.BytesIO, type(None))


def _copy_into(source: Any, buffers: Any, type_check: bool) -> Any:
    """DCP's ``_copy_state_dict(source, buffers)`` (what ``BlockingAsyncStager`` stages with):
    ``source``'s structure with every tensor copied into its buffer and the other leaves as
    they are, walked here for plain dicts and tensors, which are what a training state is
    mostly made of; anything else (a ShardedTensor, a DTensor, a list, a structure that does
    not match the buffers) goes to DCP's helper, which also raises what it raises. DCP's
    generic walk cost ~0.1 ms more than this at the ML-1M size, on the step's time."""
    kind = type(source)
    if kind is torch.Tensor and type(buffers) is torch.Tensor:
        return buffers.copy_(source)
    if kind is dict and type(buffers) is dict and buffers.keys() == source.keys():
        return {key: _copy_into(value, buffers[key], type_check) for key, value in source.items()}
    if kind in _PLAIN:
        return source
    from torch.distributed._state_dict_utils import _copy_state_dict

    return _copy_state_dict(source, buffers, type_check=type_check)


def _stateful_to_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """What DCP's ``_stateful_to_state_dict`` does before ``async_save`` stages (a shallow copy,
    ``state_dict()`` of each ``Stateful`` value), without its per-call logging wrapper: that
    wrapper builds a message (a uuid4, the process group's rank and backend queries) for the
    call and again for every key, which was ~0.3 ms of the ~0.9 ms an ML-1M async save held
    the step (benchmarks/checkpoint_stall.py); the debug message it builds is dropped anyway."""
    return {key: value.state_dict() if _is_stateful(value) else value for key, value in state.items()}


def _is_stateful(value: Any) -> bool:
    """``isinstance(value, Stateful)`` (a runtime-checkable Protocol: both methods present),
    without the Protocol's per-call MRO walk (~70 µs a call, cold, on the step's time)."""
    if type(value) in (dict, torch.Tensor):
        return False
    return getattr(value, "state_dict", None) is not None and getattr(value, "load_state_dict", None) is not None


_ASYNC_GROUP: list[Any] = []


def _async_group() -> Any:
    """The process group of background saves (made on first use: every rank gets there at the
    same step): DCP's collectives run in their own thread and must not interleave with the
    training collectives of the main group."""
    if not dist.is_initialized():
        return None
    if not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo"))
    return _ASYNC_GROUP[0]


def start_checkpoint(
    path: str | Path | Location,
    state: dict[str, Any],
    meta: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    buffers: StagingBuffers | None = None,
) -> PendingCheckpoint:
    """Collective: begins an asynchronous save and returns at once: the state is copied before
    it does, into ``buffers`` when given (pass the same ones to every save of a job); rank 0
    calls ``commit()`` on the result when ``done()``, every rank ``wait()``s before its next
    save."""
    buffers = buffers if buffers is not None else StagingBuffers()
    staged = buffers.stage(_stateful_to_state_dict(state))
    pending = PendingCheckpoint(checkpoint_location(path), meta)
    pending.future = buffers.submit(_save_staged, pending, staged, rank_state, _async_group())
    return pending


def _save_staged(pending: PendingCheckpoint, staged: dict[str, Any], rank_state: Any, group: Any) -> None:
    """The background part of a save, every collective on ``group``: the staging place and
    the rank files, then DCP, then on rank 0 the commit (meta.json, fsync'd, and the rename):
    rank 0's ``dcp.save`` returns only after DCP's final gather of every rank's write results,
    so every rank's shards are written by then. Committing here keeps the JSON, the fsync and
    the rename off the training thread (``commit()`` there only waits)."""
    _begin(pending.final, rank_state, group)
    dcp.save(staged, process_group=group, **_dcp_target(pending.staging))
    if _is_rank0():
        pending._commit()


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], path: StoragePath) -> None:
    """The model identity (name, table shapes) of a checkpoint must match the model built now."""
    for key, value in expected.items():
        if meta.get("model", {}).get(key) != value:
            raise CheckpointError(
                f"{path}: checkpoint model {key} = {meta.get('model', {}).get(key)!r}, but this job builds {value!r}"
            )


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor entries (optimizer hyper-parameters, ...) are read with
    ``torch.load(weights_only=True)``: DCP's default unpickles them with
    ``weights_only=False``, which would run code hidden in a crafted checkpoint."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:  # broad on purpose: an unpickling error names what was refused
            lines = [
                line.strip()
                for line in str(exc).splitlines()
                if "Unsupported global" in line or "WeightsUnpickler" in line
            ]
            why = lines[0] if lines else str(exc).splitlines()[0]
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r}: refused to unpickle anything but plain data ({why})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict[str, Any], path: str | Path | Location) -> None:
    """Collective: ``dcp.load`` of ``path`` into ``state`` in place, never unpickling code."""
    from torch.distributed.checkpoint.api import CheckpointException

    where = checkpoint_location(path)
    if isinstance(where, Location):
        from morec_dist.train.checkpoint_storage import storage_reader

        source: dict[str, Any] = {"storage_reader": storage_reader(where)}
    else:
        source = {"checkpoint_id": str(where)}
    try:
        dcp.load(state, planner=SafeLoadPlanner(), **source)
    except CheckpointException as exc:
        failures = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]  # (exception, traceback)
        refused = [f for f in failures if isinstance(f, CheckpointError)]
        if refused:
            raise CheckpointError(f"{path}: {refused[0]}") from None
        raise


def load_checkpoint(path: str | Path | Location, state: dict[str, Any]) -> dict[str, Any]:
    """Collective: loads the checkpoint into ``state`` in place; returns its meta."""
    path = checkpoint_location(path)
    meta = read_meta(path)
    dcp_load(state, path)
    return meta


def read_rank_state(path: str | Path | Location, rank: int) -> dict[str, Any]:
    file = checkpoint_location(path) / rank_file(rank)
    if not storage.exists(file):
        raise CheckpointError(f"{path}: no state for rank {rank} ({file.name} missing)")
    try:
        return json.loads(storage.read_text(file))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None


def _remote_steps(root: Location) -> tuple[list[tuple[int, Location]], list[tuple[int, Location]]]:
    """(complete, incomplete) ``step-<N>`` prefixes under ``root``: one listing."""
    steps: dict[int, bool] = {}
    for path in storage.files_below(root):
        parts = path[len(root.path) :].strip("/").split("/")
        match = STEP_DIR.match(parts[0]) if len(parts) >= 2 else None
        if match:
            n = int(match.group(1))
            steps[n] = steps.get(n, False) or (len(parts) == 2 and parts[1] == META)
    complete = sorted((n, root / f"step-{n}") for n, done in steps.items() if done)
    incomplete = sorted((n, root / f"step-{n}") for n, done in steps.items() if not done)
    return complete, incomplete


def complete_checkpoints(root: str | Path | Location) -> list[tuple[int, StoragePath]]:
    """(step, path) of every complete ``step-<N>`` checkpoint under ``root``, oldest first."""
    root = checkpoint_location(root)
    if isinstance(root, Location):
        return list(_remote_steps(root)[0])
    return list(_local_steps(root))


def _local_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / META).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path | Location) -> StoragePath | None:
    """The newest complete step checkpoint under ``root``; half-written ones are ignored."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path | Location, keep_last: int) -> list[StoragePath]:
    """Delete all but the newest ``keep_last`` complete step checkpoints, and crash leftovers
    (``step-<M>.tmp`` / ``.old``) of steps older than the newest complete one (no save of
    those is in flight: saves only move forward). Rank 0 only. Returns what went."""
    root = checkpoint_location(root)
    if isinstance(root, Location):
        return _prune_remote(root, keep_last)
    found = _local_steps(root)
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    if found:
        newest = found[-1][0]
        for child in root.iterdir():
            match = LEFTOVER_DIR.match(child.name)
            if match and child.is_dir() and int(match.group(1)) < newest:
                doomed.append(child)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return list(doomed)


def _prune_remote(root: Location, keep_last: int) -> list[StoragePath]:
    complete, incomplete = _remote_steps(root)
    doomed: list[Location] = [path for _, path in complete[: max(0, len(complete) - keep_last)]]
    if complete:  # a prefix without meta.json below the newest step: a save a crash cut short
        doomed += [path for n, path in incomplete if n < complete[-1][0]]
    for path in doomed:
        _remove_remote(path)
    return list(doomed)


def remove_partial_checkpoints(root: str | Path | Location) -> list[StoragePath]:
    """Remove ``step-<N>.tmp`` / ``.old`` directories a crash left behind (rank 0, at start);
    on a store, the ``step-<N>`` prefixes without meta.json."""
    root = checkpoint_location(root)
    if isinstance(root, Location):
        partial = [path for _, path in _remote_steps(root)[1]]
        for path in partial:
            _remove_remote(path)
        return list(partial)
    if not root.is_dir():
        return []
    gone: list[StoragePath] = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith("step-") and child.name.endswith((".tmp", ".old")):
            shutil.rmtree(child, ignore_errors=True)
            gone.append(child)
    return gone
