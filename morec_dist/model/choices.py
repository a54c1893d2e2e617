"""The model layer's named choices a config makes outside a model's spec: each table's
sharding type (``model.default_sharding`` / ``model.sharding.<table>``) and the embedding and
dense optimizers (``optim.embedding_optimizer`` / ``optim.dense_optimizer``), each registry the
only list of its names.

Light on purpose: entries name TorchRec's and FBGEMM's values as strings and import torch
inside their factories, so the CLI's launcher checks a config's names without loading the
training stack; ``model/placement.py`` and ``model/sharding.py`` turn them into TorchRec's
types where they plan and shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from morec_dist.config import OptimConfig
from morec_dist.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

AUTO = "auto"  # model.default_sharding / model.sharding.<table>: the planner chooses

# Sharding types by name -> TorchRec's ShardingType value. data_parallel tables are replicated
# with a DENSE kernel; all others FUSED.
SHARDING_TYPES: Registry[str] = Registry("sharding type", "model.default_sharding / model.sharding.<table>")
for _name in ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel"):
    SHARDING_TYPES.register(_name, _name)  # TorchRec's values are these names (tests check it)

# The Adagrad epsilon of both paths (FBGEMM's fused kernel and the torch optimizers for
# data_parallel tables), fixed so that the two apply the same update.
ADAGRAD_EPS = 1e-8

OptimizerFactory = Callable[[list["nn.Parameter"]], "torch.optim.Optimizer"]


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """One embedding update rule on both paths: FBGEMM's fused kernel (sharded tables; the
    name of its ``EmbOptimType`` member) and the equivalent torch optimizer (data_parallel
    tables, which fused optimizers never reach)."""

    fused: str
    torch_optimizer: Callable[[OptimConfig], OptimizerFactory]
    uses_eps: bool = True  # the fused kernel takes ADAGRAD_EPS


# ``optim.embedding_optimizer`` -> its update rule; ``optim.dense_optimizer`` -> a torch factory
EMBEDDING_OPTIMIZERS: Registry[EmbeddingOptimizer] = Registry("embedding optimizer", "optim.embedding_optimizer")
DENSE_OPTIMIZERS: Registry[Callable[[OptimConfig], OptimizerFactory]] = Registry(
    "dense optimizer", "optim.dense_optimizer"
)


def _embedding_sgd(o: OptimConfig) -> OptimizerFactory:
    import torch

    return lambda params: torch.optim.SGD(params, lr=o.embedding_lr, weight_decay=o.embedding_weight_decay)


def _embedding_adagrad(o: OptimConfig) -> OptimizerFactory:
    import torch

    return lambda params: torch.optim.Adagrad(
        params, lr=o.embedding_lr, weight_decay=o.embedding_weight_decay, eps=ADAGRAD_EPS
    )


def _embedding_rowwise_adagrad(o: OptimConfig) -> OptimizerFactory:
    from torchrec.optim import RowWiseAdagrad

    return lambda params: RowWiseAdagrad(
        params, lr=o.embedding_lr, weight_decay=o.embedding_weight_decay, eps=ADAGRAD_EPS
    )


def _dense(optimizer: str) -> Callable[[OptimConfig], OptimizerFactory]:
    """The dense factory of ``torch.optim.<optimizer>`` at ``optim.dense_lr``."""

    def factory(o: OptimConfig) -> OptimizerFactory:
        import torch

        return lambda params: getattr(torch.optim, optimizer)(params, lr=o.dense_lr)

    return factory


EMBEDDING_OPTIMIZERS.register("sgd", EmbeddingOptimizer("EXACT_SGD", _embedding_sgd, uses_eps=False))
EMBEDDING_OPTIMIZERS.register("adagrad", EmbeddingOptimizer("EXACT_ADAGRAD", _embedding_adagrad))
EMBEDDING_OPTIMIZERS.register(
    "rowwise_adagrad", EmbeddingOptimizer("EXACT_ROWWISE_ADAGRAD", _embedding_rowwise_adagrad)
)
DENSE_OPTIMIZERS.register("adam", _dense("Adam"))
DENSE_OPTIMIZERS.register("sgd", _dense("SGD"))
DENSE_OPTIMIZERS.register("adagrad", _dense("Adagrad"))
