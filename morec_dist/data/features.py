"""Turns user and item ids into the sparse model inputs (KeyedJaggedTensors) of a feature set.

The features are the ones the dataset's manifest declares (``manifest["features"]``, see
``schema.FeatureSpec``): single-hot (one id in 0..C per entity, 0 = missing) or multi-hot
(a list of ids in 1..C, sum-pooled by the model). A model picks which it uses
(``model.user_features`` / ``model.item_features``); ``user_id`` / ``item_id`` always come
first.

User and item features are the entity's own: they are read once from users.parquet /
items.parquet into catalogue-sized lookup arrays (dense by id; offsets + values for
multi-hot) and gathered by id. The interaction rows carry the same columns, but the lookup
is what every consumer needs anyway: sampled negatives and the full-ranking evaluator have
item ids and no rows, so reading the rows' copies would add bytes per row and no
information. Row-entity (context) features are not supported by the models yet.

Feature sets: ``ids`` (user_id | item_id: MF) and ``side`` (every declared user / item
feature: the two-tower default); explicit name lists override the set's choice.

Dense features are the second kind of input (TorchRec's dense_features beside the sparse
KJTs): numeric columns of users.parquet / items.parquet that a model declares
(``ModelSpec.dense_inputs``), read once into a float32 lookup [N + 1, D] by id (row 0, the
padding id, and ids the table lacks are 0) and gathered like the sparse ones, so sampled
negatives and evaluation's candidates get them too. Values are the column's, as float32: a
model owns its normalisation. ``batch`` assembles the ``Batch`` (ids, KJTs, dense tensors)
that training, evaluation and the signals feed a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_dist.data import schema, storage
from morec_dist.data.batch import UNIFORM_VERSION, Batch
from morec_dist.data.storage import Location, StoragePath

FEATURE_SETS = schema.FEATURE_SETS


@dataclass(frozen=True)
class SparseFeature:
    name: str
    num_embeddings: int  # ids are 0..num_embeddings-1; 0 is padding / unknown


@dataclass(frozen=True)
class DenseFeature:
    name: str  # the numeric column of users.parquet / items.parquet; one float32 value per entity


@dataclass(frozen=True)
class _Lookup:
    """One declared feature by entity id: single-hot values, or multi-hot offsets + values."""

    name: str
    num_embeddings: int
    values: np.ndarray  # single: [N + 1] int64 by id; multi: the flat list values
    offsets: np.ndarray | None = None  # multi: [N + 2], id i's values are values[offsets[i]:offsets[i + 1]]

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths) of the entities ``ids`` (int64), in order."""
        if self.offsets is None:
            return self.values[ids], np.ones(len(ids), dtype=np.int32)
        starts = self.offsets[ids]
        lengths = self.offsets[ids + 1] - starts
        total = int(lengths.sum())
        # position j of entity i reads values[starts[i] + j]
        index = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        return self.values[index], lengths.astype(np.int32)


def declared_features(data_dir: str | Path | Location) -> dict[str, schema.FeatureSpec]:
    """The manifest's declared features (empty for a dataset that declares none)."""
    path = storage.location(data_dir) / schema.MANIFEST
    if not storage.exists(path):
        return {}
    entries = json.loads(storage.read_text(path)).get("features", {}) or {}
    return {name: schema.FeatureSpec.from_manifest(name, entry) for name, entry in entries.items()}


def _load_lookup(table_path: StoragePath, id_column: str, spec: schema.FeatureSpec, count: int) -> _Lookup:
    table = storage.read_table(table_path, columns=[id_column, spec.name]).sort_by(id_column)
    ids = table[id_column].to_numpy().astype(np.int64)
    column = table[spec.name].combine_chunks()
    if spec.kind == "single":
        values = np.zeros(count + 1, dtype=np.int64)
        values[ids] = column.to_numpy(zero_copy_only=False)
        return _Lookup(spec.name, spec.cardinality + 1, values)
    lengths = np.zeros(count + 1, dtype=np.int64)
    lengths[ids] = np.diff(column.offsets.to_numpy())
    flat = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    # rows are in id order, so the table's flat values are already in offset order
    return _Lookup(spec.name, spec.cardinality + 1, flat, np.concatenate([[0], np.cumsum(lengths)]))


def _load_dense(table_path: StoragePath, id_column: str, names: Sequence[str], count: int) -> np.ndarray:
    """[count + 1, len(names)] float32 by id: the numeric columns ``names`` of the side table."""
    names = list(dict.fromkeys(names))
    out = np.zeros((count + 1, len(names)), dtype=np.float32)
    if not names:
        return out
    fields = storage.read_schema(table_path)
    numeric = [f.name for f in fields if _is_numeric(f.type) and f.name != id_column]
    for name in names:
        if name not in fields.names:
            raise ValueError(f"dense feature {name!r}: {table_path} has no column {name!r}; numeric columns: {numeric}")
        if name not in numeric:
            raise ValueError(
                f"dense feature {name!r}: column {name!r} of {table_path} is {fields.field(name).type}, "
                f"expected a number; numeric columns: {numeric}"
            )
    table = storage.read_table(table_path, columns=[id_column, *names])
    ids = table[id_column].to_numpy().astype(np.int64)
    for j, name in enumerate(names):
        column = table[name]
        if column.null_count:
            raise ValueError(f"dense feature {name!r}: column {name!r} of {table_path} has {column.null_count} nulls")
        out[ids, j] = column.to_numpy().astype(np.float32)
    return out


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


class FeatureBuilder:
    """Builds user-side and item-side KJTs and dense tensors from id arrays, for one feature
    selection, and the Batch of (user, items) rows."""

    def __init__(
        self,
        data_dir: str | Path | Location,
        num_users: int,
        num_items: int,
        feature_set: str = "ids",
        *,
        user_features: Sequence[str] | None = None,
        item_features: Sequence[str] | None = None,
        user_dense: Sequence[str] = (),
        item_dense: Sequence[str] = (),
    ):
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature set {feature_set!r}: expected one of {FEATURE_SETS}")
        self.num_users = num_users
        self.num_items = num_items
        declared = declared_features(data_dir) if (feature_set == "side" or user_features or item_features) else {}
        users = self._selection(declared, "user", user_features, feature_set, data_dir)
        items = self._selection(declared, "item", item_features, feature_set, data_dir)
        self.feature_set = "side" if (users or items or feature_set == "side") else "ids"
        root = storage.location(data_dir)
        self._user_side = [_load_lookup(root / schema.USERS_FILE, "user_id", declared[n], num_users) for n in users]
        self._item_side = [_load_lookup(root / schema.ITEMS_FILE, "item_id", declared[n], num_items) for n in items]
        self._user_dense_names = list(dict.fromkeys(user_dense))
        self._item_dense_names = list(dict.fromkeys(item_dense))
        self._user_dense = _load_dense(root / schema.USERS_FILE, "user_id", self._user_dense_names, num_users)
        self._item_dense = _load_dense(root / schema.ITEMS_FILE, "item_id", self._item_dense_names, num_items)

    @staticmethod
    def _selection(declared, entity: str, names: Sequence[str] | None, feature_set: str, data_dir) -> list[str]:
        of_entity = [n for n, spec in declared.items() if spec.entity == entity]
        if names is None:
            return of_entity if feature_set == "side" else []
        unknown = [n for n in names if n not in of_entity]
        if unknown:
            raise ValueError(
                f"model.{entity}_features: {unknown} are not {entity} features declared in "
                f"{storage.location(data_dir) / schema.MANIFEST}; declared {entity} features: {of_entity}"
            )
        return list(dict.fromkeys(names))

    def user_features(self) -> list[SparseFeature]:
        return [SparseFeature("user_id", self.num_users + 1)] + [
            SparseFeature(f.name, f.num_embeddings) for f in self._user_side
        ]

    def item_features(self) -> list[SparseFeature]:
        return [SparseFeature("item_id", self.num_items + 1)] + [
            SparseFeature(f.name, f.num_embeddings) for f in self._item_side
        ]

    @staticmethod
    def _kjt(id_key: str, ids: np.ndarray, side: list[_Lookup]) -> KeyedJaggedTensor:
        n = len(ids)
        if not side:
            return KeyedJaggedTensor(
                keys=[id_key], values=torch.from_numpy(ids), lengths=torch.ones(n, dtype=torch.int32)
            )
        values, lengths = [ids], [np.ones(n, dtype=np.int32)]
        for lookup in side:
            v, length = lookup.gather(ids)
            values.append(v)
            lengths.append(length)
        return KeyedJaggedTensor(
            keys=[id_key] + [f.name for f in side],
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )

    def user_kjt(self, user_ids: np.ndarray) -> KeyedJaggedTensor:
        return self._kjt("user_id", np.asarray(user_ids, dtype=np.int64).reshape(-1), self._user_side)

    def item_kjt(self, item_ids: np.ndarray) -> KeyedJaggedTensor:
        return self._kjt("item_id", np.asarray(item_ids, dtype=np.int64).reshape(-1), self._item_side)

    def user_dense_features(self) -> list[DenseFeature]:
        return [DenseFeature(n) for n in self._user_dense_names]

    def item_dense_features(self) -> list[DenseFeature]:
        return [DenseFeature(n) for n in self._item_dense_names]

    def user_dense(self, user_ids: np.ndarray) -> torch.Tensor:
        """[n, D_user] float32 (D_user = 0 when the model reads no user dense feature)."""
        return torch.from_numpy(self._user_dense[np.asarray(user_ids, dtype=np.int64).reshape(-1)])

    def item_dense(self, item_ids: np.ndarray) -> torch.Tensor:
        """[n, D_item] float32, rows in the (row-major) order of ``item_ids``."""
        return torch.from_numpy(self._item_dense[np.asarray(item_ids, dtype=np.int64).reshape(-1)])

    def batch(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        block_ids: np.ndarray | None = None,
        version: int = UNIFORM_VERSION,
    ) -> Batch:
        """The Batch of users [N] against their items [N, C] (row-major: row n's C items)."""
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        items = np.asarray(item_ids, dtype=np.int64).reshape(len(users), -1)
        blocks = np.zeros(len(users), dtype=np.int64) if block_ids is None else np.asarray(block_ids, np.int64)
        return Batch(
            user_ids=torch.from_numpy(users),
            item_ids=torch.from_numpy(np.ascontiguousarray(items)),
            block_ids=torch.from_numpy(blocks),
            user_kjt=self.user_kjt(users),
            item_kjt=self.item_kjt(items),
            version=version,
            user_dense=self.user_dense(users),
            item_dense=self.item_dense(items),
        )
