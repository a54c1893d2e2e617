"""Checkpoints of sharded training state, written atomically with torch.distributed.checkpoint.

A checkpoint is a directory: DCP shards of the model and optimizer state (every rank writes
its own shards; DCP reshards on load, so a checkpoint from 2 ranks loads on 1) and
``meta.json`` (config, step, model identity, world size, versions, and the trainer's extra
state). It is written into ``<name>.tmp`` and renamed into place only after every rank has
finished, so a crash never leaves a half-written checkpoint under a valid name; the
presence of meta.json (written last) is what makes a directory a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

META = "meta.json"


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


def save_checkpoint(path: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Collective: every rank calls it with its state (model / optimizer state dicts)."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
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


def load_checkpoint(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Collective: loads the checkpoint into ``state`` in place; returns its meta."""
    path = Path(path)
    meta = read_meta(path)
    dcp.load(state, checkpoint_id=str(path))
    return meta

