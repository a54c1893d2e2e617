"""Distributed setup and sharding: process group, DistributedModelParallel, optimizers.

The model is written once, unsharded. ``shard`` plans it with TorchRec's planner (one
sharding type per table, from ``model.sharding`` or ``model.default_sharding``), wraps it
in DistributedModelParallel (the non-embedding part goes under DDP), copies the unsharded
weights in (sharding re-initialises tables), and builds the optimizer:

- tables with a FUSED kernel (every type but data_parallel) are updated inside backward
  by FBGEMM with ``optim.embedding_optimizer`` (sgd, adagrad, rowwise_adagrad: the
  ``EMBEDDING_OPTIMIZERS`` registry);
- data_parallel tables (DENSE kernel, replicated, gradients all-reduced by DDP) get the
  same update rule from the equivalent torch optimizer, since fused optimizers never
  reach DENSE-kernel tables;
- everything else (MLP towers) uses ``optim.dense_optimizer`` (``DENSE_OPTIMIZERS``).

Sharding types are the ``SHARDING_TYPES`` registry.

CPU + gloo and CUDA + NCCL take the same code path; only the device and backend differ.
The stock sharder offers ROW_WISE / TABLE_ROW_WISE only on CUDA although the FBGEMM CPU
kernels run them exactly, so ``CpuRowWiseEmbeddingBagCollectionSharder`` offers them on
CPU too.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from morec_dist.config import Config, ModelConfig, OptimConfig
from morec_dist.registry import Registry

# The Adagrad epsilon of both paths (FBGEMM's fused kernel and the torch optimizers for
# data_parallel tables), fixed so that the two apply the same update.
ADAGRAD_EPS = 1e-8

# Sharding types by name (``model.default_sharding`` / ``model.sharding.<table>``): the only
# list of them. data_parallel tables are replicated with a DENSE kernel; all others FUSED.
SHARDING_TYPES: Registry[ShardingType] = Registry("sharding type", "model.default_sharding / model.sharding.<table>")
for _name, _type in (
    ("table_wise", ShardingType.TABLE_WISE),
    ("row_wise", ShardingType.ROW_WISE),
    ("column_wise", ShardingType.COLUMN_WISE),
    ("table_row_wise", ShardingType.TABLE_ROW_WISE),
    ("table_column_wise", ShardingType.TABLE_COLUMN_WISE),
    ("data_parallel", ShardingType.DATA_PARALLEL),
):
    SHARDING_TYPES.register(_name, _type)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """One embedding update rule on both paths: FBGEMM's fused kernel (sharded tables) and
    the equivalent torch optimizer (data_parallel tables, which fused optimizers never reach)."""

    fused: EmbOptimType
    torch_optimizer: Callable[[OptimConfig], OptimizerFactory]
    uses_eps: bool = True  # the fused kernel takes ADAGRAD_EPS


# ``optim.embedding_optimizer`` -> its update rule; ``optim.dense_optimizer`` -> a torch factory
EMBEDDING_OPTIMIZERS: Registry[EmbeddingOptimizer] = Registry("embedding optimizer", "optim.embedding_optimizer")
DENSE_OPTIMIZERS: Registry[Callable[[OptimConfig], OptimizerFactory]] = Registry(
    "dense optimizer", "optim.dense_optimizer"
)


def _embedding_sgd(o: OptimConfig) -> OptimizerFactory:
    return lambda params: torch.optim.SGD(params, lr=o.embedding_lr, weight_decay=o.embedding_weight_decay)


def _embedding_adagrad(o: OptimConfig) -> OptimizerFactory:
    return lambda params: torch.optim.Adagrad(
        params, lr=o.embedding_lr, weight_decay=o.embedding_weight_decay, eps=ADAGRAD_EPS
    )


def _embedding_rowwise_adagrad(o: OptimConfig) -> OptimizerFactory:
    return lambda params: RowWiseAdagrad(
        params, lr=o.embedding_lr, weight_decay=o.embedding_weight_decay, eps=ADAGRAD_EPS
    )


EMBEDDING_OPTIMIZERS.register("sgd", EmbeddingOptimizer(EmbOptimType.EXACT_SGD, _embedding_sgd, uses_eps=False))
EMBEDDING_OPTIMIZERS.register("adagrad", EmbeddingOptimizer(EmbOptimType.EXACT_ADAGRAD, _embedding_adagrad))
EMBEDDING_OPTIMIZERS.register(
    "rowwise_adagrad", EmbeddingOptimizer(EmbOptimType.EXACT_ROWWISE_ADAGRAD, _embedding_rowwise_adagrad)
)
DENSE_OPTIMIZERS.register("adam", lambda o: lambda params: torch.optim.Adam(params, lr=o.dense_lr))
DENSE_OPTIMIZERS.register("sgd", lambda o: lambda params: torch.optim.SGD(params, lr=o.dense_lr))
DENSE_OPTIMIZERS.register("adagrad", lambda o: lambda params: torch.optim.Adagrad(params, lr=o.dense_lr))


# ---------------------------------------------------------------------- planning


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, also offering ROW_WISE and TABLE_ROW_WISE on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def embedding_tables(model: nn.Module) -> dict[str, int]:
    """Table name -> embedding dim, over every EmbeddingBagCollection of the model."""
    tables: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for config in module.embedding_bag_configs():
                if config.name in tables:
                    raise ValueError(f"embedding table {config.name!r} appears twice; table names must be unique")
                tables[config.name] = config.embedding_dim
    return tables


def table_sharding_types(model: nn.Module, config: ModelConfig) -> dict[str, str]:
    """The configured sharding type of every table; names in model.sharding must exist."""
    tables = embedding_tables(model)
    unknown = sorted(set(config.sharding) - set(tables))
    if unknown:
        raise ValueError(f"model.sharding: unknown table(s) {unknown}; the model's tables are {sorted(tables)}")
    for table, kind in {"default": config.default_sharding, **config.sharding}.items():
        SHARDING_TYPES.get(kind, "model.default_sharding" if table == "default" else f"model.sharding.{table}")
    return {name: config.sharding.get(name, config.default_sharding) for name in tables}


def parameter_constraints(
    types: dict[str, str], dims: dict[str, int], world_size: int
) -> dict[str, ParameterConstraints]:
    """Pin each table to its sharding type and the matching kernel.

    Column-wise shards may be as narrow as dim / world_size (FBGEMM needs multiples of 4),
    so that column_wise actually spreads a table over the ranks."""
    constraints = {}
    for name, kind in types.items():
        kernel = EmbeddingComputeKernel.DENSE if kind == "data_parallel" else EmbeddingComputeKernel.FUSED
        min_partition = max(4, dims[name] // max(world_size, 1))
        constraints[name] = ParameterConstraints(
            sharding_types=[SHARDING_TYPES.get(kind).value],
            compute_kernels=[kernel.value],
            min_partition=min_partition,
        )
    return constraints


def fused_params(optim: OptimConfig) -> dict[str, Any]:
    rule = EMBEDDING_OPTIMIZERS.get(optim.embedding_optimizer)
    params: dict[str, Any] = {
        "optimizer": rule.fused,
        "learning_rate": optim.embedding_lr,
        "weight_decay": optim.embedding_weight_decay,
    }
    if rule.uses_eps:
        params["eps"] = ADAGRAD_EPS
    return params


def make_sharders(optim: OptimConfig) -> list[EmbeddingBagCollectionSharder]:
    return [CpuRowWiseEmbeddingBagCollectionSharder(fused_params=fused_params(optim))]


def make_plan(
    model: nn.Module, config: ModelConfig, sharders: list, device: torch.device, pg: dist.ProcessGroup
) -> tuple[ShardingPlan, dict[str, str]]:
    """The plan (made on rank 0, broadcast) and each table's sharding type."""
    world_size = pg.size()
    types = table_sharding_types(model, config)
    constraints = parameter_constraints(types, embedding_tables(model), world_size)
    topology = Topology(
        world_size=world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        compute_device=device.type,
    )
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders, pg), types


# -------------------------------------------------------------------- optimizers


def embedding_optimizer_factory(optim: OptimConfig) -> OptimizerFactory:
    """The torch optimizer with the fused kernel's update rule, for data_parallel tables."""
    return EMBEDDING_OPTIMIZERS.get(optim.embedding_optimizer).torch_optimizer(optim)


def dense_optimizer_factory(optim: OptimConfig) -> OptimizerFactory:
    return DENSE_OPTIMIZERS.get(optim.dense_optimizer)(optim)


def is_table_param(param_name: str, tables: set[str]) -> bool:
    parts = param_name.split(".")
    return len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags" and parts[-2] in tables


def build_optimizer(dmp: DistributedModelParallel, types: dict[str, str], optim: OptimConfig) -> CombinedOptimizer:
    """Fused tables' optimizer (already applied in backward) + data_parallel tables + dense."""
    data_parallel_tables = {name for name, kind in types.items() if kind == "data_parallel"}
    replicated: dict[str, nn.Parameter] = {}
    dense: dict[str, nn.Parameter] = {}
    for name, param in dmp.named_parameters():
        if hasattr(param, "_in_backward_optimizers"):
            continue  # a fused table: updated by FBGEMM inside backward
        if is_table_param(name, data_parallel_tables):
            replicated[name] = param
        else:
            dense[name] = param
    parts: list[tuple[str, KeyedOptimizer]] = [("embedding_fused", dmp.fused_optimizer)]
    if replicated:
        parts.append(("embedding_replicated", KeyedOptimizerWrapper(replicated, embedding_optimizer_factory(optim))))
    if dense:
        parts.append(("dense", KeyedOptimizerWrapper(dense, dense_optimizer_factory(optim))))
    return CombinedOptimizer(parts)


def optimizer_caveats(types: dict[str, str], optim: OptimConfig) -> list[str]:
    """Combinations that train correctly but not exactly like the unsharded model."""
    if optim.embedding_optimizer != "rowwise_adagrad":
        return []
    split_columns = sorted(t for t, kind in types.items() if kind in ("column_wise", "table_column_wise"))
    if not split_columns:
        return []
    return [
        f"tables {split_columns} are column-wise sharded with rowwise_adagrad: each column shard keeps "
        "its own per-row accumulator (mean of g^2 over its columns only), so updates differ from "
        "an unsharded RowWiseAdagrad; use adagrad/sgd or another sharding type for exact parity"
    ]


# ------------------------------------------------------------------------ shard


def shard(
    model: nn.Module, config: Config, device: torch.device, pg: dist.ProcessGroup | None
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Shard ``model`` over the process group; the result holds exactly the model's weights.

    Every rank must pass the same model (same seed). Train through ``dmp(batch)`` so that
    DDP's hooks run; the helper methods are on ``dmp.module`` (``user_vectors``,
    ``item_vectors``) and are for inference (they issue the same collectives, so every
    rank must call them the same number of times).
    """
    if pg is None:
        raise RuntimeError("shard: no process group; call init_distributed() under torchrun first")
    weights = copy.deepcopy(model.state_dict())
    sharders = make_sharders(config.optim)
    plan, types = make_plan(model, config.model, sharders, device, pg)
    for caveat in optimizer_caveats(types, config.optim):
        warnings.warn(caveat, stacklevel=2)
    dmp = DistributedModelParallel(
        module=model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders
    )
    # Sharding re-initialises the tables; put the unsharded model's weights back (DMP's
    # load_state_dict consumes the dict it gets, hence the copy above).
    dmp.load_state_dict(weights)
    return dmp, build_optimizer(dmp, types, config.optim)


def unwrap(model: nn.Module) -> nn.Module:
    """The scoring model under any wrappers (DMP, DDP, a training wrapper that returns the
    loss): the first submodule with ``user_vectors`` and ``item_vectors``."""
    for module in model.modules():
        if callable(getattr(module, "user_vectors", None)) and callable(getattr(module, "item_vectors", None)):
            return module
    raise TypeError(f"{type(model).__name__}: no submodule has user_vectors / item_vectors")
