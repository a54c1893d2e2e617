"""The unit the readers hand to the trainer: one batch of rows, its model inputs and provenance.

A MoRec batch is K+1 blocks of B rows: block 0 is drawn uniformly (the accuracy block),
block k >= 1 from the k-th auxiliary objective's group distribution. A uniform-mode batch
(pretraining) is a single block 0. ``version`` records which sampling-probabilities version
drew the rows, so a batch never mixes versions and every loss can be traced to its p_k.

Model inputs follow TorchRec's contract (dense features beside sparse features), per side:
``user_kjt`` / ``user_dense`` for the N rows' users, ``item_kjt`` / ``item_dense`` for their
N * (1 + negatives) items (data/features.py builds both kinds). The dense tensors are None
only in a hand-made batch; the FeatureBuilder always gives them ([n, 0] when a model reads none).

A ``Batch`` is TorchRec's ``Pipelineable`` (``to``, ``record_stream``, ``pin_memory``), the
input contract of ``TrainPipelineSparseDist`` (``train/pipelined.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

UNIFORM_VERSION = -1


@dataclass
class Batch(Pipelineable):
    user_ids: torch.Tensor  # [N] int64
    item_ids: torch.Tensor  # [N, 1 + num_negatives] int64; column 0 is the positive item
    block_ids: torch.Tensor  # [N] int64; 0 = uniform / accuracy, k = k-th auxiliary objective
    user_kjt: KeyedJaggedTensor  # stride N
    item_kjt: KeyedJaggedTensor  # stride N * (1 + num_negatives), row-major over item_ids
    version: int = UNIFORM_VERSION
    user_dense: torch.Tensor | None = None  # [N, D_user] float32
    item_dense: torch.Tensor | None = None  # [N * (1 + num_negatives), D_item] float32, rows as item_kjt

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
            user_dense=None if self.user_dense is None else self.user_dense.to(device, non_blocking=non_blocking),
            item_dense=None if self.item_dense is None else self.item_dense.to(device, non_blocking=non_blocking),
        )

    def _dense(self) -> list[torch.Tensor]:
        return [t for t in (self.user_dense, self.item_dense) if t is not None]

    def record_stream(self, stream: torch.Stream) -> None:
        for t in (self.user_ids, self.item_ids, self.block_ids, *self._dense()):
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
            user_dense=None if self.user_dense is None else self.user_dense.pin_memory(),
            item_dense=None if self.item_dense is None else self.item_dense.pin_memory(),
        )
