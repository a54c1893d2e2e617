"""Models, loss, initial weights, placement and sharding: unsharded models against hand
computations; the seeded per-row rule against itself window by window; the planner's budgets;
and sharded models born on the meta device (1 and 2 torchrun ranks, every sharding type that
runs on CPU, and the planner's own choice) against unsharded models of the same rule."""

from __future__ import annotations

import json
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
from morec_dist.model.init import META, ROWS_PER_BLOCK, fill_table, materialize_unsharded, stable_seed
from morec_dist.model.placement import (
    AUTO,
    TableSpec,
    candidate_types,
    check_budget,
    table_sharding_types,
    table_specs,
)
from morec_dist.model.sharding import optimizer_caveats

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
    specs = table_specs(build_model("mf", features_of(data_dir, "ids"), ModelConfig(), META))
    assert specs["t_user_id"] == TableSpec("t_user_id", 31, 64, 4)
    config = ModelConfig(default_sharding="row_wise", sharding={"t_item_id": "data_parallel"})
    assert table_sharding_types(specs, config) == {"t_user_id": "row_wise", "t_item_id": "data_parallel"}
    assert table_sharding_types(specs, ModelConfig()) == {"t_user_id": AUTO, "t_item_id": AUTO}
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['t_items'\]"):
        table_sharding_types(specs, ModelConfig(sharding={"t_items": "row_wise"}))


# ------------------------------------------------------------------- initial weights


def test_a_table_window_is_the_whole_tables_window():
    """The rule is a pure function of (seed, table, row): any shard (rows and columns cut
    anywhere, across block edges) holds exactly the whole table's values there."""
    rows, dim, std = 3 * ROWS_PER_BLOCK + 17, 12, 0.1
    whole = torch.empty(rows, dim)
    fill_table(whole, 5, "t", std, dim)
    for r0, r1, c0, c1 in [
        (0, rows, 0, dim),
        (ROWS_PER_BLOCK - 3, 2 * ROWS_PER_BLOCK + 5, 4, 8),
        (rows - 1, rows, 0, 1),
    ]:
        window = torch.empty(r1 - r0, c1 - c0)
        fill_table(window, 5, "t", std, dim, r0, c0)
        assert torch.equal(window, whole[r0:r1, c0:c1])
    other = torch.empty(rows, dim)
    fill_table(other, 6, "t", std, dim)
    assert not torch.equal(other, whole)  # the seed matters
    assert abs(whole.std().item() - std) < 0.005 and abs(whole.mean().item()) < 0.005
    assert stable_seed(1, "t", 2) == stable_seed(1, "t", 2) != stable_seed(1, "t", 3)


def test_meta_built_models_materialize_by_the_rule(data_dir):
    """The same rule whole, on every model: tables and towers are the same for the same seed,
    whatever the build order, and differ for another seed."""
    features = features_of(data_dir, "side")
    config = ModelConfig(name="two_tower", embedding_dim=8, tower_dims=[16, 8])

    def born(seed: int) -> dict[str, torch.Tensor]:
        model = build_model("two_tower", features, config, META)
        assert all(p.is_meta for p in model.parameters())
        return materialize_unsharded(model, seed, 0.1, torch.device("cpu")).state_dict()

    a, b, c = born(3), born(3), born(4)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))
    user = torch.empty(31, 8)
    fill_table(user, 3, "t_user_id", 0.1, 8)
    assert torch.equal(a["user_ebc.embedding_bags.t_user_id.weight"], user)


# ------------------------------------------------------------------------- placement


def test_budget_refusal_names_the_table_its_bytes_and_the_budget():
    gb = 1 << 30
    specs = {"t_user_id": TableSpec("t_user_id", 4 << 20, 64, 4), "t_item_id": TableSpec("t_item_id", 1 << 20, 64, 4)}
    optim = OptimConfig(embedding_optimizer="sgd")
    pinned = {"t_user_id": "table_wise", "t_item_id": AUTO}
    with pytest.raises(ValueError) as e:
        check_budget(specs, pinned, optim, 2, gb // 2, "model.host_memory_gb")
    assert str(e.value) == (
        "model.host_memory_gb: table 't_user_id' needs 1.00 GiB per rank at the least (whole (table_wise), "
        "with sgd state) but the budget is 0.50 GiB per rank"
    )
    auto = {"t_user_id": AUTO, "t_item_id": AUTO}
    check_budget(specs, auto, optim, 2, gb, "model.host_memory_gb")  # 0.5 + 0.125 GiB per rank: fits
    with pytest.raises(ValueError, match=r"the tables need 0.62 GiB per rank .* budget is 0.60 GiB"):
        check_budget(specs, auto, optim, 2, int(0.6 * gb), "model.host_memory_gb")
    with pytest.raises(ValueError, match="'t_user_id' needs 0.51 GiB per rank"):  # + rowwise_adagrad's 4 B a row
        check_budget(specs, auto, OptimConfig(), 2, gb // 2, "model.host_memory_gb")


def test_auto_never_picks_types_that_break_exactness_or_resharding():
    assert "data_parallel" not in candidate_types(AUTO, "sgd")
    assert "column_wise" in candidate_types(AUTO, "adagrad")
    assert not {"column_wise", "table_column_wise"} & set(candidate_types(AUTO, "rowwise_adagrad"))
    assert candidate_types("data_parallel", "rowwise_adagrad") == ["data_parallel"]


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
    # the planner's own choice of types and kernels
    "mf:auto", "two_tower:auto@rowwise_adagrad",
]  # fmt: skip
ONE_RANK_CASES = ["mf:table_wise", "mf:row_wise", "mf:column_wise", "mf:data_parallel", "two_tower:auto@adagrad"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc, cases", [(2, CASES), (1, ONE_RANK_CASES)], ids=["2-ranks", "1-rank"])
def test_sharded_models_match_unsharded_copies(data_dir, nproc, cases):
    """Born sharded: initial weights equal the unsharded rule's, forward and one step match."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(SCRIPTS / "sharded_vs_unsharded.py"), str(data_dir), *cases,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [w for case in cases for w in ("OK", case)]


@pytest.mark.slow
def test_setup_memory_is_the_ranks_shards_not_the_model(tmp_path):
    """Two 1M x 64 tables (512 MiB in all) on 2 ranks: set-up raises each rank's peak RSS by
    its shards (256 MiB) and their optimizer state plus at most 10% and 32 MiB. The
    build-then-copy path this replaced held the whole model twice (>= 1 GiB) on every rank."""
    out = tmp_path / "memory.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(SCRIPTS / "born_sharded_memory.py"), str(1 << 20), "64", "auto", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(out.read_text())
    assert sorted(ranks) == ["0", "1"]
    assert sum(r["shard_bytes"] for r in ranks.values()) == 2 * (1 << 20) * 64 * 4  # every row placed once
    for rank, r in ranks.items():
        allowed = 1.1 * (r["shard_bytes"] + r["optimizer_bytes"]) + (32 << 20)
        assert r["setup_peak_bytes"] <= allowed, (rank, r, allowed)


def test_the_light_registries_name_torchrecs_and_fbgemms_values():
    """model/choices.py names TorchRec's sharding types and FBGEMM's fused optimizers by
    string (so the launcher needs neither): every string must be the library's own."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.types import ShardingType

    from morec_dist.model.choices import EMBEDDING_OPTIMIZERS, SHARDING_TYPES

    values = {t.value for t in ShardingType}
    assert all(SHARDING_TYPES.get(name) in values for name in SHARDING_TYPES.names())
    assert SHARDING_TYPES.get("table_wise") == ShardingType.TABLE_WISE.value
    for name in EMBEDDING_OPTIMIZERS.names():
        assert EMBEDDING_OPTIMIZERS.get(name).fused in EmbOptimType.__members__, name
