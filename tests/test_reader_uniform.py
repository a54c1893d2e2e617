"""Uniform mode: a shuffled pass per epoch, every row exactly once across ranks, equal batch counts.

Ranks are simulated in one process by building one reader per rank over the same real
Parquet dataset; nothing is shared between them but the files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from morec_dist.data.batch import UNIFORM_VERSION
from morec_dist.data.reader import Reader, batch_sizes
from tests import reader_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return reader_data.build(tmp_path_factory.mktemp("uniform") / "ds")


@pytest.fixture(scope="module")
def train(data_dir) -> np.ndarray:
    return reader_data.train_pairs(data_dir)


def _epoch_keys(reader: Reader) -> tuple[list[np.ndarray], list[int]]:
    keys, sizes = [], []
    for batch in reader:
        keys.append(reader_data.row_keys(batch.user_ids.numpy(), batch.item_ids[:, 0].numpy()))
        sizes.append(batch.num_rows)
        assert batch.version == UNIFORM_VERSION
        assert not batch.block_ids.any()
        assert batch.item_ids.shape == (batch.num_rows, 3)
    return keys, sizes


@pytest.mark.parametrize("world_size, batch_size", [(2, 256), (2, 1000), (3, 512), (2, 17623 // 2)])
def test_every_row_exactly_once_per_epoch_across_ranks(data_dir, train, world_size, batch_size):
    readers = [
        Reader(data_dir, batch_size=batch_size, num_negatives=2, seed=3, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    truth = Counter(reader_data.row_keys(train[:, 0], train[:, 1]).tolist())
    orders = []
    for epoch in range(2):
        per_rank = [_epoch_keys(r) for r in readers]
        counts = {len(sizes) for _, sizes in per_rank}
        assert counts == {readers[0].num_batches}  # same number of batches on every rank
        seen = Counter(k for keys, _ in per_rank for batch in keys for k in batch.tolist())
        assert seen == truth
        for _, sizes in per_rank:
            assert all(s == batch_size for s in sizes[:-1]) and 1 <= sizes[-1] <= batch_size + 1
        orders.append(np.concatenate(per_rank[0][0]))
        assert all(r.epoch == epoch + 1 for r in readers)
    assert not np.array_equal(orders[0], orders[1])  # a new shuffle each epoch
    for r in readers:
        r.close()


def test_shuffle_is_deterministic_and_mixes_row_groups(data_dir, train):
    def first_batch(seed: int) -> np.ndarray:
        with Reader(data_dir, batch_size=512, num_negatives=1, seed=seed, window_row_groups=4) as reader:
            batch = next(iter(reader))
            return reader_data.row_keys(batch.user_ids.numpy(), batch.item_ids[:, 0].numpy())

    assert np.array_equal(first_batch(1), first_batch(1))
    assert not np.array_equal(first_batch(1), first_batch(2))
    # rows of one batch come from several row groups (file positions far apart)
    file_position = {k: i for i, k in enumerate(reader_data.row_keys(train[:, 0], train[:, 1]).tolist())}
    row_groups = {file_position[k] // reader_data.ROW_GROUP_ROWS for k in first_batch(1).tolist()}
    assert len(row_groups) >= 3


@pytest.mark.parametrize("total", [1, 2, 3, 7, 100, 1023, 1024, 1025, 2047, 2048, 2049, 5000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 4, 512])
def test_batch_sizes_balance(total, world_size, batch_size):
    if total < world_size:
        with pytest.raises(ValueError, match="cannot be split"):
            batch_sizes(total, batch_size, world_size, 0)
        return
    sizes = [batch_sizes(total, batch_size, world_size, r) for r in range(world_size)]
    assert len({len(s) for s in sizes}) == 1
    assert sum(int(s.sum()) for s in sizes) == total
    assert all(s.min() >= 1 and s.max() <= batch_size + 1 for s in sizes)
    assert all((s[:-1] == batch_size).all() for s in sizes)


def test_rank_outside_world_is_rejected(data_dir):
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        Reader(data_dir, batch_size=8, num_negatives=1, rank=2, world_size=2)
