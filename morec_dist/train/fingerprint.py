"""Which configuration a step checkpoint resumes under: the fingerprint of the keys that
determine the training trajectory, and the keys in which two configurations differ.

Every config key counts except the purely operational ones in ``OPERATIONAL`` (where the
outputs go, how often to log or checkpoint, how to reach or name the coordinator, what to
export, how the launcher restarts): another value of any other key continues a run that
no single configuration describes, so a resume refuses it unless told (``--resume-changed``,
then the record keeps both). The world size (``run.nproc``), the job kind and the model
identity are checked on their own (``resume.py``, ``checkpoint.reshard``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# dotted keys, or whole sections, that never change what the ranks compute
OPERATIONAL = (
    "run.out_dir",  # where outputs go
    "run.nproc",  # the world size: checked on its own (checkpoint.reshard)
    "run.resume",
    "run.resume_changed",
    "run.max_restarts",
    "run.methods",  # `morec run`'s list; a fine-tuning job's method is its job kind, checked on its own
    "data.prefetch_batches",  # read-ahead depth; a batch is a pure function of its position
    "train.log_every",
    "train.pipeline",  # how steps overlap, not what they compute (exact: tests/test_pipelined.py)
    "coordinator.ray_address",
    "coordinator.name",
    "coordinator.namespace",
    "coordinator.detached",
    "coordinator.object_store_mb",
    "coordinator.trace_window",  # how much of the trace the actor keeps, not what it decides
    "metrics",  # exporters: enabled, host, ports
    "checkpoint.every_steps",  # a resume continues exactly from any step
    "checkpoint.keep_last",
    "checkpoint.reshard",
    "checkpoint.dir",  # where they go
    "checkpoint.async_save",  # when the bytes are written, not what they hold
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:  # sections and tables: a changed key names itself
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _operational(key: str) -> bool:
    return any(key == op or key.startswith(f"{op}.") for op in OPERATIONAL)


def trajectory_config(config: dict[str, Any]) -> dict[str, Any]:
    """``section.key -> value`` of the keys that determine the trajectory (JSON-normalised,
    so a config and its copy read back from meta.json compare equal)."""
    flat = json.loads(json.dumps(_flatten(config), default=float))
    return {key: value for key, value in flat.items() if not _operational(key)}


def fingerprint(config: dict[str, Any]) -> str:
    canonical = json.dumps(trajectory_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """``key -> [saved value, current value]`` of every trajectory key that differs; a key
    only one side has (a config of another version) differs too, with ``None`` on the other."""
    old, new = trajectory_config(saved), trajectory_config(current)
    keys = sorted(old.keys() | new.keys())
    return {key: [old.get(key), new.get(key)] for key in keys if old.get(key) != new.get(key)}


def describe(changes: dict[str, list[Any]]) -> str:
    """``morec.epochs 2 -> 3, morec.lam 0.2 -> 0.9`` (long values shortened)."""

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else f"{text[:37]}..."

    return ", ".join(f"{key} {short(old)} -> {short(new)}" for key, (old, new) in changes.items())
