"""The validation users' two slices, and held-out Hit@K measured on one of them.

The budget law (coordinator/budget.py) controls held-out accuracy, so the accuracy it steers
by must not be the accuracy anyone chooses or reports by. The validation users are split by
a seeded hash of their id (``control_mask``: splitmix64 of (user id, seed), the same on every
rank, for every run with that seed, and stable when users are added):

- the **control slice** (``morec.control.control_fraction`` of them): the controller's
  measurements, on its own cadence during fine-tuning;
- the **selection slice** (the rest): for choosing settings and reporting whether the
  budget held, never seen by the controller.

A ``HeldoutSlice`` loads its users once (held-out items, and the train history of this
rank's item range) and measures Hit@K with the evaluation machinery of eval/ranking.py: every
rank scores the slice against its item range and the per-batch merge gives every rank the
exact held-out ranks, so the value is identical on every rank, whatever their number (a
collective: every rank calls ``hit`` with the same model). Hit@K needs the ranks alone, so
the pass keeps and merges no top-K lists (``ranked_batches`` with k = 0) and takes the slice
in as few batches as ``RANKS_ONLY_SCORES`` allows (one on MovieLens-1M).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.data.group_streams import splitmix64
from morec_dist.distributed import DistContext
from morec_dist.eval.evaluator import HISTORY_SPLITS, heldout_rows, history_csr
from morec_dist.eval.ranking import (
    EvalOptions,
    UserSet,
    item_range,
    model_scorer,
    ranked_batches,
    ranks_only_batch_users,
    stop_checker,
)
from morec_dist.model.sharding import unwrap

SLICES = ("control", "selection")


def control_mask(user_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for the users of the control slice: the hash of (seed, user id) as a uniform
    number in [0, 1) below ``fraction``. Depends on each user's id alone, not on the others."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"morec.control.control_fraction: expected in (0, 1), got {fraction}")
    keyed = splitmix64(np.asarray(user_ids, dtype=np.int64).astype(np.uint64) ^ splitmix64(np.array([seed], np.uint64)))
    uniform = (keyed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return uniform < fraction


@dataclass
class HeldoutSlice:
    """One slice of the validation users, loaded for this rank's item range."""

    name: str
    users: UserSet
    num_items: int

    @classmethod
    def load(cls, dataset: PreparedDataset, ctx: DistContext, name: str, seed: int, fraction: float) -> HeldoutSlice:
        if name not in SLICES:
            raise ValueError(f"held-out slice {name!r}: expected one of {SLICES}")
        users, targets = heldout_rows(dataset, "valid")
        mask = control_mask(users, seed, fraction)
        keep = mask if name == "control" else ~mask
        users, targets = users[keep], targets[keep]
        if users.size == 0:
            raise ValueError(
                f"the {name} slice of the validation users is empty ({mask.size} users, control_fraction {fraction})"
            )
        indptr, items = history_csr(dataset, HISTORY_SPLITS["valid"], users, item_range(dataset.num_items, ctx))
        return cls(name, UserSet(users, targets, indptr, items), dataset.num_items)

    def __len__(self) -> int:
        return len(self.users)

    def hit(
        self,
        model: torch.nn.Module,
        features: FeatureBuilder,
        ctx: DistContext,
        k: int,
        batch_users: int = 1024,
        stop: Callable[[], bool] | None = None,
    ) -> float:
        """Hit@k of ``model`` on this slice (history masked as in evaluation); every rank
        returns the same value. Raises ``EvaluationInterrupted`` on SIGTERM, like evaluation.
        The held-out ranks alone are computed (no top-k lists), in batches of at least
        ``batch_users`` (``ranks_only_batch_users``: on a small catalogue, the whole slice)."""
        per_batch = ranks_only_batch_users(batch_users, self.num_items, ctx.world_size)
        options = EvalOptions(batch_users=per_batch, stop=stop)
        module = unwrap(model)
        was_training = model.training
        model.eval()
        hits = 0
        try:
            scorer = model_scorer(module, features, ctx, stop_checker(ctx, options))
            for batch in ranked_batches(scorer, self.users, self.num_items, 0, ctx, options):
                hits += int((batch.ranks <= k).sum())
        finally:
            model.train(was_training)
        return hits / len(self.users)
