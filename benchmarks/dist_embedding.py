"""The rank program of the embedding-scale benchmark (started by ``benchmarks.embedding_scale``).

For each sharding type and each total table size (ascending), every rank builds the
project's MF model (a user table and an item table of equal size) on the *meta* device,
shards it with the project's planner, sharders and fused optimizer (DMP allocates only
this rank's shards, so no rank ever holds the whole model), then trains it on synthetic
skewed ids for a number of steps. Per point and rank: median / p90 step time, peak RSS
during the point (the kernel's high-water mark is reset before each point through
``/proc/self/clear_refs``), RSS after set-up, and the bytes of table shards this rank holds.
Rank 0 writes all ranks' figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from benchmarks.common import peak_rss_mb, rss_mb
from morec_dist.config import load_config
from morec_dist.data.batch import Batch
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import init_distributed, shutdown_distributed
from morec_dist.model.loss import bpr_loss
from morec_dist.model.mf import MatrixFactorization
from morec_dist.model.sharding import build_optimizer, make_plan, make_sharders

SCATTER = 2_654_435_761  # a multiplicative hash spreads the hot ids over the whole table


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def skewed_ids(rng: np.random.Generator, n: int, size: int | tuple[int, ...]) -> np.ndarray:
    """Ids in 1..n-1 with a power-law popularity, hot ids scattered over the table."""
    rank = np.floor((n - 1) * rng.random(size) ** 3).astype(np.int64)
    return (rank * SCATTER) % (n - 1) + 1


def make_batch(features: FeatureBuilder, rng: np.random.Generator, rows: int, negatives: int) -> Batch:
    users = skewed_ids(rng, features.num_users + 1, rows)
    items = skewed_ids(rng, features.num_items + 1, (rows, 1 + negatives))
    return Batch(
        user_ids=torch.from_numpy(users),
        item_ids=torch.from_numpy(items),
        block_ids=torch.zeros(rows, dtype=torch.int64),
        user_kjt=features.user_kjt(users),
        item_kjt=features.item_kjt(items),
    )


def local_table_bytes(dmp: torch.nn.Module) -> int:
    """Bytes of the embedding shards this rank holds (from the sharded state dict)."""
    total = 0
    for name, value in dmp.state_dict().items():
        if "embedding_bags" not in name:
            continue
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        if shards is not None:
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in shards)
        elif hasattr(value, "to_local"):
            local = value.to_local()
            total += local.numel() * local.element_size()
        else:
            total += value.numel() * value.element_size()
    return total


def run_point(
    sharding: str, total_mb: float, dim: int, rows: int, negatives: int, warmup: int, steps: int, seed: int, ctx: Any
) -> dict[str, Any]:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    gc.collect()
    reset_peak_rss()
    before = rss_mb()
    per_table_rows = max(1024, int(total_mb * 2**20 / 2 / (dim * 4)))
    config = load_config(
        None,
        [
            f"model.default_sharding={sharding}",
            f"model.embedding_dim={dim}",
            "optim.embedding_optimizer=rowwise_adagrad",
        ],
    )
    features = FeatureBuilder(".", per_table_rows - 1, per_table_rows - 1, "ids")
    torch.manual_seed(seed)
    model = MatrixFactorization(
        features.user_features(), features.item_features(), dim, config.model.init_std, torch.device("meta")
    )
    sharders = make_sharders(config.optim)
    t = time.perf_counter()
    plan, types = make_plan(model, config.model, sharders, ctx.device, ctx.pg)
    dmp = DistributedModelParallel(
        module=model, env=ShardingEnv.from_process_group(ctx.pg), device=ctx.device, plan=plan, sharders=sharders
    )
    optimizer = build_optimizer(dmp, types, config.optim)
    setup_s = time.perf_counter() - t
    after_setup = rss_mb()
    rng = np.random.default_rng([seed, ctx.rank])
    batches = [make_batch(features, rng, rows, negatives) for _ in range(4)]
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        dist.barrier()
        t = time.perf_counter()
        loss = bpr_loss(dmp(batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    finite = bool(torch.isfinite(loss).item())
    result = {
        "sharding": sharding,
        "total_table_mb": round(2 * per_table_rows * dim * 4 / 2**20, 1),
        "rows_per_table": per_table_rows,
        "rank": ctx.rank,
        "local_table_mb": local_table_bytes(dmp) / 2**20,
        "setup_s": setup_s,
        "step_ms_median": 1000 * float(np.median(times)),
        "step_ms_p90": 1000 * float(np.percentile(times, 90)),
        "rss_mb_before": before,
        "rss_mb_after_setup": after_setup,
        "peak_rss_mb": peak_rss_mb(),
        "loss_finite": finite,
        "plan": {name: kind for name, kind in types.items()},
    }
    del dmp, optimizer, model, batches, loss
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", type=float, nargs="+", required=True)
    parser.add_argument("--sharding", nargs="+", default=["table_wise", "row_wise"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2048, help="rows per step per rank")
    parser.add_argument("--negatives", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = init_distributed()
    points = []
    for sharding in args.sharding:
        for size in sorted(args.sizes_mb):
            mine = run_point(
                sharding, size, args.dim, args.rows, args.negatives, args.warmup, args.steps, args.seed, ctx
            )
            everyone: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(everyone, mine)
            points.append({"sharding": sharding, "total_table_mb": mine["total_table_mb"], "ranks": everyone})
            if ctx.rank == 0:
                print(
                    f"{sharding:>10} {mine['total_table_mb']:9.1f} MB: step "
                    f"{max(r['step_ms_median'] for r in everyone):7.1f} ms, "
                    f"peak RSS per rank {[round(r['peak_rss_mb']) for r in everyone]} MB, shards "
                    f"{[round(r['local_table_mb']) for r in everyone]} MB",
                    flush=True,
                )
    if ctx.rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"world_size": ctx.world_size, "points": points}, indent=1))
    shutdown_distributed(exit_code=0)


if __name__ == "__main__":
    main()
