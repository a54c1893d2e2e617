"""Placement: which rank holds which rows and columns of every table, and with which kernel.

TorchRec's planner chooses them under per-rank memory budgets (``model.host_memory_gb``,
``model.device_memory_gb``; unset = this machine's memory shared by its local ranks, or the
GPU's). A table named in ``model.sharding`` (or every table, when ``model.default_sharding``
names a type) is pinned to that type and its kernel; ``"auto"`` leaves type and kernel to the
planner. On CUDA the planner may put a table in UVM with an HBM cache (``fused_uvm_caching``)
when it does not fit the device budget.

A budget that cannot hold the tables fails here, before any memory is allocated, with one
line naming the table, its bytes and the budget. The chosen plan is summarised per table
(type, kernel, bytes per rank) for the start-up print, the run's record and Prometheus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from morec_dist.config import ModelConfig, OptimConfig
from morec_dist.model.choices import AUTO, SHARDING_TYPES

GB = 1 << 30  # the budgets and the messages are in GiB

TYPE_NAMES = {SHARDING_TYPES.get(name): name for name in SHARDING_TYPES.names()}
SPLIT_TYPES = ("row_wise", "column_wise", "table_row_wise", "table_column_wise")  # spread one table
COLUMN_SPLIT_TYPES = ("column_wise", "table_column_wise")

# Kernels the planner may choose for an "auto" table, by device: the in-memory fused kernel,
# and on CUDA UVM with an HBM cache for tables beyond the device budget. (The key-value and
# SSD kernels need storage this project does not configure.)
AUTO_KERNELS = {
    "cpu": [EmbeddingComputeKernel.FUSED.value],
    "cuda": [EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.FUSED_UVM_CACHING.value],
}


@dataclass(frozen=True)
class TableSpec:
    """What placement needs of one table, read from the (meta-device) model."""

    name: str
    rows: int
    dim: int
    element_bytes: int

    def weight_bytes(self) -> int:
        return self.rows * self.dim * self.element_bytes


@dataclass(frozen=True)
class TablePlacement:
    table: str
    sharding_type: str  # a SHARDING_TYPES name
    compute_kernel: str
    bytes_per_rank: tuple[int, ...]  # the table's weights each rank holds


@dataclass(frozen=True)
class Placement:
    tables: tuple[TablePlacement, ...]
    host_budget_bytes: int
    device_budget_bytes: int  # 0 on CPU

    def types(self) -> dict[str, str]:
        return {t.table: t.sharding_type for t in self.tables}

    def rank_bytes(self, rank: int) -> int:
        return sum(t.bytes_per_rank[rank] for t in self.tables)

    def rank_tables(self, rank: int) -> list[tuple[str, str, str, int]]:
        """(table, type, kernel, bytes on ``rank``) of every table: what a rank exports."""
        return [(t.table, t.sharding_type, t.compute_kernel, t.bytes_per_rank[rank]) for t in self.tables]

    def record(self) -> dict[str, Any]:
        """For the run's metadata (JSON)."""
        return {
            "host_budget_bytes": self.host_budget_bytes,
            "device_budget_bytes": self.device_budget_bytes,
            "tables": {
                t.table: {"sharding_type": t.sharding_type, "compute_kernel": t.compute_kernel,
                          "bytes_per_rank": list(t.bytes_per_rank)}
                for t in self.tables
            },
        }  # fmt: skip

    def lines(self) -> list[str]:
        """The start-up print: one line per table."""
        return [
            f"  {t.table}: {t.sharding_type} / {t.compute_kernel}, per rank "
            + " ".join(f"{b / GB:.3f}" for b in t.bytes_per_rank)
            + " GiB"
            for t in self.tables
        ]


# ------------------------------------------------------------------------ tables


def table_specs(model: nn.Module) -> dict[str, TableSpec]:
    """Every table of the model's EmbeddingBagCollections; names must be unique."""
    specs: dict[str, TableSpec] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for config in module.embedding_bag_configs():
                if config.name in specs:
                    raise ValueError(f"embedding table {config.name!r} appears twice; table names must be unique")
                element = torch.empty((), dtype=_torch_dtype(config.data_type)).element_size()
                specs[config.name] = TableSpec(config.name, config.num_embeddings, config.embedding_dim, element)
    return specs


def _torch_dtype(data_type: Any) -> torch.dtype:
    from torchrec.types import DataType

    return {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}.get(
        data_type, torch.float32
    )


def optimizer_state_bytes(spec: TableSpec, optimizer: str) -> int:
    """The embedding optimizer's state for the whole table (fp32)."""
    per_row = {"sgd": 0, "rowwise_adagrad": 4, "adagrad": 4 * spec.dim}.get(optimizer, 4 * spec.dim)
    return spec.rows * per_row


def table_sharding_types(specs: dict[str, TableSpec], config: ModelConfig) -> dict[str, str]:
    """Each table's configured type (a SHARDING_TYPES name or "auto"); names must exist."""
    unknown = sorted(set(config.sharding) - set(specs))
    if unknown:
        raise ValueError(f"model.sharding: unknown table(s) {unknown}; the model's tables are {sorted(specs)}")
    for table, kind in {"default": config.default_sharding, **config.sharding}.items():
        if kind != AUTO:
            SHARDING_TYPES.get(kind, "model.default_sharding" if table == "default" else f"model.sharding.{table}")
    return {name: config.sharding.get(name, config.default_sharding) for name in specs}


def candidate_types(kind: str, optimizer: str) -> list[str]:
    """The types the planner may pick for a table configured as ``kind``.

    An "auto" table is never data_parallel: its optimizer state would live in a torch
    optimizer instead of the fused kernel's, so a checkpoint could not move to a world size
    whose plan differs (pin data_parallel to have it). Under rowwise_adagrad it is never
    split by columns either: each column shard would keep its own per-row accumulator, and
    the updates would differ from the unsharded model's."""
    if kind != AUTO:
        return [kind]
    return [
        n
        for n in SHARDING_TYPES.names()
        if n != "data_parallel" and not (optimizer == "rowwise_adagrad" and n in COLUMN_SPLIT_TYPES)
    ]


# ---------------------------------------------------------------------- budgets


def host_budget_bytes(config: ModelConfig, local_world_size: int) -> int:
    if config.host_memory_gb > 0:
        return int(config.host_memory_gb * GB)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(local_world_size, 1)


def device_budget_bytes(config: ModelConfig, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if config.device_memory_gb > 0:
        return int(config.device_memory_gb * GB)
    return int(torch.cuda.get_device_properties(device).total_memory)


def check_budget(
    specs: dict[str, TableSpec], kinds: dict[str, str], optim: OptimConfig, world_size: int, budget: int, flag: str
) -> None:
    """Refuse, in one line, a table or a table set that no placement can fit in ``budget``
    bytes per rank (weights plus optimizer state, at the finest split the config allows)."""
    smallest: dict[str, int] = {}
    for name, spec in specs.items():
        whole = spec.weight_bytes() + optimizer_state_bytes(spec, optim.embedding_optimizer)
        splittable = any(t in SPLIT_TYPES for t in candidate_types(kinds[name], optim.embedding_optimizer))
        smallest[name] = -(-whole // world_size) if splittable else whole
        if smallest[name] > budget:
            how = f"split over {world_size} ranks" if splittable else f"whole ({kinds[name]})"
            raise ValueError(
                f"{flag}: table {name!r} needs {smallest[name] / GB:.2f} GiB per rank at the least ({how}, with "
                f"{optim.embedding_optimizer} state) but the budget is {budget / GB:.2f} GiB per rank"
            )
    if sum(smallest.values()) > budget:
        raise ValueError(
            f"{flag}: the tables need {sum(smallest.values()) / GB:.2f} GiB per rank at the least over "
            f"{world_size} ranks but the budget is {budget / GB:.2f} GiB per rank"
        )


# ----------------------------------------------------------------------- plan


def parameter_constraints(
    specs: dict[str, TableSpec], kinds: dict[str, str], optimizer: str, world_size: int, device_type: str
) -> dict[str, ParameterConstraints]:
    """Pinned tables get their type and kernel; "auto" tables the candidate types and the
    device's kernels. Column-wise shards may be as narrow as dim / world_size (FBGEMM needs
    multiples of 4), so that column_wise actually spreads a table over the ranks."""
    constraints = {}
    for name, kind in kinds.items():
        types = candidate_types(kind, optimizer)
        if kind == AUTO:
            kernels = list(AUTO_KERNELS.get(device_type, AUTO_KERNELS["cpu"]))
        else:
            kernels = [
                EmbeddingComputeKernel.DENSE.value if kind == "data_parallel" else EmbeddingComputeKernel.FUSED.value
            ]
        constraints[name] = ParameterConstraints(
            sharding_types=[SHARDING_TYPES.get(t) for t in types],
            compute_kernels=kernels,
            min_partition=max(4, specs[name].dim // max(world_size, 1)),
        )
    return constraints


def plan_tables(
    model: nn.Module, config: ModelConfig, optim: OptimConfig, sharders: list, device: torch.device,
    pg: dist.ProcessGroup,
) -> tuple[ShardingPlan, Placement]:  # fmt: skip
    """The plan (made on rank 0, broadcast) and its per-table summary."""
    world_size = pg.size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    specs = table_specs(model)
    kinds = table_sharding_types(specs, config)
    host, hbm = host_budget_bytes(config, local_world_size), device_budget_bytes(config, device)
    if device.type == "cuda":
        # what does not fit HBM may live in host memory behind a cache: only the sum must fit
        check_budget(specs, kinds, optim, world_size, hbm + host, "model.device_memory_gb + model.host_memory_gb")
    else:
        check_budget(specs, kinds, optim, world_size, host, "model.host_memory_gb")
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=hbm if device.type == "cuda" else None,
            ddr_cap_bytes=host,
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    constraints = parameter_constraints(specs, kinds, optim.embedding_optimizer, world_size, device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    try:
        plan = planner.collective_plan(model, sharders, pg)
    except PlannerError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"model: TorchRec's planner found no placement of the tables ({', '.join(sorted(specs))}) within "
            f"{host / GB:.2f} GiB host" + (f" + {hbm / GB:.2f} GiB device" if hbm else "") + f" per rank: {first}"
        ) from None
    return plan, summarize(plan, specs, world_size, host, hbm)


def summarize(plan: ShardingPlan, specs: dict[str, TableSpec], world_size: int, host: int, hbm: int) -> Placement:
    """Per table: its type, kernel and the bytes of its weights on each rank."""
    tables = []
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():
            spec = specs[name]
            per_rank = [0] * world_size
            if sharding.sharding_spec is None:  # data_parallel: a replica everywhere
                per_rank = [spec.weight_bytes()] * world_size
            else:
                for shard in sharding.sharding_spec.shards:
                    rows, cols = shard.shard_sizes[:2]
                    per_rank[shard.placement.rank()] += rows * cols * spec.element_bytes
            tables.append(
                TablePlacement(name, TYPE_NAMES[sharding.sharding_type], sharding.compute_kernel, tuple(per_rank))
            )
    return Placement(tuple(sorted(tables, key=lambda t: t.table)), host, hbm)
