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
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element  # the helper DefaultLoadPlanner uses (torch 2.13)
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER_DIR = re.compile(r"^step-(\d+)\.(tmp|old)$")  # a save cut short by a crash


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or from an incompatible model."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def save_checkpoint(
    path: str | Path, state: dict[str, Any], meta: dict[str, Any], rank_state: dict[str, Any] | None = None
) -> Path:
    """Collective: every rank calls it with its state (model / optimizer state dicts) and,
    optionally, its own JSON-able ``rank_state`` (written as ``rank-<r>.json``)."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if rank_state is not None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        _fsync_write(tmp / rank_file(rank), json.dumps(rank_state, sort_keys=True))
    _barrier()
    if _is_rank0():
        _fsync_write(tmp / META, json.dumps(meta, indent=1, sort_keys=True, default=str))
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / META).exists():
        raise CheckpointError(f"{path}: not a complete checkpoint ({META} missing)")
    try:
        return json.loads((path / META).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / META}: not valid JSON ({exc})") from None


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
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


def dcp_load(state: dict[str, Any], path: str | Path) -> None:
    """Collective: ``dcp.load`` of ``path`` into ``state`` in place, never unpickling code."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
    except CheckpointException as exc:
        failures = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]  # (exception, traceback)
        refused = [f for f in failures if isinstance(f, CheckpointError)]
        if refused:
            raise CheckpointError(f"{path}: {refused[0]}") from None
        raise


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Collective: loads the checkpoint into ``state`` in place; returns its meta."""
    path = Path(path)
    meta = read_meta(path)
    dcp_load(state, path)
    return meta


def read_rank_state(path: str | Path, rank: int) -> dict[str, Any]:
    file = Path(path) / rank_file(rank)
    if not file.exists():
        raise CheckpointError(f"{path}: no state for rank {rank} ({file.name} missing)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete ``step-<N>`` checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / META).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete step checkpoint under ``root``; half-written ones are ignored."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete step checkpoints, and crash leftovers
    (``step-<M>.tmp`` / ``.old``) of steps older than the newest complete one (no save of
    those is in flight: saves only move forward). Rank 0 only. Returns what went."""
    root = Path(root)
    found = complete_checkpoints(root)
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    if found:
        newest = found[-1][0]
        for child in root.iterdir():
            match = LEFTOVER_DIR.match(child.name)
            if match and child.is_dir() and int(match.group(1)) < newest:
                doomed.append(child)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_partial_checkpoints(root: str | Path) -> list[Path]:
    """Remove ``step-<N>.tmp`` / ``.old`` directories a crash left behind (rank 0, at start)."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith("step-") and child.name.endswith((".tmp", ".old")):
            shutil.rmtree(child, ignore_errors=True)
            gone.append(child)
    return gone
