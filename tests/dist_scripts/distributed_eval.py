"""torchrun worker: the distributed evaluation of a sharded integer-weight MF model and of
the most-popular baseline; rank 0 writes every result to OUT_JSON.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/dist_scripts/distributed_eval.py DATA_DIR OUT_JSON SHARDING BATCH_USERS
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from typing import Any

from integer_model import integer_mf

from morec_dist.config import Config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import init_distributed, shutdown_distributed
from morec_dist.eval import evaluate, evaluate_most_popular
from morec_dist.model.sharding import shard

KS = [1, 3, 10]


def result_json(result) -> dict:
    return {
        "metrics": result.metrics,
        "band_counts": {str(k): v.tolist() for k, v in result.band_counts.items()},
        "user_ids": result.user_ids.tolist(),
        "ranks": result.ranks.tolist(),
    }


def main() -> None:
    data_dir, out_path, sharding, batch_users = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ctx = init_distributed()
    try:
        data = PreparedDataset.open(data_dir)
        features = FeatureBuilder(data.path, data.num_users, data.num_items, "ids")
        model = integer_mf(features)
        config = Config()
        config.model.embedding_dim = 4
        config.model.default_sharding = sharding
        dmp, _ = shard(copy.deepcopy(model), config, ctx.device, ctx.pg)
        out: dict[str, Any] = {"world_size": ctx.world_size}
        for split in ("valid", "test"):
            result = evaluate(dmp, data, split, KS, ctx.rank, ctx.world_size, features, ctx.device, batch_users)
            out[f"mf_{split}"] = result_json(result)
            popular = evaluate_most_popular(data, split, KS, ctx.rank, ctx.world_size, ctx.device, batch_users)
            out[f"popular_{split}"] = result_json(popular)
        if ctx.rank == 0:
            with open(out_path, "w") as f:
                json.dump(out, f)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    shutdown_distributed(exit_code=0)


if __name__ == "__main__":
    main()
