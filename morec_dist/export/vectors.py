"""Entity vectors (items; MF's users) from the sharded model to Parquet parts, streamed.

Every rank writes its own parts (``layout.parts_of_rank``): it looks up one window of
``LOOKUP_ROWS`` ids at a time through the model's ``item_vectors`` / ``user_vectors`` (the
sharded lookups eval/ranking.py's ``range_item_vectors`` uses, so the vectors are the ones
evaluation scores with) and appends them to the part file as one row group. A rank holds
one window of vectors, never its range, let alone the catalogue. Lookups are collectives:
every rank makes the same number (``layout.lookup_rounds``), padding with id 0 past its own
windows. Raw ids come from the dataset's id map (``prepare parquet``), read per window with
a filter, so the map is never held whole either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from morec_dist.data import storage
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.data.storage import StoragePath
from morec_dist.distributed import DistContext
from morec_dist.export.layout import LOOKUP_ROWS, ExportError, Part, lookup_rounds, parts, parts_of_rank, vector_schema
from morec_dist.model.spec import as_recommender

# ids [n] (int64) -> vectors [n, d], any dtype and device
Lookup = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class Entity:
    """One side to export: its id column, how many, where its raw ids are (if anywhere)."""

    id_column: str  # "item_id" / "user_id"
    count: int
    id_map: StoragePath | None  # the dataset's id_map/<side>.parquet (raw_id, <id_column>)


def item_lookup(module: nn.Module, features: FeatureBuilder, device: torch.device) -> Lookup:
    """Item vectors as the model's spec scores with them (sparse and dense inputs)."""
    model = as_recommender(module)
    return lambda ids: model.item_vectors(features.item_kjt(ids).to(device), features.item_dense(ids).to(device))


def user_lookup(module: nn.Module, features: FeatureBuilder, device: torch.device) -> Lookup:
    model = as_recommender(module)
    return lambda ids: model.user_vectors(features.user_kjt(ids).to(device), features.user_dense(ids).to(device))


@torch.no_grad()
def vector_dim(lookup: Lookup) -> int:
    """Collective (one lookup of the padding id on every rank): the vectors' width."""
    return int(lookup(np.zeros(1, dtype=np.int64)).shape[1])


def id_map_of(dataset: PreparedDataset, rel: str) -> StoragePath | None:
    """The dataset's id map ``rel`` when its manifest lists one (a ``prepare parquet``
    dataset); raises if listed but missing, since the raw ids are then the contract."""
    if rel not in dataset.manifest.get("files", {}):
        return None
    path = dataset.path / rel
    if not storage.exists(path):
        raise ExportError(f"{path}: missing; the dataset's manifest lists it (raw ids come from it)")
    return path


def raw_id_type(entity: Entity) -> pa.DataType | None:
    if entity.id_map is None:
        return None
    return storage.read_schema(entity.id_map).field("raw_id").type


def raw_ids(entity: Entity, start: int, stop: int) -> pa.Array:
    """The raw ids of dense ids [start, stop), in id order; every id must be mapped."""
    assert entity.id_map is not None
    col = entity.id_column
    table = storage.read_table(
        entity.id_map, columns=["raw_id", col], filters=[(col, ">=", start), (col, "<", stop)]
    ).sort_by(col)
    ids = table[col].to_numpy()
    if ids.size != stop - start or (ids.size and (ids[0] != start or ids[-1] != stop - 1 or np.any(np.diff(ids) != 1))):
        raise ExportError(f"{entity.id_map}: does not map every {col} in {start}..{stop - 1} exactly once")
    return table["raw_id"].combine_chunks()


def vector_table(entity: Entity, start: int, vectors: np.ndarray, raw: pa.Array | None) -> pa.Table:
    n, dim = vectors.shape
    columns = [pa.array(np.arange(start, start + n, dtype=np.int32))]
    if raw is not None:
        columns.append(raw)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    columns.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    schema = vector_schema(entity.id_column, dim, raw.type if raw is not None else None)
    return pa.Table.from_arrays(columns, schema=schema)


@torch.no_grad()
def write_vectors(
    entity: Entity, lookup: Lookup, dim: int, out_dir: Path, ctx: DistContext, part_rows: int
) -> list[str]:
    """Collective: this rank's parts of ``entity`` into ``out_dir``; returns the names of
    every part (all ranks')."""
    everything = parts(entity.count, part_rows)
    window = min(LOOKUP_ROWS, part_rows)
    mine = [(p, a, b) for p in parts_of_rank(everything, ctx.rank, ctx.world_size) for a, b in p.chunks(window)]
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = vector_schema(entity.id_column, dim, raw_id_type(entity))
    writer: pq.ParquetWriter | None = None
    current: Part | None = None
    for step in range(lookup_rounds(everything, ctx.world_size, window)):
        ids = np.zeros(window, dtype=np.int64)  # id 0 pads: its vector is dropped
        part, a, b = mine[step] if step < len(mine) else (None, 0, 0)
        ids[: b - a] = np.arange(a, b)
        vectors = lookup(ids)[: b - a].to(device="cpu", dtype=torch.float32).numpy()
        if part is None:
            continue
        if part is not current:
            if writer is not None:
                writer.close()
            writer, current = pq.ParquetWriter(out_dir / part.name, schema, compression="zstd"), part
        raw = raw_ids(entity, a, b) if entity.id_map is not None else None
        assert writer is not None
        writer.write_table(vector_table(entity, a, vectors, raw), row_group_size=window)
    if writer is not None:
        writer.close()
    return [p.name for p in everything]
