"""Models, loss and sharding: unsharded models against hand computations, and sharded
models (2 torchrun ranks, every sharding type that runs on CPU) against unsharded copies."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from morec_dist.config import ModelConfig, OptimConfig
from morec_dist.data.batch import Batch
from morec_dist.data.features import FeatureBuilder
from morec_dist.data.prepare.synthetic import generate
from morec_dist.model import bpr_loss, build_model
from morec_dist.model.sharding import optimizer_caveats, table_sharding_types

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "dist_scripts"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("model") / "syn", users=30, items=50, rows=600, seed=5)


def features_of(data_dir: Path, feature_set: str) -> FeatureBuilder:
    return FeatureBuilder(data_dir, 30, 50, feature_set)


def make_batch(features: FeatureBuilder, rows: int = 6, negatives: int = 3, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    users = rng.integers(1, features.num_users + 1, size=rows)
    items = rng.integers(1, features.num_items + 1, size=(rows, 1 + negatives))
    return Batch(
        torch.from_numpy(users), torch.from_numpy(items), torch.zeros(rows, dtype=torch.int64),
        features.user_kjt(users), features.item_kjt(items),
    )  # fmt: skip


# ------------------------------------------------------------------------- loss


def test_bpr_loss_is_per_row_mean_over_negatives():
    scores = torch.tensor([[2.0, 1.0, 3.0], [0.0, -1.0, -2.0], [50.0, -60.0, 0.0]])
    expected = [
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2,
        (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2,
        (math.log1p(math.exp(-110.0)) + math.log1p(math.exp(-50.0))) / 2,
    ]
    loss = bpr_loss(scores)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-12)


def test_bpr_loss_rejects_scores_without_negatives():
    with pytest.raises(AssertionError, match=r"\[N, 1 \+ negatives\] with >= 1 negative"):
        bpr_loss(torch.zeros(4, 1))


# ----------------------------------------------------------------------- models


def test_mf_scores_are_dot_products_of_table_rows(data_dir):
    features = features_of(data_dir, "ids")
    torch.manual_seed(0)
    model = build_model("mf", features, ModelConfig(embedding_dim=8))
    batch = make_batch(features)
    users = model.user_ebc.embedding_bags["t_user_id"].weight
    items = model.item_ebc.embedding_bags["t_item_id"].weight
    expected = torch.einsum("nd,ncd->nc", users[batch.user_ids], items[batch.item_ids])
    scores = model(batch)
    assert scores.shape == (6, 4)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(model.item_vectors(features.item_kjt(np.array([3, 7]))), items[[3, 7]])


def test_two_tower_concatenates_side_features_by_name(data_dir):
    features = features_of(data_dir, "side")
    torch.manual_seed(0)
    model = build_model("two_tower", features, ModelConfig(name="two_tower", embedding_dim=4, tower_dims=[8, 5]))
    batch = make_batch(features)
    assert {x.name for x in features.user_features()} == {"user_id", "user_gender", "user_age", "user_occupation"}
    tables = {name: bag.weight for name, bag in model.user_ebc.embedding_bags.items()}
    tables |= {name: bag.weight for name, bag in model.item_ebc.embedding_bags.items()}
    user_ids = batch.user_kjt.to_dict()  # one id per user and feature
    user_in = torch.cat(
        [tables[f"t_{f}"][user_ids[f].values()] for f in [x.name for x in features.user_features()]], dim=1
    )
    genre = features.item_kjt(batch.item_ids.numpy()).to_dict()["item_genres"]
    assert genre.lengths().max() > 1  # multi-hot: some items have several genres
    genre_sum = torch.stack([tables["t_item_genres"][ids].sum(0) for ids in genre.to_dense()])
    item_in = torch.cat([tables["t_item_id"][batch.item_ids.reshape(-1)], genre_sum], dim=1)
    expected = torch.einsum("nd,ncd->nc", model.user_tower(user_in), model.item_tower(item_in).view(6, 4, 5))
    torch.testing.assert_close(model(batch), expected)


def test_registry_rejects_unknown_model_and_wrong_feature_set(data_dir):
    with pytest.raises(ValueError, match=r"model.name: unknown model 'nope'; expected one of \['mf', 'two_tower'\]"):
        build_model("nope", features_of(data_dir, "ids"), ModelConfig())
    with pytest.raises(ValueError, match="'side' feature set"):
        build_model("two_tower", features_of(data_dir, "ids"), ModelConfig(name="two_tower"))


def test_sharding_config_names_real_tables(data_dir):
    model = build_model("mf", features_of(data_dir, "ids"), ModelConfig())
    config = ModelConfig(default_sharding="row_wise", sharding={"t_item_id": "data_parallel"})
    assert table_sharding_types(model, config) == {"t_user_id": "row_wise", "t_item_id": "data_parallel"}
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['t_items'\]"):
        table_sharding_types(model, ModelConfig(sharding={"t_items": "row_wise"}))


def test_column_wise_rowwise_adagrad_is_flagged():
    types = {"t_user_id": "column_wise", "t_item_id": "table_wise"}
    assert optimizer_caveats(types, OptimConfig(embedding_optimizer="rowwise_adagrad"))
    assert not optimizer_caveats(types, OptimConfig(embedding_optimizer="adagrad"))


# ---------------------------------------------------------------------- sharded

CASES = [
    # every sharding type on its own, with SGD
    "mf:table_wise", "mf:row_wise", "mf:column_wise", "mf:table_row_wise", "mf:table_column_wise",
    "mf:data_parallel",
    # the other fused optimizers, and data_parallel tables under the same rule
    "mf:row_wise@rowwise_adagrad", "mf:table_wise:t_item_id=data_parallel@rowwise_adagrad",
    "mf:column_wise@adagrad", "mf:data_parallel@adagrad",
    # two-tower: one sharding type per table, MLPs under DDP
    "two_tower:table_wise:t_user_id=row_wise,t_item_id=column_wise,t_user_gender=data_parallel,t_item_genres=table_row_wise",
]  # fmt: skip


def test_sharded_models_match_unsharded_copies(data_dir):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(SCRIPTS / "sharded_vs_unsharded.py"), str(data_dir), *CASES,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [w for case in CASES for w in ("OK", case)]
