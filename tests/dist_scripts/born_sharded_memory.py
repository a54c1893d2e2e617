"""torchrun worker: the memory a rank takes to set up a sharded model, against its shards.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    tests/dist_scripts/born_sharded_memory.py ROWS DIM SHARDING OUT_JSON
Each rank builds MF with two ROWS x DIM tables on the meta device, shards it (rowwise_adagrad)
and writes {rank: {"setup_peak_bytes", "shard_bytes", "optimizer_bytes"}} (rank 0) to OUT_JSON:
the growth of the peak RSS over set-up, and what the placement says the rank holds.
"""

from __future__ import annotations

import json
import resource
import sys

import torch
import torch.distributed as dist
from rank_main import run_rank

from morec_dist.config import Config
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext
from morec_dist.model import build_model
from morec_dist.model.init import META
from morec_dist.model.sharding import shard


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(ctx: DistContext) -> None:
    rows, dim, sharding, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    config = Config()
    config.model.embedding_dim = dim
    config.model.default_sharding = sharding
    features = FeatureBuilder(".", rows - 1, rows - 1, "ids")
    model = build_model("mf", features, config.model, META)
    torch.zeros(1)  # the allocator's first arena before the baseline
    before = peak_rss_bytes()
    sharded = shard(model, config, ctx)
    grown = peak_rss_bytes() - before
    held = sharded.placement.rank_bytes(ctx.rank)
    mine = {"setup_peak_bytes": grown, "shard_bytes": held, "optimizer_bytes": held // dim}
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    if ctx.rank == 0:
        with open(out, "w") as f:
            json.dump({str(r): v for r, v in enumerate(everyone)}, f)


if __name__ == "__main__":
    run_rank(main)
