"""The sampler's validation signals by name (``SIGNALS``, the only list of them): what an
objective kind's ``signal_request().kind`` may name, checked by the CLI's launcher before any
rank starts and dispatched by ``eval/signals.py`` in the ranks.

A ``RowSignal`` is a value per validation row, averaged per group of its held-out item; a
``CountSignal`` a vector over groups per batch, summed. Light on purpose (torch only inside
the entries), so the launcher checks the names without loading the training stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from morec_dist.registry import Registry

if TYPE_CHECKING:
    import torch

    from morec_dist.eval.signals import ScoredBatch


@dataclass(frozen=True)
class RowSignal:
    """values(batch, request) -> [B]: the signal is its mean per group of the held-out item
    (NaN for a group with no validation row)."""

    values: Callable[[ScoredBatch, Any], torch.Tensor]


@dataclass(frozen=True)
class CountSignal:
    """counts(batch, request, item_groups) -> [G]: the signal is its sum over batches (every
    rank sees every batch, so no reduction over ranks)."""

    counts: Callable[[ScoredBatch, Any, torch.Tensor], torch.Tensor]


def _group_loss(batch: ScoredBatch, request: Any) -> torch.Tensor:
    return batch.per_row_loss


def _group_hit(batch: ScoredBatch, request: Any) -> torch.Tensor:
    import torch

    return (batch.ranks() <= request.k).to(torch.float64)


def _topk_histogram(batch: ScoredBatch, request: Any, groups: torch.Tensor) -> torch.Tensor:
    return batch.topk_counts(request.k, groups, request.num_groups)


SIGNALS: Registry[RowSignal | CountSignal] = Registry("signal", "the objective kind's signal_request().kind")
SIGNALS.register("group_loss", RowSignal(_group_loss))
SIGNALS.register("group_hit", RowSignal(_group_hit))
SIGNALS.register("topk_histogram", CountSignal(_topk_histogram))
