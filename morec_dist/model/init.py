"""Weights at birth: every parameter is a pure function of (seed, its name, its row), so a
model built on the meta device and allocated shard by shard starts where the unsharded model
starts, on 1 rank, N ranks and every sharding type.

- Embedding tables: row r of table T is ``init_std * N(0, 1)`` drawn from a generator seeded
  by (seed, T, r // ROWS_PER_BLOCK); a shard generates the blocks that cover its rows, whole
  rows wide, and keeps its rows and columns. Memory is one block at a time, never the table.
- Everything else (MLP towers): each module's own ``reset_parameters`` on the CPU, under a
  generator seeded by (seed, module path), then moved to the device; so the towers do not
  depend on the order in which modules are visited, on the device or on the world size.

``materialize_unsharded`` applies both rules to a whole model (the unsharded reference of the
parity tests, a single-process tool); ``initialize_dense`` and ``initialize_table_shards``
are what sharding applies before and after DistributedModelParallel allocates the shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterator

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from morec_dist.model.placement import table_specs

META = torch.device("meta")
# Rows that share one generator seed: large enough that seeding costs nothing beside the
# draws, small enough that a shard edge wastes little (at most one block at each end).
ROWS_PER_BLOCK = 4096


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, identical in every process and Python version (no
    ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def table_block(seed: int, table: str, block: int, dim: int, std: float) -> torch.Tensor:
    """Rows [block * ROWS_PER_BLOCK, (block + 1) * ROWS_PER_BLOCK) of ``table``, all columns."""
    generator = torch.Generator().manual_seed(stable_seed(seed, table, block))
    return torch.empty(ROWS_PER_BLOCK, dim).normal_(0.0, std, generator=generator)


def table_window(
    seed: int, table: str, std: float, dim: int, rows: tuple[int, int], cols: tuple[int, int]
) -> Iterator[tuple[int, torch.Tensor]]:
    """The rule's values of rows [r0, r1) and columns [c0, c1), block by block:
    (offset of the piece within the window, piece)."""
    (r0, r1), (c0, c1) = rows, cols
    for block in range(r0 // ROWS_PER_BLOCK, -(-r1 // ROWS_PER_BLOCK)):
        start = block * ROWS_PER_BLOCK
        lo, hi = max(r0, start), min(r1, start + ROWS_PER_BLOCK)
        values = table_block(seed, table, block, dim, std)
        yield lo - r0, values[lo - start : hi - start, c0:c1]


@torch.no_grad()
def fill_table(
    target: torch.Tensor, seed: int, table: str, std: float, dim: int, row_offset: int = 0, col_offset: int = 0
) -> None:
    """Write the rule's values into ``target``, the window of the table that starts at
    (row_offset, col_offset) (a shard, or the whole table at (0, 0))."""
    rows = (row_offset, row_offset + target.shape[0])
    cols = (col_offset, col_offset + target.shape[1])
    for at, piece in table_window(seed, table, std, dim, rows, cols):
        target[at : at + piece.shape[0]].copy_(piece)


def table_dims(model: nn.Module) -> dict[str, int]:
    """Table name -> embedding dim, over every EmbeddingBagCollection of ``model`` (names unique)."""
    return {name: spec.dim for name, spec in table_specs(model).items()}


def table_name_of(key: str, tables: Container[str]) -> str | None:
    """The table among ``tables`` a parameter or state-dict key holds
    (``...embedding_bags.<table>.weight``), else None."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags" and parts[-2] in tables:
        return parts[-2]
    return None


def initialize_table_shards(model: nn.Module, dims: dict[str, int], seed: int, std: float) -> int:
    """Write every table's local rows (sharded or whole) by the rule; returns the values written."""
    written = 0
    for key, value in model.state_dict().items():
        table = table_name_of(key, dims)
        if table is None:
            continue
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                row, col = shard.metadata.shard_offsets[:2]
                fill_table(shard.tensor, seed, table, std, dims[table], row, col)
                written += shard.tensor.numel()
        else:
            fill_table(value, seed, table, std, dims[table])
            written += value.numel()
    return written


def inside_embedding_collection(path: str, collections: set[str]) -> bool:
    return any(path == c or path.startswith(c + ".") for c in collections)


@torch.no_grad()
def initialize_dense(model: nn.Module, seed: int, device: torch.device) -> None:
    """Allocate and initialise every parameter outside the embedding collections (left on
    the meta device for the sharder), module by module, by the seeded rule."""
    collections = {path for path, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}
    for path, module in model.named_modules():
        if inside_embedding_collection(path, collections):
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            raise TypeError(
                f"model module {path or '<root>'!r} ({type(module).__name__}) holds parameters but has no "
                "reset_parameters(); a model is built on the meta device and each module initialises "
                "itself (docs/extending.md)"
            )
        module.to_empty(device=torch.device("cpu"), recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(seed, "dense", path))
            reset()
        module.to(device)


def materialize_unsharded(model: nn.Module, seed: int, std: float, device: torch.device) -> nn.Module:
    """A meta-built model allocated whole on ``device`` with the rule's weights."""
    dims = table_dims(model)
    initialize_dense(model, seed, device)
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            module.to_empty(device=device)
    initialize_table_shards(model, dims, seed, std)
    return model
