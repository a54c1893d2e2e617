"""Declared side features into KeyedJaggedTensors: single- and multi-hot, picked by name,
checked against the side tables of a real prepared (synthetic) dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

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
