"""torchrun worker: the distributed evaluation of a sharded integer-weight MF model (and of
the same model with all weights 0: every score ties), its merged top-K lists, and the
most-popular baseline; rank 0 writes every result to OUT_JSON.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/dist_scripts/distributed_eval.py DATA_DIR OUT_JSON SHARDING BATCH_USERS
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import torch
from integer_model import integer_mf
from rank_main import run_rank

from morec_dist.config import Config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.eval import EvalOptions, evaluate, evaluate_most_popular
from morec_dist.eval.evaluator import load_users
from morec_dist.eval.ranking import PAD_ID, model_scorer, ranked_batches
from morec_dist.model.init import META
from morec_dist.model.sharding import shard, unwrap

KS = [1, 3, 10]


def result_json(result) -> dict:
    return {
        "metrics": result.metrics,
        "band_counts": {str(k): v.tolist() for k, v in result.band_counts.items()},
        "user_ids": result.user_ids.tolist(),
        "ranks": result.ranks.tolist(),
    }


def topk_lists(model, data, split: str, k: int, features, ctx: DistContext, options: EvalOptions) -> list[list[int]]:
    """Every user's merged top-k list (ranking order, history masked), in user order: the
    lists the protocol's band counts are made from (shared with tests/test_eval.py)."""
    users = load_users(data, split, ctx)
    scorer = model_scorer(unwrap(model), features, ctx, lambda: None)
    lists: list[list[int]] = []
    for batch in ranked_batches(scorer, users, data.num_items, k, ctx, options):
        lists += [[i for i in row if i != PAD_ID] for row in batch.top_items.tolist()]
    return lists


def main(ctx: DistContext) -> None:
    data_dir, out_path, sharding, batch_users = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    data = PreparedDataset.open(data_dir)
    features = FeatureBuilder(data.path, data.num_users, data.num_items, "ids")
    model = integer_mf(features)
    config = Config()
    config.model.embedding_dim = 4
    config.model.default_sharding = sharding
    dmp = shard(integer_mf(features, device=META), config, ctx).model
    dmp.load_state_dict(copy.deepcopy(model.state_dict()))  # DMP's load consumes the dict
    out: dict[str, Any] = {"world_size": ctx.world_size}
    for split in ("valid", "test"):
        options = EvalOptions(batch_users=batch_users)
        result = evaluate(dmp, data, split, KS, features, ctx, options)
        out[f"mf_{split}"] = result_json(result)
        popular = evaluate_most_popular(data, split, KS, ctx, options)
        out[f"popular_{split}"] = result_json(popular)
    out["mf_test_top"] = topk_lists(dmp, data, "test", max(KS), features, ctx, EvalOptions(batch_users))
    dmp.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})  # every score ties
    out["zero_test"] = result_json(evaluate(dmp, data, "test", KS, features, ctx, EvalOptions(batch_users)))
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    run_rank(main)
