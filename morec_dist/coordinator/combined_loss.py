"""The inner level of MoRec: one step's loss from its per-row losses and block ids.

A MoRec batch holds K+1 blocks; block 0 is the uniform accuracy block, block k the k-th
auxiliary objective's block. With L_k the mean per-row loss of block k::

    loss = lam * sum_k w_k * L_k  +  beta * L_acc

(The baselines' combinations of the same K+1 means are ``coordinator/baselines.py``.)

An empty block has mean 0 and contributes nothing (a rank's last partial batch may lack a
block); its row count 0 tells the coordinator to ignore it. ``block_sums`` gives the
detached per-block sums and counts a rank reports to the coordinator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_sums(
    per_row_loss: torch.Tensor, block_ids: torch.Tensor, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block loss sums ([num_blocks], same dtype as the loss) and row counts (int64)."""
    if per_row_loss.dim() != 1 or block_ids.shape != per_row_loss.shape:
        raise ValueError(
            f"per_row_loss and block_ids must be 1-D of equal length, got {tuple(per_row_loss.shape)} and "
            f"{tuple(block_ids.shape)}"
        )
    ids = block_ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_ids must lie in 0..{num_blocks - 1}, found {int(ids.min())}..{int(ids.max())}")
    sums = torch.zeros(num_blocks, dtype=per_row_loss.dtype, device=per_row_loss.device).index_add(0, ids, per_row_loss)
    counts = torch.bincount(ids, minlength=num_blocks)
    return sums, counts


def block_means(per_row_loss: torch.Tensor, block_ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Mean loss per block (differentiable); 0 for an empty block."""
    sums, counts = block_sums(per_row_loss, block_ids, num_blocks)
    return sums / counts.clamp_min(1).to(sums.dtype)


def _weights_tensor(
    weights: Sequence[float] | torch.Tensor, like: torch.Tensor, expected: int, what: str
) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (expected,):
        raise ValueError(f"{what}: expected {expected} weights, got shape {tuple(w.shape)}")
    return w


def combined_loss(
    per_row_loss: torch.Tensor,
    block_ids: torch.Tensor,
    beta: float,
    weights: Sequence[float] | torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoRec's loss: ``lam * sum_k w_k L_k + beta * L_0``; returns (loss, per-block means).

    ``weights`` are w_1..w_K (block order, as ``Decision.block_weights()``); the number of
    blocks is K + 1.
    """
    num_blocks = len(weights) + 1
    means = block_means(per_row_loss, block_ids, num_blocks)
    w = _weights_tensor(weights, means, num_blocks - 1, "combined_loss weights")
    loss = lam * (w * means[1:]).sum() + beta * means[0]
    return loss, means
