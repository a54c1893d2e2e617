"""The two-tower model: an MLP per side over the concatenated side-feature embeddings.

User tower: [user_id, user side features...] embeddings -> MLP; item tower: [item_id, item
side features...] -> MLP (multi-hot features sum-pooled; on ML-1M: user_gender, user_age,
user_occupation | item_genres, picked by ``model.user_features`` / ``model.item_features``);
the score is the dot product of the two outputs.
The embeddings are sharded by TorchRec; the MLPs are the dense part, replicated under DDP.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_dist.data.batch import Batch
from morec_dist.data.features import SparseFeature
from morec_dist.model.mf import make_ebc, pairwise_scores, pooled


def mlp(in_dim: int, dims: list[int]) -> nn.Sequential:
    """Linear-ReLU layers, the last one linear only (the output is a score vector)."""
    if not dims:
        raise ValueError("model.tower_dims: expected at least one layer width")
    layers: list[nn.Module] = []
    for i, out_dim in enumerate(dims):
        layers.append(nn.Linear(in_dim, out_dim))
        if i < len(dims) - 1:
            layers.append(nn.ReLU())
        in_dim = out_dim
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    def __init__(
        self,
        user_features: list[SparseFeature],
        item_features: list[SparseFeature],
        embedding_dim: int,
        tower_dims: list[int],
        init_std: float = 0.1,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        self.output_dim = tower_dims[-1] if tower_dims else embedding_dim
        self.user_ebc = make_ebc(self.user_features, embedding_dim, init_std, device)
        self.item_ebc = make_ebc(self.item_features, embedding_dim, init_std, device)
        self.user_tower = mlp(embedding_dim * len(self.user_features), tower_dims).to(device)
        self.item_tower = mlp(embedding_dim * len(self.item_features), tower_dims).to(device)

    def user_vectors(self, user_kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.user_tower(torch.cat(pooled(self.user_ebc, user_kjt, self.user_features), dim=1))

    def item_vectors(self, item_kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.item_tower(torch.cat(pooled(self.item_ebc, item_kjt, self.item_features), dim=1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return pairwise_scores(self.user_vectors(batch.user_kjt), self.item_vectors(batch.item_kjt), batch.num_rows)
