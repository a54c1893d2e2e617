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

Each signal is one entry of ``SIGNALS`` (``eval/signal_kinds.py``, the only list of signal
names): a ``RowSignal`` (a value per validation row, averaged per group of its held-out item)
or a ``CountSignal`` (a vector over groups per batch, summed). An objective kind from a plugin
may register its own next to the kind (docs/extending.md).

Work is split over ranks as in evaluation (eval/ranking.py): every rank scores the users
against its own item range, and a merge per batch gives every rank the held-out ranks, the
top-k lists and the scores of the held-out item and its negatives exactly as one process
would, so every rank returns the same signals, whatever the number of ranks.

The signals run on a seeded sample of the validation users (``SignalOptions.users``, from
``morec.sampler.validation_users``; 0 = all): the same users at every update (the signal
moves with the model, not with the sample), so an update costs O(sample x items / ranks).
Their negatives are drawn from ``default_rng([seed, 7919])`` for the whole sample, the same
on every rank and at every update: a job loads the sample and its negatives once
(``signal_sample``) and hands them to every update.
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
from morec_dist.distributed import DistContext
from morec_dist.eval.evaluator import load_users
from morec_dist.eval.ranking import (
    EvalOptions,
    UserSet,
    band_counts,
    model_scorer,
    ranked_batches,
    stop_checker,
)
from morec_dist.eval.signal_kinds import SIGNALS, CountSignal, RowSignal
from morec_dist.model.loss import bpr_loss
from morec_dist.model.sharding import unwrap


@dataclass(frozen=True)
class SignalOptions:
    """How the signals are measured: the negatives of ``group_loss`` (the training scheme's
    count and popularity exponent, a fixed seed), the validation-user sample (0 = all), the
    batch size, the loss, and the SIGTERM flag polled between batches (``EvalOptions``)."""

    num_negatives: int
    negative_alpha: float
    seed: int
    users: int = 0
    batch_users: int = 1024
    loss_fn: Callable[[torch.Tensor], torch.Tensor] = bpr_loss
    stop: Callable[[], bool] | None = None


@dataclass
class ScoredBatch:
    """One batch of validation users as every signal sees it (after the merge over ranks):
    each user's held-out item, its 1-based rank (train items masked), the top-k list and
    the per-row training loss."""

    targets: torch.Tensor  # [B] held-out item ids
    heldout_ranks: torch.Tensor  # [B]
    top_items: torch.Tensor  # [B, K] in ranking order, K = the largest k requested
    per_row_loss: torch.Tensor  # [B]

    def ranks(self) -> torch.Tensor:
        """1-based rank of each held-out item (train items masked)."""
        return self.heldout_ranks

    def topk_counts(self, k: int, item_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
        """[G]: how many of the batch's top-k items fall in each group 1..G."""
        return band_counts(self.top_items, k, item_groups.to(self.top_items.device), num_groups)


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

    def result(self) -> list[float]:
        sums, counts = self.sums[1:].numpy(), self.counts[1:].numpy()
        if isinstance(self.signal, CountSignal):
            return sums.tolist()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).tolist()


@dataclass
class SignalSample:
    """The signals' validation users (this rank's history range) and their ``group_loss``
    negatives: a pure function of the dataset, the rank layout and the options, the same at
    every update, so a job loads it once (``signal_sample``) and passes it to every update."""

    users: UserSet
    negatives: np.ndarray  # [U, num_negatives] item ids


def signal_sample(dataset: PreparedDataset, ctx: DistContext, options: SignalOptions) -> SignalSample:
    """The seeded validation sample of ``options.users`` (0 = all) and its negatives, drawn
    from ``default_rng([seed, 7919])``."""
    users = load_users(dataset, "valid", ctx, sample=options.users, seed=options.seed)
    sampler = NegativeSampler.from_dataset(dataset, options.negative_alpha)
    rng = np.random.default_rng([options.seed, 7919])
    negatives = sampler.sample(rng, users.targets, options.num_negatives).astype(np.int64)
    return SignalSample(users, negatives)


def compute_signals(
    requests: Sequence[Any],
    model: torch.nn.Module,
    dataset: PreparedDataset,
    features: FeatureBuilder,
    ctx: DistContext,
    options: SignalOptions,
    sample: SignalSample | None = None,
) -> dict[str, list[float]]:
    """{objective name: signal vector} for every request; identical on every rank (a
    collective with a sharded model: every rank calls it with the same options).
    ``sample``: the job's ``signal_sample`` (loaded here when None)."""
    if not requests:
        return {}
    accumulators = [_Accumulator(r, dataset) for r in requests]
    if sample is None:
        sample = signal_sample(dataset, ctx, options)
    users, negatives = sample.users, sample.negatives
    k = max([1, *(int(getattr(r, "k", 0) or 0) for r in requests)])
    eval_options = EvalOptions(batch_users=options.batch_users, stop=options.stop)
    module = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        scorer = model_scorer(module, features, ctx, stop_checker(ctx, eval_options))
        for batch in ranked_batches(scorer, users, dataset.num_items, k, ctx, eval_options, extra_columns=negatives):
            picked = batch.picked.to(batch.score_dtype)
            scored = ScoredBatch(batch.targets, batch.ranks, batch.top_items, options.loss_fn(picked))
            for acc in accumulators:
                acc.add(scored)
    finally:
        model.train(was_training)
    return {acc.request.objective: acc.result() for acc in accumulators}
