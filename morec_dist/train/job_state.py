"""The bookkeeping of a job that travels in its step checkpoints, as typed ``Stateful`` s.

``JobState`` is what the runner and a job's hooks record between epochs (history, best
epoch, patience, the epoch to continue at, time and rows trained); a step checkpoint holds
its ``state_dict()`` in ``meta.json`` and a resume gives it back with ``load_state_dict``.
``load_exact`` is the one rule every such state follows (the job's and the strategies'):
the saved keys must be exactly the declared ones, so renaming or dropping a field is an
error at resume, never a field silently lost from checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from morec_dist.train.checkpoint import CheckpointError


def check_state_keys(owner: str, state: dict[str, Any], expected: Iterable[str]) -> None:
    """``state`` must hold exactly ``expected``: a missing or unknown key names both lists."""
    want, got = set(expected), set(state)
    if want != got:
        missing, unknown = sorted(want - got), sorted(got - want)
        raise CheckpointError(
            f"{owner} state: missing keys {missing}, unknown keys {unknown} (expected exactly {sorted(want)}); "
            "the checkpoint was written by another version of this state"
        )


@dataclass
class JobState:
    """A job's bookkeeping between epochs; everything here is checkpointed."""

    next_epoch: int = 0  # the epoch a resumed job starts at (the saved one while mid-epoch)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    best: dict[str, Any] = field(default_factory=dict)  # the selected epoch's record (pretraining)
    stale: int = 0  # epochs since the selection metric last improved (early stopping)
    stopped: bool = False  # early stopping fired
    before: dict[str, Any] | None = None  # valid metrics before the first step (fine-tuning)
    train_seconds: float = 0.0
    train_rows: int = 0

    @property
    def train_rows_per_s(self) -> float:
        return self.train_rows / max(self.train_seconds, 1e-9)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys("job", state, (f.name for f in dataclasses.fields(self)))
        for name, value in state.items():
            setattr(self, name, value)
