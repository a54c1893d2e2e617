"""The synthetic generator: determinism, realistic skew, the prepared schema, bounded memory."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys

import numpy as np
import pytest

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.prepare.synthetic import generate


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate(tmp_path / "a", users=300, items=200, rows=20_000, seed=3)
    b = generate(tmp_path / "b", users=300, items=200, rows=20_000, seed=3)
    c = generate(tmp_path / "c", users=300, items=200, rows=20_000, seed=4)
    files = json.loads((a / "manifest.json").read_text())["files"]
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert not filecmp.cmp(a / "train/part-00000.parquet", c / "train/part-00000.parquet", shallow=False)


def test_validates_and_has_realistic_skew(small_synthetic):
    ds = PreparedDataset.open(small_synthetic)
    train = ds.read_split("train", ["user_id", "item_id"])
    items = np.sort(np.bincount(train["item_id"].to_numpy(), minlength=ds.num_items + 1)[1:])[::-1]
    users = np.sort(np.bincount(train["user_id"].to_numpy(), minlength=ds.num_users + 1)[1:])[::-1]
    # Zipf-like items: the top 10% of items hold well over a third of the interactions
    assert items[: ds.num_items // 10].sum() / items.sum() > 0.4
    # skewed users: the most active user has many times the median activity
    assert users[0] > 5 * np.median(users)
    # long-tailed prices, categories of very different sizes
    price = ds.items["price"].to_numpy()
    assert price.max() > 5 * np.median(price)
    fair = ds.manifest["groups"]["fair_group"]["item_counts"]
    assert max(fair) > 5 * min(fair)
    # leave-one-out: every user with >= 3 rows has exactly one valid and one test row
    valid = ds.read_split("valid", ["user_id"])["user_id"].to_numpy()
    assert len(np.unique(valid)) == len(valid) == ds.split_rows("test")


def test_group_columns_are_joined_consistently(small_synthetic):
    ds = PreparedDataset.open(small_synthetic)
    train = ds.read_split("train")
    for column in ("fair_group", "align_group", "rev_group", "price"):
        by_item = ds.item_column(column)
        np.testing.assert_array_equal(train[column].to_numpy(), by_item[train["item_id"].to_numpy()])


# The streaming sizes (generation chunk, Parquet row group, part file, by-group spill task)
# divided by 4, so that 1M and 3M rows span as many chunks, parts and tasks as 4M and 12M
# would at full size: the same steady state, in half the time of 2M / 6M at full size.
PEAK_RSS = """
import resource, sys
from morec_dist.data import schema
import morec_dist.data.prepare.layout as layout
import morec_dist.data.prepare.synthetic as synthetic
synthetic.CHUNK_ROWS //= 4
schema.ROW_GROUP_ROWS //= 4
schema.PART_ROWS //= 4
layout.SPILL_TASK_ROWS //= 4
synthetic.generate(sys.argv[1], users=20_000, items=5_000, rows=int(sys.argv[2]), seed=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_memory_stays_bounded_as_rows_grow(tmp_path):
    def peak_mb(rows: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(tmp_path / str(rows)), str(rows)],
            check=True,
            capture_output=True,
            text=True,
        )
        return int(out.stdout.strip().splitlines()[-1])

    small, large = peak_mb(1_000_000), peak_mb(3_000_000)
    assert large < 1.15 * small, (small, large)
