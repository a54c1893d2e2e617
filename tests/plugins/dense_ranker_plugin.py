"""An example plugin (docs/extending.md): a model with dense features that scores (user, item)
pairs, in one module. Name it in ``run.plugins = ["dense_ranker_plugin"]`` (this directory on
PYTHONPATH) and pick it with ``model.name = "dense_ranker"``; its options go in
``[model.options]`` (``hidden``, ``user_dense``, ``item_dense``).

``dense_ranker``: score(u, i) = MLP([e_u, e_i, e_u * e_i, slog(d_u), slog(d_i)]) -> 1, where
e_u / e_i are the sum-pooled embeddings of the user's / item's sparse features (ids; the
"ids" feature set) and d_u / d_i the dense features, numeric columns of users.parquet /
items.parquet (default: the user's age and the item's price), through a signed log
(the model owns its normalisation; the FeatureBuilder hands over the raw values). The score
is not a dot product, so the model has no item vectors: its scorer is pairwise, and
evaluation and the signals score every user against the candidate items through its forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from morec_dist.config import ConfigError
from morec_dist.data.batch import Batch
from morec_dist.data.features import FeatureBuilder
from morec_dist.model.mf import make_ebc, pooled
from morec_dist.model.registry import register_model
from morec_dist.model.spec import DenseInputs, PairwiseScorer
from morec_dist.model.two_tower import mlp


@dataclass(frozen=True)
class DenseRankerOptions:
    hidden: list[int] = field(default_factory=lambda: [32])  # the MLP's hidden widths (then 1 output)
    user_dense: list[str] = field(default_factory=lambda: ["age"])  # numeric columns of users.parquet
    item_dense: list[str] = field(default_factory=lambda: ["price"])  # numeric columns of items.parquet

    def check(self, where: str) -> None:  # called once at the edge, after the types are checked
        if not self.hidden or any(width < 1 for width in self.hidden):
            raise ConfigError(f"{where}.hidden: expected positive layer widths, got {self.hidden}")


def signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class DenseRanker(nn.Module):
    def __init__(self, features: FeatureBuilder, dim: int, hidden: list[int], init_std: float, device):
        super().__init__()
        self.user_features, self.item_features = features.user_features(), features.item_features()
        self.user_ebc = make_ebc(self.user_features, dim, init_std, device)
        self.item_ebc = make_ebc(self.item_features, dim, init_std, device)
        dense = len(features.user_dense_features()) + len(features.item_dense_features())
        self.mlp = mlp(3 * dim + dense, [*hidden, 1]).to(device)

    def forward(self, batch: Batch) -> torch.Tensor:  # [N, C]: each row's user against its C items
        n = batch.num_rows
        user = torch.stack(pooled(self.user_ebc, batch.user_kjt, self.user_features)).sum(dim=0)
        item = torch.stack(pooled(self.item_ebc, batch.item_kjt, self.item_features)).sum(dim=0)
        per_row = item.shape[0] // n
        user = user.repeat_interleave(per_row, dim=0)
        assert batch.user_dense is not None and batch.item_dense is not None  # the FeatureBuilder's
        user_dense = batch.user_dense.repeat_interleave(per_row, dim=0)
        x = torch.cat([user, item, user * item, signed_log(user_dense), signed_log(batch.item_dense)], dim=1)
        return self.mlp(x).view(n, per_row)


def build(features: FeatureBuilder, config, options: DenseRankerOptions, device) -> nn.Module:
    return DenseRanker(features, config.embedding_dim, list(options.hidden), config.init_std, device)


register_model(
    "dense_ranker",
    build,
    "ids",
    options=DenseRankerOptions,
    dense_inputs=lambda options: DenseInputs(tuple(options.user_dense), tuple(options.item_dense)),
    scorer=PairwiseScorer(),  # the default pair score: the model's forward
)
