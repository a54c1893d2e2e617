"""The sampler's validation signals, measured data-parallel and reduced over ranks.

Each auxiliary objective asks for one vector over the groups of its column
(``SignalRequest``, see coordinator/objectives.py):

- ``group_loss``: the mean of the model's own per-row training loss (BPR against sampled
  negatives, drawn from a fixed seed so the signal moves with the model, not with the
  noise) over the validation rows whose held-out item is in each group; NaN for a group
  with no validation row;
- ``group_hit``: the mean Hit@k (full ranking, train items masked) per group;
- ``topk_histogram``: how many of the validation users' top-k items (train items masked)
  fall in each group.

Each signal is one entry of ``SIGNALS`` (the only list of signal names): a ``RowSignal``
(a value per validation row, averaged per group of its held-out item) or a ``CountSignal``
(a vector over groups per batch, summed). An objective kind from a plugin may register its
own next to the kind (docs/extending.md).

Users are split across ranks exactly as in evaluation; every rank makes the same number
of scoring calls (sharded lookups are collectives) and sums are all-reduced, so every rank
returns the same signals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.data.negatives import NegativeSampler
from morec_dist.eval.evaluator import (
    effective_batch_users,
    heldout_ranks,
    load_user_slice,
    max_over_ranks,
    model_scorer,
    scored_batches,
    sum_over_ranks,
    topk_band_counts,
)
from morec_dist.model.loss import bpr_loss
from morec_dist.model.sharding import unwrap
from morec_dist.registry import Registry


@dataclass
class ScoredBatch:
    """One batch of validation users as every signal sees it: full-catalogue scores (train
    items masked), the candidates, each user's held-out item and per-row training loss."""

    scores: torch.Tensor  # [B, num_items + 1]
    candidates: torch.Tensor
    targets: torch.Tensor  # [B] held-out item ids
    per_row_loss: torch.Tensor  # [B]
    _ranks: torch.Tensor | None = None

    def ranks(self) -> torch.Tensor:
        """1-based rank of each held-out item (computed once per batch, shared by signals)."""
        if self._ranks is None:
            self._ranks = heldout_ranks(self.scores, self.candidates, self.targets)
        return self._ranks


@dataclass(frozen=True)
class RowSignal:
    """values(batch, request) -> [B]: the signal is its mean per group of the held-out item
    (NaN for a group with no validation row)."""

    values: Callable[[ScoredBatch, Any], torch.Tensor]


@dataclass(frozen=True)
class CountSignal:
    """counts(batch, request, item_groups) -> [G]: the signal is its sum over batches and ranks."""

    counts: Callable[[ScoredBatch, Any, torch.Tensor], torch.Tensor]


SIGNALS: Registry[RowSignal | CountSignal] = Registry("signal", "the objective kind's signal_request().kind")
SIGNALS.register("group_loss", RowSignal(lambda batch, request: batch.per_row_loss))
SIGNALS.register("group_hit", RowSignal(lambda batch, request: (batch.ranks() <= request.k).to(torch.float64)))
SIGNALS.register(
    "topk_histogram",
    CountSignal(
        lambda batch, request, groups: topk_band_counts(
            batch.scores, batch.candidates, request.k, groups.to(batch.scores.device), request.num_groups
        )
    ),
)


class _Accumulator:
    """Per-request running sums (float64) on this rank."""

    def __init__(self, request: Any, dataset: PreparedDataset):
        self.signal = SIGNALS.get(request.kind, f"objective {request.objective!r}: signal")
        self.request = request
        self.groups = torch.from_numpy(dataset.item_column(request.group_column).astype(np.int64))
        self.sums = torch.zeros(request.num_groups + 1, dtype=torch.float64)
        self.counts = torch.zeros(request.num_groups + 1, dtype=torch.float64)

    def add_rows(self, values: torch.Tensor, targets: torch.Tensor) -> None:
        g = self.groups[targets.cpu()]
        self.sums.index_add_(0, g, values.detach().cpu().to(torch.float64))
        self.counts.index_add_(0, g, torch.ones_like(g, dtype=torch.float64))

    def add(self, batch: ScoredBatch) -> None:
        if isinstance(self.signal, RowSignal):
            self.add_rows(self.signal.values(batch, self.request), batch.targets)
        else:
            self.sums[1:] += self.signal.counts(batch, self.request, self.groups).detach().cpu().to(torch.float64)

    def reduce(self, world_size: int) -> list[float]:
        both = torch.stack([self.sums, self.counts])
        both = torch.from_numpy(sum_over_ranks(both, world_size))
        sums, counts = both[0, 1:].numpy(), both[1, 1:].numpy()
        if isinstance(self.signal, CountSignal):
            return sums.tolist()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).tolist()


def compute_signals(
    requests: Sequence[Any],
    model: torch.nn.Module,
    dataset: PreparedDataset,
    features: FeatureBuilder,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    num_negatives: int,
    negative_alpha: float,
    seed: int,
    batch_users: int = 1024,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] = bpr_loss,
) -> dict[str, list[float]]:
    """{objective name: signal vector} for every request; identical on every rank."""
    if not requests:
        return {}
    accumulators = [_Accumulator(r, dataset) for r in requests]
    users = load_user_slice(dataset, "valid", rank, world_size)
    sampler = NegativeSampler.from_dataset(dataset, negative_alpha)
    rng = np.random.default_rng([seed, 7919, rank])
    negatives = torch.from_numpy(sampler.sample(rng, users.targets, num_negatives).astype(np.int64))
    batch = effective_batch_users(batch_users, dataset.num_items)
    num_batches = max_over_ranks(-(-len(users) // batch), world_size, device)
    module = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        scorer = model_scorer(module, features, device)
        columns_all = dataset.num_items + 1
        for start, stop, scores, targets, candidates in scored_batches(
            scorer, users, columns_all, batch, num_batches, device
        ):
            columns = torch.cat([targets.unsqueeze(1), negatives[start:stop].to(device)], dim=1)
            scored = ScoredBatch(scores, candidates, targets, loss_fn(scores.gather(1, columns)))
            for acc in accumulators:
                acc.add(scored)
    finally:
        model.train(was_training)
    return {acc.request.objective: acc.reduce(world_size) for acc in accumulators}
