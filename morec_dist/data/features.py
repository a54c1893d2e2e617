"""Turns user and item ids into the sparse model inputs (KeyedJaggedTensors) of a feature set.

The side tables (users.parquet, items.parquet) are catalogue-sized, so they are held in
memory as dense lookup arrays indexed by id; the interaction data never is. A feature set
names which sparse features each side has; the model builds one embedding table per
feature from ``user_features`` / ``item_features``.

Feature sets:
- ``ids``: user_id | item_id (MF).
- ``side``: user_id, gender, age, occupation | item_id, genre (multi-hot, pooled) (two-tower).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from morec_dist.data import schema

FEATURE_SETS = ("ids", "side")


@dataclass(frozen=True)
class SparseFeature:
    name: str
    num_embeddings: int  # ids are 0..num_embeddings-1; 0 is padding / unknown


def _dense_lookup(ids: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    table = np.zeros(size, dtype=np.int64)
    table[ids] = values
    return table


class FeatureBuilder:
    """Builds user-side and item-side KJTs from id arrays, for one feature set."""

    def __init__(self, data_dir: str | Path, num_users: int, num_items: int, feature_set: str = "ids"):
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature set {feature_set!r}: expected one of {FEATURE_SETS}")
        self.feature_set = feature_set
        self.num_users = num_users
        self.num_items = num_items
        self._user_side: dict[str, np.ndarray] = {}
        self._genre_offsets = self._genre_values = None
        self._num_genres = 0
        if feature_set == "side":
            self._load_side_tables(Path(data_dir))

    def _load_side_tables(self, data_dir: Path) -> None:
        users = pq.read_table(data_dir / schema.USERS_FILE, columns=["user_id", "gender", "age", "occupation"])
        uid = users["user_id"].to_numpy()
        size = self.num_users + 1
        # +1 so that 0 stays "unknown" for every categorical value
        self._user_side = {
            "gender": _dense_lookup(uid, users["gender"].to_numpy().astype(np.int64) + 1, size),
            "age": _dense_lookup(uid, users["age"].to_numpy().astype(np.int64) + 1, size),
            "occupation": _dense_lookup(uid, users["occupation"].to_numpy().astype(np.int64) + 1, size),
        }
        items = pq.read_table(data_dir / schema.ITEMS_FILE, columns=["item_id", "genre_ids"]).sort_by("item_id")
        genre_list = items["genre_ids"].combine_chunks()
        lengths = np.zeros(self.num_items + 1, dtype=np.int64)
        lengths[items["item_id"].to_numpy()] = np.diff(genre_list.offsets.to_numpy())
        self._genre_offsets = np.concatenate([[0], np.cumsum(lengths)])
        # genre_ids are 0-based in the table; shift by one so 0 stays padding
        self._genre_values = genre_list.values.to_numpy().astype(np.int64) + 1
        self._num_genres = int(self._genre_values.max()) + 1 if self._genre_values.size else 1

    def user_features(self) -> list[SparseFeature]:
        features = [SparseFeature("user_id", self.num_users + 1)]
        for name, table in self._user_side.items():
            features.append(SparseFeature(name, int(table.max()) + 1))
        return features

    def item_features(self) -> list[SparseFeature]:
        features = [SparseFeature("item_id", self.num_items + 1)]
        if self.feature_set == "side":
            features.append(SparseFeature("genre", self._num_genres))
        return features

    def user_kjt(self, user_ids: np.ndarray) -> KeyedJaggedTensor:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        columns = [user_ids] + [table[user_ids] for table in self._user_side.values()]
        keys = ["user_id", *self._user_side]
        n = len(user_ids)
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(np.concatenate(columns)),
            lengths=torch.ones(n * len(keys), dtype=torch.int32),
        )

    def item_kjt(self, item_ids: np.ndarray) -> KeyedJaggedTensor:
        flat = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        n = len(flat)
        if self.feature_set != "side":
            return KeyedJaggedTensor(
                keys=["item_id"], values=torch.from_numpy(flat), lengths=torch.ones(n, dtype=torch.int32)
            )
        starts = self._genre_offsets[flat]
        genre_lengths = self._genre_offsets[flat + 1] - starts
        genre_index = np.repeat(starts - np.cumsum(genre_lengths) + genre_lengths, genre_lengths) + np.arange(
            genre_lengths.sum()
        )
        genres = self._genre_values[genre_index]
        return KeyedJaggedTensor(
            keys=["item_id", "genre"],
            values=torch.from_numpy(np.concatenate([flat, genres])),
            lengths=torch.from_numpy(np.concatenate([np.ones(n, np.int32), genre_lengths.astype(np.int32)])),
        )
