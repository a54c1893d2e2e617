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

Ids are 1-based; 0 is reserved for padding / "no item". Group ids are 1-based too.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
SPLITS = ("train", "valid", "test")

# The item groupings the reference objectives use. Objectives are pluggable: any int16
# column of the interactions (and items) with values 1..G can serve as a group column.
GROUP_COLUMNS = ("fair_group", "align_group", "rev_group")
NUM_BANDS = 10  # popularity bands and price bands

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
