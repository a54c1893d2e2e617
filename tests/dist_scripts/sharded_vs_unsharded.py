"""torchrun worker: a sharded model matches an unsharded copy (forward, and weights after
one SGD step), for each sharding plan named on the command line.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/dist_scripts/sharded_vs_unsharded.py DATA_DIR CASE [CASE ...]
with CASE = MODEL:DEFAULT_TYPE[:table=type,...][@EMBEDDING_OPTIMIZER], e.g. mf:row_wise,
two_tower:table_wise:t_user_id=row_wise,t_item_genres=data_parallel or mf:row_wise@rowwise_adagrad.
The reference applies the embedding optimizer's rule with the plain torch optimizer (SGD,
Adagrad, TorchRec's RowWiseAdagrad) to the unsharded tables, and SGD to the dense part.
Prints one line "OK <case>" per case; any mismatch ends the job with exit code 1.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from rank_main import run_rank
from torch.distributed._shard.sharded_tensor import ShardedTensor

from morec_dist.config import Config
from morec_dist.data.batch import Batch
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.eval.evaluator import as_recommender
from morec_dist.model import bpr_loss, build_model
from morec_dist.model.init import META, materialize_unsharded
from morec_dist.model.registry import feature_set_for
from morec_dist.model.sharding import embedding_optimizer_factory, shard

LR = 0.5  # large, so that a wrong update cannot hide inside the tolerance
ROWS, NEGATIVES = 12, 3
CPU = torch.device("cpu")


def make_batch(features: FeatureBuilder, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    users = rng.integers(1, features.num_users + 1, size=ROWS)
    items = rng.integers(1, features.num_items + 1, size=(ROWS, 1 + NEGATIVES))
    return Batch(
        user_ids=torch.from_numpy(users),
        item_ids=torch.from_numpy(items),
        block_ids=torch.zeros(ROWS, dtype=torch.int64),
        user_kjt=features.user_kjt(users),
        item_kjt=features.item_kjt(items),
    )


def case_config(case: str) -> Config:
    case, _, optimizer = case.partition("@")
    model_name, default, *rest = case.split(":")
    config = Config()
    config.model.name = model_name
    config.model.embedding_dim = 8
    config.model.tower_dims = [16, 8]
    config.model.default_sharding = default
    config.model.sharding = dict(kv.split("=") for kv in rest[0].split(",")) if rest else {}
    config.optim.embedding_optimizer = optimizer or "sgd"
    config.optim.embedding_lr = LR
    config.optim.dense_optimizer = "sgd"
    config.optim.dense_lr = LR
    return config


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def compare_weights(dmp: torch.nn.Module, reference: torch.nn.Module, case: str) -> None:
    expected = reference.state_dict()
    actual = dmp.state_dict()
    if sorted(actual) != sorted(expected):
        raise AssertionError(f"{case}: state_dict keys differ: {sorted(actual)} vs {sorted(expected)}")
    for key, value in actual.items():
        if isinstance(value, ShardedTensor):
            for local in value.local_shards():
                offsets, sizes = local.metadata.shard_offsets, local.metadata.shard_sizes
                window = expected[key][offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]]
                assert_close(local.tensor, window, f"{case} {key} shard at {offsets}")
        else:
            assert_close(value, expected[key], f"{case} {key}")


def run_case(case: str, data: PreparedDataset, ctx) -> None:
    config = case_config(case)
    features = FeatureBuilder(data.path, data.num_users, data.num_items, feature_set_for(config.model.name))
    # the reference is the unsharded model with the weights of the same rule, whole on every rank
    reference = materialize_unsharded(
        build_model(config.model.name, features, config.model, META), config.run.seed, config.model.init_std, CPU
    )
    sharded = shard(build_model(config.model.name, features, config.model, META), config, ctx)
    dmp, optimizer = sharded.model, sharded.optimizer
    pinned = config.model.default_sharding
    if pinned != "auto" and not config.model.sharding:
        assert set(sharded.placement.types().values()) == {pinned}, (case, sharded.placement.types())
    batches = [make_batch(features, seed=100 + r) for r in range(ctx.world_size)]
    mine = batches[ctx.rank]

    compare_weights(dmp, reference, f"{case} (initial)")
    scores = dmp(mine)
    assert_close(scores, reference(mine), f"{case} forward")

    # One step: DMP averages gradients over ranks, so the reference minimises the mean of
    # the per-rank mean losses, i.e. the mean over the union of the equal-sized batches.
    bpr_loss(scores).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    tables = [p for n, p in reference.named_parameters() if ".embedding_bags." in n]
    dense = [p for n, p in reference.named_parameters() if ".embedding_bags." not in n]
    ref_optimizers = [embedding_optimizer_factory(config.optim)(tables)]
    if dense:
        ref_optimizers.append(torch.optim.SGD(dense, lr=LR))
    torch.stack([bpr_loss(reference(b)).mean() for b in batches]).mean().backward()
    for ref_optimizer in ref_optimizers:
        ref_optimizer.step()

    compare_weights(dmp, reference, f"{case} (after one step)")
    with torch.no_grad():
        assert_close(dmp(mine), reference(mine), f"{case} forward after the step")
        helper, plain = as_recommender(dmp.module), as_recommender(reference)
        assert_close(helper.user_vectors(mine.user_kjt), plain.user_vectors(mine.user_kjt), f"{case} user_vectors")
        assert_close(helper.item_vectors(mine.item_kjt), plain.item_vectors(mine.item_kjt), f"{case} item_vectors")
    if ctx.rank == 0:
        print(f"OK {case}", flush=True)


def main(ctx) -> None:
    data = PreparedDataset.open(sys.argv[1])
    for case in sys.argv[2:]:
        run_case(case, data, ctx)


if __name__ == "__main__":
    run_rank(main)
