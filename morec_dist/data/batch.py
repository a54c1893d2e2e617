"""The unit the readers hand to the trainer: one batch of rows, its model inputs and provenance.

A MoRec batch is K+1 blocks of B rows: block 0 is drawn uniformly (the accuracy block),
block k >= 1 from the k-th auxiliary objective's group distribution. A uniform-mode batch
(pretraining) is a single block 0. ``version`` records which sampling-probabilities version
drew the rows, so a batch never mixes versions and every loss can be traced to its p_k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

UNIFORM_VERSION = -1


@dataclass
class Batch:
    user_ids: torch.Tensor  # [N] int64
    item_ids: torch.Tensor  # [N, 1 + num_negatives] int64; column 0 is the positive item
    block_ids: torch.Tensor  # [N] int64; 0 = uniform / accuracy, k = k-th auxiliary objective
    user_kjt: KeyedJaggedTensor  # stride N
    item_kjt: KeyedJaggedTensor  # stride N * (1 + num_negatives), row-major over item_ids
    version: int = UNIFORM_VERSION

    @property
    def num_rows(self) -> int:
        return int(self.user_ids.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            user_ids=self.user_ids.to(device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device, non_blocking=non_blocking),
            block_ids=self.block_ids.to(device, non_blocking=non_blocking),
            user_kjt=self.user_kjt.to(device, non_blocking=non_blocking),
            item_kjt=self.item_kjt.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.user_ids, self.item_ids, self.block_ids):
            t.record_stream(stream)
        self.user_kjt.record_stream(stream)
        self.item_kjt.record_stream(stream)

    def pin_memory(self) -> Batch:
        return replace(
            self,
            user_ids=self.user_ids.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
            block_ids=self.block_ids.pin_memory(),
            user_kjt=self.user_kjt.pin_memory(),
            item_kjt=self.item_kjt.pin_memory(),
        )
