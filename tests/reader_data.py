"""A small prepared dataset for the reader tests, with designed group sizes and traceable rows.

Every train row has a distinct (user_id, item_id) pair, so a drawn row can be mapped back
to its identity. ``fair_group`` has a huge group, mid-sized ones, a tiny group (one item,
three rows) and an empty group (no item at all); ``rev_group`` is a second, differently
skewed column. Row groups are made small so that an epoch spans many row groups and files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from morec_dist.data import schema
from morec_dist.data.prepare.writer import DatasetWriter, group_stats

NUM_ITEMS = 40
NUM_USERS = 1500
FAIR_GROUPS = 8  # group 8 has no items: "mass on an empty group" must be rejected
TINY_GROUP = 7
REV_GROUPS = 4
ROW_GROUP_ROWS = 2048
PART_ROWS = 3 * ROW_GROUP_ROWS


def _item_groups() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fair_group, rev_group and train rows per item (by item_id - 1)."""
    fair = np.array([1] * 12 + [2] * 8 + [3] * 6 + [4] * 6 + [5] * 4 + [6] * 3 + [TINY_GROUP], dtype=np.int16)
    rows = np.array([900] * 12 + [500] * 8 + [300] * 6 + [120] * 6 + [60] * 4 + [20] * 3 + [3], dtype=np.int64)
    rev = (np.arange(NUM_ITEMS) % REV_GROUPS + 1).astype(np.int16)
    return fair, rev, rows


def build(out_dir: Path) -> Path:
    fair, rev, rows_per_item = _item_groups()
    rng = np.random.default_rng(7)
    users, items = [], []
    for item, n in enumerate(rows_per_item.tolist(), start=1):
        users.append(rng.choice(NUM_USERS, size=n, replace=False) + 1)  # distinct users per item
        items.append(np.full(n, item))
    user_ids = np.concatenate(users).astype(np.int32)
    item_ids = np.concatenate(items).astype(np.int32)
    order = rng.permutation(len(user_ids))  # not grouped on disk
    user_ids, item_ids = user_ids[order], item_ids[order]
    n = len(user_ids)
    price = np.round(rng.uniform(1, 50, NUM_ITEMS), 2)

    def interactions(u: np.ndarray, i: np.ndarray, t0: int) -> pa.Table:
        return pa.table(
            {
                "user_id": u,
                "item_id": i,
                "timestamp": t0 + np.arange(len(u), dtype=np.int64),
                "rating": np.full(len(u), 5.0, dtype=np.float32),
                "price": price[i - 1],
                "fair_group": fair[i - 1],
                "align_group": np.ones(len(u), dtype=np.int16),
                "rev_group": rev[i - 1],
            }
        )

    held_out_users = np.arange(1, 11, dtype=np.int32)
    held_out_items = np.full(10, 1, dtype=np.int32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "ROW_GROUP_ROWS", ROW_GROUP_ROWS)
        mp.setattr(schema, "PART_ROWS", PART_ROWS)
        with DatasetWriter(out_dir, overwrite=True) as writer:
            writer.write_interactions("train", interactions(user_ids, item_ids, 0))
            writer.write_interactions("valid", interactions(held_out_users, held_out_items, n))
            writer.write_interactions("test", interactions(held_out_users, held_out_items + 1, n + 10))
            writer.write_side_table(
                schema.ITEMS_FILE,
                pa.table(
                    {
                        "item_id": np.arange(1, NUM_ITEMS + 1, dtype=np.int32),
                        "title": [f"item {i}" for i in range(1, NUM_ITEMS + 1)],
                        "price": price,
                        "fair_group": fair,
                        "align_group": np.ones(NUM_ITEMS, dtype=np.int16),
                        "rev_group": rev,
                        "popularity": rows_per_item,
                        "genres": [["g"]] * NUM_ITEMS,
                        "genre_ids": [[0]] * NUM_ITEMS,
                    }
                ),
                schema.ITEMS,
            )
            writer.write_side_table(
                schema.USERS_FILE,
                pa.table(
                    {
                        "user_id": np.arange(1, NUM_USERS + 1, dtype=np.int32),
                        "gender": np.zeros(NUM_USERS, dtype=np.int8),
                        "age": np.full(NUM_USERS, 25, dtype=np.int16),
                        "occupation": np.zeros(NUM_USERS, dtype=np.int16),
                    }
                ),
                schema.USERS,
            )
            manifest = {
                "name": "reader-test",
                "num_users": NUM_USERS,
                "num_items": NUM_ITEMS,
                "groups": {
                    "fair_group": group_stats(fair, rows_per_item, FAIR_GROUPS),
                    "align_group": group_stats(np.ones(NUM_ITEMS, dtype=np.int16), rows_per_item, 1),
                    "rev_group": group_stats(rev, rows_per_item, REV_GROUPS),
                },
                "q_star": [1.0],
            }
            return writer.commit(manifest)  # writes by_group/ too, with the row groups above


def train_pairs(path: Path) -> np.ndarray:
    """All train rows as (user_id, item_id, fair_group, rev_group), in file order."""
    from morec_dist.data.dataset import PreparedDataset

    table = PreparedDataset.open(path).read_split("train", ["user_id", "item_id", "fair_group", "rev_group"])
    return np.stack([table.column(c).to_numpy().astype(np.int64) for c in range(4)], axis=1)


def row_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """A unique int64 key per (user_id, item_id)."""
    return np.asarray(users, dtype=np.int64) * (NUM_ITEMS + 1) + np.asarray(items, dtype=np.int64)
