"""The training losses, by name (``LOSSES``, picked by ``model.loss``): default BPR over one
positive and N sampled negatives, per row.

MoRec needs the loss of every row (it averages per block), so a loss is never reduced
here; the caller takes the mean it needs. A loss must stay symbolically traceable (see
``bpr_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from morec_dist.registry import Registry

if TYPE_CHECKING:
    import torch


def bpr_loss(scores: torch.Tensor) -> torch.Tensor:
    """Per-row BPR loss of scores [N, 1 + neg] (column 0 the positive) -> [N].

    loss_n = mean_j -log sigmoid(s_n0 - s_nj) over the negatives j = 1..neg, written as
    softplus(s_nj - s_n0), which stays finite for any score gap.
    """
    import torch  # here, not at the top: the CLI lists the losses without loading torch
    import torch.nn.functional as F

    # torch._assert, not `if ...: raise`: it stays symbolically traceable, so a model that
    # computes its loss in forward still works under TorchRec's TrainPipelineSparseDist.
    torch._assert(scores.dim() == 2, "bpr_loss: scores must be [N, 1 + negatives]")
    torch._assert(scores.shape[1] >= 2, "bpr_loss: scores must be [N, 1 + negatives] with >= 1 negative")
    positive = scores[:, :1]
    negatives = scores[:, 1:]
    return F.softplus(negatives - positive).mean(dim=1)


LossFn = Callable[["torch.Tensor"], "torch.Tensor"]

# per-row losses by name (``model.loss``): scores [N, 1 + neg] -> [N], never reduced
LOSSES: Registry[LossFn] = Registry("loss", "model.loss")


def register_loss(name: str, loss: LossFn, *, replace: bool = False) -> LossFn:
    return LOSSES.register(name, loss, replace=replace)


register_loss("bpr", bpr_loss)
