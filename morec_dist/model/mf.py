"""Matrix factorisation: the score of (user, item) is the dot product of their vectors.

The user vector is the sum of the pooled embeddings of the user's sparse features, the
item vector likewise; with the "ids" feature set that is plain MF (one user table, one
item table). Tables live in two EmbeddingBagCollections (user side, item side) so that the
planner can shard each table on its own.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_dist.data.batch import Batch
from morec_dist.data.features import SparseFeature


def table_name(feature: str) -> str:
    return f"t_{feature}"


def make_ebc(
    features: list[SparseFeature], dim: int, init_std: float, device: torch.device | None
) -> EmbeddingBagCollection:
    """One SUM-pooled table per sparse feature, named t_<feature>."""
    if not features:
        raise ValueError("make_ebc: a side needs at least one sparse feature")
    tables = [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=PoolingType.SUM,
            init_fn=functools.partial(nn.init.normal_, mean=0.0, std=init_std),
        )
        for f in features
    ]
    return EmbeddingBagCollection(tables=tables, device=device)


def pooled(ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor, features: list[SparseFeature]) -> list[torch.Tensor]:
    """Pooled embeddings in the features' order; sharded outputs come back in shard order,
    so they are read by name, never by position."""
    by_name = ebc(kjt).to_dict()
    return [by_name[f.name] for f in features]


def pairwise_scores(user: torch.Tensor, items: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Dot products of user [N, d] with its items [N * C, d] (row-major) -> [N, C]."""
    items = items.view(num_rows, -1, items.shape[-1])
    return torch.einsum("nd,ncd->nc", user, items)


class MatrixFactorization(nn.Module):
    def __init__(
        self,
        user_features: list[SparseFeature],
        item_features: list[SparseFeature],
        embedding_dim: int,
        init_std: float = 0.1,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        self.output_dim = embedding_dim
        self.user_ebc = make_ebc(self.user_features, embedding_dim, init_std, device)
        self.item_ebc = make_ebc(self.item_features, embedding_dim, init_std, device)

    def user_vectors(self, user_kjt: KeyedJaggedTensor) -> torch.Tensor:
        return torch.stack(pooled(self.user_ebc, user_kjt, self.user_features)).sum(dim=0)

    def item_vectors(self, item_kjt: KeyedJaggedTensor) -> torch.Tensor:
        return torch.stack(pooled(self.item_ebc, item_kjt, self.item_features)).sum(dim=0)

    def forward(self, batch: Batch) -> torch.Tensor:
        return pairwise_scores(self.user_vectors(batch.user_kjt), self.item_vectors(batch.item_kjt), batch.num_rows)
