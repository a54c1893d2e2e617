"""Sharding: a model built on the meta device becomes DistributedModelParallel, each rank
allocating only its own shards, and gets its optimizer.

``shard`` takes the unsharded model as built on the meta device (no weights anywhere),
initialises the dense part by the seeded rule of ``model/init.py``, lets the planner place the
tables (``model/placement.py``: types and kernels under memory budgets), wraps the model in
DistributedModelParallel (the dense part goes under DDP; each rank allocates its shards), and
writes the tables' initial rows by the same rule, so every world size and sharding type starts
from the weights the unsharded model would have. Then it builds the optimizer:

- tables with a FUSED kernel (every type but data_parallel) are updated inside backward
  by FBGEMM with ``optim.embedding_optimizer`` (sgd, adagrad, rowwise_adagrad: the
  ``EMBEDDING_OPTIMIZERS`` registry of ``model/choices.py``);
- data_parallel tables (DENSE kernel, replicated, gradients all-reduced by DDP) get the
  same update rule from the equivalent torch optimizer, since fused optimizers never
  reach DENSE-kernel tables;
- everything else (MLP towers) uses ``optim.dense_optimizer`` (``DENSE_OPTIMIZERS``).

On CPU the tables and their optimizer state then move to 2 MB pages (``model.huge_pages``,
``model/huge_pages.py``).

CPU + gloo and CUDA + the mixed gloo/NCCL group take the same code path; only the device and
the kernels the planner may choose differ. The stock sharder offers ROW_WISE /
TABLE_ROW_WISE only on CUDA although the FBGEMM CPU kernels run them exactly, so
``CpuRowWiseEmbeddingBagCollectionSharder`` offers them on CPU too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from morec_dist.config import Config, OptimConfig
from morec_dist.distributed import DistContext
from morec_dist.model.choices import ADAGRAD_EPS, DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS, OptimizerFactory
from morec_dist.model.huge_pages import HugePages, back_with_huge_pages
from morec_dist.model.init import initialize_dense, initialize_table_shards, table_dims, table_name_of
from morec_dist.model.placement import Placement, plan_tables
from morec_dist.model.spec import spec_of

# ---------------------------------------------------------------------- planning


class CpuRowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, also offering ROW_WISE and TABLE_ROW_WISE on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def fused_params(optim: OptimConfig) -> dict[str, Any]:
    rule = EMBEDDING_OPTIMIZERS.get(optim.embedding_optimizer)
    params: dict[str, Any] = {
        "optimizer": EmbOptimType[rule.fused],
        "learning_rate": optim.embedding_lr,
        "weight_decay": optim.embedding_weight_decay,
    }
    if rule.uses_eps:
        params["eps"] = ADAGRAD_EPS
    return params


def make_sharders(optim: OptimConfig) -> list[EmbeddingBagCollectionSharder]:
    return [CpuRowWiseEmbeddingBagCollectionSharder(fused_params=fused_params(optim))]


# -------------------------------------------------------------------- optimizers


def embedding_optimizer_factory(optim: OptimConfig) -> OptimizerFactory:
    """The torch optimizer with the fused kernel's update rule, for data_parallel tables."""
    return EMBEDDING_OPTIMIZERS.get(optim.embedding_optimizer).torch_optimizer(optim)


def dense_optimizer_factory(optim: OptimConfig) -> OptimizerFactory:
    return DENSE_OPTIMIZERS.get(optim.dense_optimizer)(optim)


def build_optimizer(dmp: DistributedModelParallel, types: dict[str, str], optim: OptimConfig) -> CombinedOptimizer:
    """Fused tables' optimizer (already applied in backward) + data_parallel tables + dense."""
    data_parallel_tables = {name for name, kind in types.items() if kind == "data_parallel"}
    replicated: dict[str, nn.Parameter] = {}
    dense: dict[str, nn.Parameter] = {}
    for name, param in dmp.named_parameters():
        if hasattr(param, "_in_backward_optimizers"):
            continue  # a fused table: updated by FBGEMM inside backward
        if table_name_of(name, data_parallel_tables) is not None:
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


@dataclass
class ShardedModel:
    """What ``shard`` returns: the DMP-wrapped model, its optimizer and where its tables went."""

    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    placement: Placement
    huge_pages: HugePages | None = None  # on CPU with model.huge_pages: what this rank got


def shard(model: nn.Module, config: Config, ctx: DistContext) -> ShardedModel:
    """Shard ``model``, built on the meta device, over ``ctx``'s process group.

    Weights are the rule's of ``model/init.py`` for ``run.seed``: no rank ever holds more
    of a table than its shards. Train through ``model(batch)`` so that DDP's hooks run; for
    inference, ``unwrap(model)`` is the model with its spec (its scorer's vectors or pairs
    issue the same collectives, so every rank must call them the same number of times).
    """
    if ctx.pg is None:
        raise RuntimeError("shard: no process group; call init_distributed() under torchrun first")
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("shard: build the model on the meta device (build_model(..., device=META))")
    dims = table_dims(model)
    initialize_dense(model, config.run.seed, ctx.device)
    sharders = make_sharders(config.optim)
    plan, placement = plan_tables(model, config.model, config.optim, sharders, ctx.device, ctx.pg)
    for caveat in optimizer_caveats(placement.types(), config.optim):
        warnings.warn(caveat, stacklevel=2)
    dmp = DistributedModelParallel(
        module=model, env=ShardingEnv.from_process_group(ctx.pg), device=ctx.device, plan=plan, sharders=sharders
    )
    initialize_table_shards(dmp, dims, config.run.seed, config.model.init_std)
    optimizer = build_optimizer(dmp, placement.types(), config.optim)
    huge = back_with_huge_pages(dmp) if config.model.huge_pages and ctx.device.type == "cpu" else None
    return ShardedModel(dmp, optimizer, placement, huge)


def unwrap(model: nn.Module) -> nn.Module:
    """The scoring model under any wrappers (DMP, DDP, a training wrapper that returns the
    loss): the first submodule that carries its ModelSpec (``build_model`` tags it), which
    says how it scores (``spec_of(module).scorer``)."""
    for module in model.modules():
        if spec_of(module) is not None:
            return module
    raise TypeError(f"{type(model).__name__}: no submodule carries a model spec (build the model with build_model)")
