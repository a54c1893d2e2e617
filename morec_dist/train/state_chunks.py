"""Checkpoint items of bounded size: every sharded tensor of a state dict is handed to DCP as
row chunks of its local shards (views: no copy), so that saving and loading a table never
holds more than one chunk beside the table.

DCP writes each shard of a ShardedTensor as one item, and its reader materialises a whole
item before copying it into place: a rank holding a 4 GiB shard needed another 4 GiB to
resume. Cut into chunks of ``CHUNK_BYTES``, the extra memory of a load is one chunk. The
chunks keep the global offsets, so a checkpoint still reshards onto any world size and
sharding type, and one written before chunking (whole shards) still loads (each chunk then
reads the overlap of the whole item: correct, only slower).

``chunked(tree)`` returns the state tree with every ShardedTensor replaced by its chunked
view; ``take_back(plain, chunked)`` copies into the plain tree what DCP put into the chunked
tree's containers (non-tensor entries such as optimizer hyper-parameters; tensors were
loaded in place through the views).
"""

from __future__ import annotations

import math
from typing import Any

from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata

CHUNK_BYTES = 256 << 20


def rows_per_chunk(sizes: list[int], element_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    row_bytes = math.prod(sizes[1:]) * element_size
    return max(1, chunk_bytes // max(row_bytes, 1))


def split_metadata(shard: ShardMetadata, step: int) -> list[ShardMetadata]:
    """One shard's metadata as consecutive row chunks of ``step`` rows."""
    rows = shard.shard_sizes[0]
    return [
        ShardMetadata(
            shard_offsets=[shard.shard_offsets[0] + start, *shard.shard_offsets[1:]],
            shard_sizes=[min(step, rows - start), *shard.shard_sizes[1:]],
            placement=shard.placement,
        )
        for start in range(0, rows, step)
    ] or [shard]


def chunked_tensor(value: ShardedTensor, chunk_bytes: int = CHUNK_BYTES) -> ShardedTensor:
    """The same tensor with every shard (on every rank, so the global metadata agrees) cut
    into row chunks; the local chunks are views of this rank's shards."""
    meta = value.metadata()
    element = meta.tensor_properties.dtype.itemsize
    pieces: list[ShardMetadata] = []
    for shard_meta in meta.shards_metadata:
        pieces += split_metadata(shard_meta, rows_per_chunk(shard_meta.shard_sizes, element, chunk_bytes))
    local = []
    for shard in value.local_shards():
        step = rows_per_chunk(shard.metadata.shard_sizes, element, chunk_bytes)
        for piece in split_metadata(shard.metadata, step):
            start = piece.shard_offsets[0] - shard.metadata.shard_offsets[0]
            local.append(Shard(shard.tensor[start : start + piece.shard_sizes[0]], piece))
    global_meta = ShardedTensorMetadata(pieces, meta.size, meta.tensor_properties)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, global_meta, process_group=value._process_group
    )


def chunked(tree: Any, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """The state tree with its own containers and every ShardedTensor chunked (others shared)."""
    if isinstance(tree, ShardedTensor):
        return chunked_tensor(tree, chunk_bytes)
    if isinstance(tree, dict):
        return {k: chunked(v, chunk_bytes) for k, v in tree.items()}
    if isinstance(tree, list):
        return [chunked(v, chunk_bytes) for v in tree]
    return tree


def take_back(plain: Any, loaded: Any) -> Any:
    """``plain`` with the non-tensor leaves that a load put into ``loaded`` (its chunked twin)."""
    if isinstance(plain, ShardedTensor):
        return plain  # loaded in place through the chunk views
    if isinstance(plain, dict):
        return {k: take_back(v, loaded[k]) for k, v in plain.items()}
    if isinstance(plain, list):
        return [take_back(v, w) for v, w in zip(plain, loaded, strict=True)]
    return loaded
