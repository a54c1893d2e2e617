"""Negatives that exclude the user's train + valid history (data/negatives.py UserHistory):
membership against a brute-force set, no negative in a history, the restricted marginal
(chi-square), determinism for a seed, the exact fallback for a near-full history."""

from __future__ import annotations

import numpy as np
import pytest

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.negatives import NegativeSampler, UserHistory


def brute_history(ds: PreparedDataset, splits: tuple[str, ...] = ("train", "valid")) -> set[tuple[int, int]]:
    pairs: set[tuple[int, int]] = set()
    for split in splits:
        t = ds.read_split(split, ["user_id", "item_id"])
        pairs.update(zip(t["user_id"].to_numpy().tolist(), t["item_id"].to_numpy().tolist(), strict=True))
    return pairs


def test_contains_matches_a_set():
    rng = np.random.default_rng(0)
    users = rng.integers(1, 30, 2000)
    items = rng.integers(1, 50, 2000)
    h = UserHistory.from_pairs(users, items, num_users=30, num_items=50)
    truth = set(zip(users.tolist(), items.tolist(), strict=True))
    qu, qi = rng.integers(0, 31, 5000), rng.integers(1, 51, 5000)
    got = h.contains(qu, qi)
    assert got.tolist() == [(u, i) in truth for u, i in zip(qu.tolist(), qi.tolist(), strict=True)]
    assert h.user_items(0).size == 0  # user 0 (padding) has no history


def test_dataset_negatives_avoid_history_and_are_seeded(small_synthetic):
    ds = PreparedDataset.open(small_synthetic)
    truth = brute_history(ds)
    sampler = NegativeSampler.from_dataset(ds, 1.0, exclude_history=True)
    train = ds.read_split("train", ["user_id", "item_id"])
    users = train["user_id"].to_numpy().astype(np.int64)[:4000]
    positives = train["item_id"].to_numpy().astype(np.int64)[:4000]
    a = sampler.sample(np.random.default_rng(5), positives, 10, users=users)
    b = sampler.sample(np.random.default_rng(5), positives, 10, users=users)
    c = sampler.sample(np.random.default_rng(6), positives, 10, users=users)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (4000, 10) and a.min() >= 1 and a.max() <= ds.num_items
    assert not any((u, n) in truth for u, row in zip(users.tolist(), a.tolist(), strict=True) for n in row)
    # without the history many negatives do fall in it: the test above can fail
    plain = NegativeSampler.from_dataset(ds, 1.0).sample(np.random.default_rng(5), positives, 10)
    assert sum((u, n) in truth for u, row in zip(users.tolist(), plain.tolist(), strict=True) for n in row) > 1000
    with pytest.raises(ValueError, match="needs users"):
        sampler.sample(np.random.default_rng(0), positives, 10)


@pytest.mark.parametrize("history_size", [5, 38])  # 38 of 40 items: most draws take the exact fallback
def test_marginal_is_popularity_restricted_to_non_history(history_size):
    chisquare = pytest.importorskip("scipy.stats").chisquare
    num_items = 40
    popularity = np.concatenate([[0], np.arange(1, num_items + 1, dtype=np.float64) ** 1.5])
    hist_items = np.arange(num_items - history_size + 1, num_items + 1)  # the most popular items
    history = UserHistory.from_pairs(np.full(history_size, 3), hist_items, num_users=4, num_items=num_items)
    sampler = NegativeSampler(popularity, 1.0, history=history)
    n = 40_000
    draws = sampler.sample(np.random.default_rng(1), np.ones(n // 10, np.int64), 10, users=np.full(n // 10, 3))
    assert not np.isin(draws, hist_items).any()
    allowed = np.arange(1, num_items - history_size + 1)
    expected = popularity[allowed] / popularity[allowed].sum() * n
    observed = np.bincount(draws.ravel(), minlength=num_items + 1)[allowed]
    assert observed.sum() == n
    assert chisquare(observed, expected).pvalue > 1e-3


def test_a_history_covering_every_item_is_a_clear_error():
    history = UserHistory.from_pairs(np.full(3, 1), np.array([1, 2, 3]), num_users=1, num_items=3)
    sampler = NegativeSampler(np.array([0, 1.0, 1.0, 1.0]), 1.0, history=history)
    with pytest.raises(ValueError, match="user 1's history covers every item"):
        sampler.sample(np.random.default_rng(0), np.array([1]), 2, users=np.array([1]))


def test_reader_batches_exclude_history_when_asked(small_synthetic):
    from morec_dist.data.reader import Reader

    ds = PreparedDataset.open(small_synthetic)
    truth = brute_history(ds)
    with Reader(ds, batch_size=256, num_negatives=5, seed=2, exclude_history_negatives=True) as reader:
        batches = [b for _, b in zip(range(5), reader, strict=False)]
    for batch in batches:
        users = batch.user_ids.tolist()
        negatives = batch.item_ids[:, 1:].tolist()
        assert not any((u, n) in truth for u, row in zip(users, negatives, strict=True) for n in row)


def test_a_train_only_history_keeps_valid_items_as_negatives(small_synthetic):
    """``data.negatives_history_splits = ["train"]``: no negative is a train item of its user,
    while the held-out valid item may be drawn, as the test item always may."""
    from morec_dist.data.reader import Reader

    ds = PreparedDataset.open(small_synthetic)
    train_pairs = brute_history(ds, ("train",))
    valid = ds.read_split("valid", ["user_id", "item_id"])
    valid_item = dict(zip(valid["user_id"].to_pylist(), valid["item_id"].to_pylist(), strict=True))
    hits = {"train": 0, "valid": 0}
    for splits in (("train",), ("train", "valid")):
        with Reader(
            ds, batch_size=256, num_negatives=20, seed=2, exclude_history_negatives=True, history_splits=splits
        ) as reader:
            for _, batch in zip(range(20), reader, strict=False):
                for u, row in zip(batch.user_ids.tolist(), batch.item_ids[:, 1:].tolist(), strict=True):
                    assert not any((u, n) in train_pairs for n in row)
                    hits[splits[-1]] += sum(n == valid_item.get(u) for n in row)
    assert hits["train"] > 0 and hits["valid"] == 0, hits


def test_history_splits_are_checked_at_the_edge():
    from morec_dist.config import ConfigError, load_config

    for bad in ('["test"]', "[]", '["train", "train"]'):
        with pytest.raises(ConfigError, match="data.negatives_history_splits"):
            load_config(None, [f"data.negatives_history_splits={bad}"])


def test_the_authors_config_loads_with_their_settings():
    from morec_dist.config import load_config
    from tests.conftest import REPO

    c = load_config(REPO / "configs" / "ml1m_unirec.toml")
    assert (c.data.num_negatives, c.data.negative_alpha, c.data.negatives_exclude_history) == (10, 1.0, True)
    assert (c.model.name, c.model.embedding_dim, c.morec.epochs, c.morec.sampler.update_every_steps) == (
        "mf",
        64,
        30,
        0,
    )
    assert (c.morec.pid.kp, c.morec.pid.ki, c.morec.lam) == (0.05, 0.001, 0.2)
    assert c.morec.sampler.update_at_start  # the first p update before the first fine-tuning step
    assert c.run.methods == ["morec", "static", "mgda", "pareto_mtl", "epo"]
