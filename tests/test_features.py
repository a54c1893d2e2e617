"""Declared side features into KeyedJaggedTensors: single- and multi-hot, picked by name,
checked against the side tables of a real prepared (synthetic) dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from morec_dist.data.features import FeatureBuilder, declared_features
from morec_dist.data.prepare.synthetic import generate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("features") / "syn", users=40, items=60, rows=800, seed=9)


def test_kjts_hold_each_entitys_declared_values(data_dir):
    declared = declared_features(data_dir)
    assert declared["item_genres"].kind == "multi" and declared["user_age"].kind == "single"
    features = FeatureBuilder(
        data_dir, 40, 60, user_features=["user_age", "user_gender"], item_features=["item_genres"]
    )
    assert [f.name for f in features.user_features()] == ["user_id", "user_age", "user_gender"]
    assert features.item_features()[1].num_embeddings == declared["item_genres"].cardinality + 1
    users = pq.read_table(data_dir / "users.parquet").to_pydict()
    items = pq.read_table(data_dir / "items.parquet").to_pydict()
    age = dict(zip(users["user_id"], users["user_age"], strict=True))
    genres = dict(zip(items["item_id"], items["item_genres"], strict=True))
    user_ids = np.array([5, 1, 40, 5])
    by_key = features.user_kjt(user_ids).to_dict()
    assert by_key["user_id"].values().tolist() == user_ids.tolist()
    assert by_key["user_age"].values().tolist() == [age[u] for u in user_ids.tolist()]
    item_ids = np.array([[3, 60], [1, 3]])
    item = features.item_kjt(item_ids).to_dict()["item_genres"]
    expected = [genres[i] for i in item_ids.reshape(-1).tolist()]
    assert item.lengths().tolist() == [len(g) for g in expected]
    assert item.values().tolist() == [v for g in expected for v in g]
    assert max(len(g) for g in genres.values()) > 1  # really multi-hot


def test_feature_sets_and_unknown_names(data_dir):
    assert [f.name for f in FeatureBuilder(data_dir, 40, 60, "ids").user_features()] == ["user_id"]
    side = FeatureBuilder(data_dir, 40, 60, "side")
    assert [f.name for f in side.item_features()] == ["item_id", "item_genres"]
    with pytest.raises(
        ValueError, match=r"model.user_features: \['item_genres'\] are not user features declared in .*manifest.json"
    ):
        FeatureBuilder(data_dir, 40, 60, user_features=["item_genres"])


def test_dense_features_are_the_side_tables_numeric_columns_by_id(data_dir):
    features = FeatureBuilder(data_dir, 40, 60, "ids", user_dense=["age", "gender"], item_dense=["price"])
    assert [f.name for f in features.user_dense_features()] == ["age", "gender"]
    users = pq.read_table(data_dir / "users.parquet").to_pydict()
    items = pq.read_table(data_dir / "items.parquet").to_pydict()
    age = dict(zip(users["user_id"], users["age"], strict=True))
    gender = dict(zip(users["user_id"], users["gender"], strict=True))
    price = dict(zip(items["item_id"], items["price"], strict=True))
    user_ids = np.array([5, 1, 40, 5])
    dense = features.user_dense(user_ids)
    assert dense.dtype == torch.float32 and dense.shape == (4, 2)
    assert dense.tolist() == [[float(age[u]), float(gender[u])] for u in user_ids.tolist()]
    item_ids = np.array([[3, 60, 0], [1, 3, 7]])  # 0: the padding id, zeros
    items_dense = features.item_dense(item_ids)
    assert items_dense.shape == (6, 1)
    expected = [np.float32(price[i]) if i else 0.0 for i in item_ids.reshape(-1).tolist()]
    np.testing.assert_array_equal(items_dense[:, 0].numpy(), np.array(expected, dtype=np.float32))
    # a model that reads none gets [n, 0]: the same code path, nothing to concatenate
    assert FeatureBuilder(data_dir, 40, 60).item_dense(item_ids).shape == (6, 0)


def test_a_batch_carries_dense_rows_in_the_order_of_its_items(data_dir):
    from morec_dist.data.reader import Reader

    features = FeatureBuilder(data_dir, 40, 60, "ids", user_dense=["age"], item_dense=["price", "popularity"])
    with Reader(data_dir, batch_size=16, num_negatives=3, seed=1, features=features, prefetch_batches=1) as reader:
        batch = next(iter(reader))
    assert batch.user_dense.shape == (16, 1) and batch.item_dense.shape == (16 * 4, 2)
    assert batch.user_dense.dtype == batch.item_dense.dtype == torch.float32
    torch.testing.assert_close(batch.item_dense, features.item_dense(batch.item_ids.numpy()), rtol=0, atol=0)
    torch.testing.assert_close(batch.user_dense, features.user_dense(batch.user_ids.numpy()), rtol=0, atol=0)
    moved = batch.to(torch.device("cpu"))
    assert moved.item_dense is not None and torch.equal(moved.item_dense, batch.item_dense)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"user_dense": ["income"]},
            r"dense feature 'income': .*users.parquet has no column 'income'; numeric columns: \[",
        ),
        (
            {"item_dense": ["title"]},
            r"dense feature 'title': column 'title' of .*items.parquet is string, expected a number",
        ),
    ],
)
def test_a_dense_column_that_is_missing_or_not_numeric_names_the_column_and_file(data_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureBuilder(data_dir, 40, 60, **kwargs)
