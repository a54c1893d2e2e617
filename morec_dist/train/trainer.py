"""The trainer: the sharded model, its optimizer, the loss, and one training step.

``Trainer`` is a checkpointable ``Stateful``: its state is the model's and the optimizer's
(sharded, saved with DCP) plus the step and epoch counters. What the step optimises is not
its concern: a ``Strategy`` (accuracy-only pretraining, MoRec, static weighting, MGDA; see
``morec_dist.train.strategies``) turns the per-row loss of a batch into the scalar that is
back-propagated. The model and the loss are picked by name from their registries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from morec_dist.config import Config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.model.init import META
from morec_dist.model.loss import LOSSES
from morec_dist.model.registry import build_model, feature_builder
from morec_dist.model.sharding import shard
from morec_dist.train.state_chunks import chunked, take_back


@dataclass
class EpochStats:
    """Global (all-rank) sums of one epoch."""

    loss_sum: float = 0.0
    rows: int = 0
    steps: int = 0
    seconds: float = 0.0
    reader_wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False  # stopped mid-epoch on request (SIGTERM); the epoch is not finished

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.rows, 1)

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def build_features(config: Config, dataset: PreparedDataset) -> FeatureBuilder:
    """The inputs the model's spec declares (sparse feature set and selections, dense columns)."""
    return feature_builder(config.model, dataset.path, dataset.num_users, dataset.num_items)


def unsharded_identity(name: str, model: torch.nn.Module) -> dict[str, Any]:
    """Model name and every embedding table's shape, read before sharding."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    tables = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for cfg in module.embedding_bag_configs():
                tables[cfg.name] = [cfg.num_embeddings, cfg.embedding_dim]
    return {"name": name, "tables": tables}


class Trainer(Stateful):
    def __init__(self, config: Config, ctx: DistContext, dataset: PreparedDataset, features: FeatureBuilder):
        self.config = config
        self.ctx = ctx
        self.dataset = dataset
        self.features = features
        # built on the meta device: no rank ever holds the whole model; shard() allocates this
        # rank's shards with the weights of the seeded rule (model/init.py)
        model = build_model(config.model.name, features, config.model, device=META)
        self.identity = unsharded_identity(config.model.name, model)
        sharded = shard(model, config, ctx)
        self.model, self.optimizer, self.placement = sharded.model, sharded.optimizer, sharded.placement
        self.huge_pages = sharded.huge_pages
        self.loss_fn = LOSSES.get(config.model.loss)
        self.step = 0
        self.epoch = 0
        self._handed_out: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None = None

    def model_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be loadable into this trainer's model."""
        return self.identity

    # ---------------------------------------------------------------------- step
    def apply(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1

    # ----------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state with sharded tensors in row chunks (train/state_chunks.py:
        a load needs one chunk of memory beside the tables, not a shard)."""
        model, optim = self.model.state_dict(), self.optimizer.state_dict()
        state = {
            "model": chunked(model),
            "optim": chunked(optim),
            "counters": torch.tensor([self.step, self.epoch], dtype=torch.int64),
        }
        self._handed_out = (state, model, optim)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model, optim = state["model"], state["optim"]
        if self._handed_out is not None and state is self._handed_out[0]:
            # loaded in place through the chunk views: apply the plain dicts they view
            _, plain_model, plain_optim = self._handed_out
            model, optim = take_back(plain_model, model), take_back(plain_optim, optim)
        self._handed_out = None
        self.model.load_state_dict(dict(model))
        self.optimizer.load_state_dict(optim)
        self.step, self.epoch = (int(x) for x in state["counters"].tolist())

    def model_state(self) -> dict[str, Any]:
        """The model's weights for a checkpoint (chunked views: saved from and loaded into the
        live weights in place)."""
        return {"model": chunked(self.model.state_dict())}
