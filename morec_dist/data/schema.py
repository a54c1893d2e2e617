"""The on-disk contract of a prepared dataset: file layout, column types, manifest keys.

Everything that writes a dataset (``prepare``) and everything that reads one (the dataset
handle, the readers, the evaluator) takes its names and types from here, so the two sides
cannot drift apart.

Layout of a prepared directory::

    manifest.json              schema version, counts, group sizes, q*, checksums, provenance
    items.parquet              one row per catalogue item (item_id 1..num_items)
    users.parquet              one row per user (user_id 1..num_users)
    train/part-00000.parquet   interactions, item meta joined in (several parts when large)
    valid/part-00000.parquet
    test/part-00000.parquet
    by_group/<column>/g=<gid:05d>/part-<nnnnn>.parquet
                               the train rows of each group of each group column, in a
                               uniformly random order (by ``layout_hash``) within the group
    id_map/users.parquet       raw id -> user_id (only for `prepare parquet`: user data)
    id_map/items.parquet       raw id -> item_id

Ids are 1-based; 0 is reserved for padding / "no item". Group ids are 1-based too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
SPLITS = ("train", "valid", "test")

# The item groupings the reference objectives use. Objectives are pluggable: any int16
# column of the interactions (and items) with values 1..G can serve as a group column.
GROUP_COLUMNS = ("fair_group", "align_group", "rev_group")
NUM_BANDS = 10  # popularity bands and price bands
# The sparse inputs a model reads (data/features.py): ids only, or ids and declared side features
FEATURE_SETS = ("ids", "side")

# Rows per Parquet row group: small enough that a reader's working set stays bounded,
# large enough that per-group overheads are amortised.
ROW_GROUP_ROWS = 131_072
# Interaction rows per train part file, so huge datasets are spread over many files.
PART_ROWS = 8 * ROW_GROUP_ROWS * 4

INTERACTIONS = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("fair_group", pa.int16(), nullable=False),
        pa.field("align_group", pa.int16(), nullable=False),
        pa.field("rev_group", pa.int16(), nullable=False),
    ]
)

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("fair_group", pa.int16(), nullable=False),
        pa.field("align_group", pa.int16(), nullable=False),
        pa.field("rev_group", pa.int16(), nullable=False),
        pa.field("popularity", pa.int64(), nullable=False),
        pa.field("genres", pa.list_(pa.string()), nullable=False),
        pa.field("genre_ids", pa.list_(pa.int16()), nullable=False),
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("gender", pa.int8(), nullable=False),  # 0 = F, 1 = M
        pa.field("age", pa.int16(), nullable=False),
        pa.field("occupation", pa.int16(), nullable=False),
    ]
)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# ------------------------------------------------------------ group-partitioned layout
GROUP_LAYOUT_ROOT = "by_group"
ID_MAP_DIR = "id_map"
ID_MAP_USERS = f"{ID_MAP_DIR}/users.parquet"
ID_MAP_ITEMS = f"{ID_MAP_DIR}/items.parquet"


def group_dir(column: str, gid: int) -> str:
    return f"{GROUP_LAYOUT_ROOT}/{column}/g={gid:05d}"


def group_part_path(column: str, gid: int, index: int) -> str:
    return f"{group_dir(column, gid)}/{part_name(index)}"


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (a bijection, so distinct inputs never collide)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def layout_hash(row_index: np.ndarray, seed: int) -> np.ndarray:
    """The order key of train rows within a group: splitmix64(row_index XOR splitmix64(seed)).

    ``row_index`` is the row's 0-based position in the train split (its part files in
    manifest order, concatenated). For a fixed seed this is a bijection of the row index, so
    two rows never tie; sorting a group by it gives a uniformly random order that any
    process can recompute.
    """
    salt = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
    return _splitmix64(np.asarray(row_index, dtype=np.uint64) ^ salt)


# ------------------------------------------------------------------------ features
FEATURE_KINDS = ("single", "multi")
FEATURE_ENTITIES = ("user", "item", "row")


@dataclass(frozen=True)
class FeatureSpec:
    """A declared side feature. single: int32 in 0..C (0 = missing); multi: list<int32> of
    values in 1..C (empty = none). Carried by every interaction row; user features are also
    columns of users.parquet and item features of items.parquet."""

    name: str
    kind: str
    cardinality: int
    entity: str

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature {self.name!r}: kind {self.kind!r}, expected one of {FEATURE_KINDS}")
        if self.entity not in FEATURE_ENTITIES:
            raise ValueError(f"feature {self.name!r}: entity {self.entity!r}, expected one of {FEATURE_ENTITIES}")
        if not isinstance(self.cardinality, int) or self.cardinality < 1:
            raise ValueError(f"feature {self.name!r}: cardinality {self.cardinality!r}, expected an int >= 1")

    @property
    def arrow_type(self) -> pa.DataType:
        return feature_type(self.kind)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "cardinality": self.cardinality, "entity": self.entity}

    @classmethod
    def from_manifest(cls, name: str, entry: dict[str, Any]) -> FeatureSpec:
        return cls(name, entry["kind"], entry["cardinality"], entry["entity"])


def feature_type(kind: str) -> pa.DataType:
    return pa.int32() if kind == "single" else pa.list_(pa.int32())


def interaction_schema(features: dict[str, FeatureSpec] | None = None) -> pa.Schema:
    """INTERACTIONS plus one column per declared feature (in declaration order)."""
    fields = list(INTERACTIONS)
    for spec in (features or {}).values():
        fields.append(pa.field(spec.name, spec.arrow_type, nullable=False))
    return pa.schema(fields)


def entity_schema(base: pa.Schema, features: dict[str, FeatureSpec] | None, entity: str) -> pa.Schema:
    """ITEMS / USERS plus the features of that entity."""
    fields = list(base)
    for spec in (features or {}).values():
        if spec.entity == entity:
            fields.append(pa.field(spec.name, spec.arrow_type, nullable=False))
    return pa.schema(fields)


# The side features the reference datasets declare (ML-1M; synthetic mimics them).
ML1M_AGES = (1, 18, 25, 35, 45, 50, 56)
ML1M_NUM_OCCUPATIONS = 21


def reference_features(num_genres: int) -> dict[str, FeatureSpec]:
    specs = [
        FeatureSpec("user_gender", "single", 2, "user"),  # 1 = F, 2 = M
        FeatureSpec("user_age", "single", len(ML1M_AGES), "user"),  # rank of the age code
        FeatureSpec("user_occupation", "single", ML1M_NUM_OCCUPATIONS, "user"),  # occupation + 1
        FeatureSpec("item_genres", "multi", num_genres, "item"),  # genre index + 1, all genres
    ]
    return {s.name: s for s in specs}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The checksum the manifest records for every file (``files.<path>.sha256``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
