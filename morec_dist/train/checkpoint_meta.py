"""A checkpoint's ``meta.json``, read without the training stack: its presence is the
checkpoint's commit point (``train/checkpoint.py`` writes it last), and it records the config
the checkpoint was trained with. The CLI's launcher reads it before any rank starts (the
checkpoint to fine-tune, evaluate or export from), so this module imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from morec_dist.config import Config, config_from_dict
from morec_dist.data import storage
from morec_dist.data.storage import Location, StoragePath

META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or from an incompatible model."""


def checkpoint_location(path: str | Path | Location) -> StoragePath:
    """A checkpoint path as given (a local one is not resolved: messages and records keep the
    form the config used), or a Location for a URI."""
    if isinstance(path, Path):  # never a URI; not re-parsed (an async save's call is timed in µs)
        return path
    if isinstance(path, Location) or storage.is_uri(str(path)):
        return storage.location(path)
    return Path(path)


def read_meta(path: str | Path | Location) -> dict[str, Any]:
    path = checkpoint_location(path)
    if not storage.exists(path / META):
        raise CheckpointError(f"{path}: not a complete checkpoint ({META} missing)")
    try:
        return json.loads(storage.read_text(path / META))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / META}: not valid JSON ({exc})") from None


def checkpoint_config(checkpoint: str | Path, overrides: Config | None = None) -> Config:
    """The config a checkpoint was trained with; data/eval/run sections may be replaced."""
    recorded = read_meta(checkpoint)["config"]
    if overrides is not None:
        fresh = overrides.to_dict()
        for section in ("data", "eval", "run"):
            recorded[section] = fresh[section]
    return config_from_dict(recorded)
