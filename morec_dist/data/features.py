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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_dist.data import schema, storage
from morec_dist.data.storage import Location, StoragePath

FEATURE_SETS = ("ids", "side")


@dataclass(frozen=True)
class SparseFeature:
    name: str
    num_embeddings: int  # ids are 0..num_embeddings-1; 0 is padding / unknown


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


class FeatureBuilder:
    """Builds user-side and item-side KJTs from id arrays, for one feature selection."""

    def __init__(
        self,
        data_dir: str | Path | Location,
        num_users: int,
        num_items: int,
        feature_set: str = "ids",
        *,
        user_features: Sequence[str] | None = None,
        item_features: Sequence[str] | None = None,
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
