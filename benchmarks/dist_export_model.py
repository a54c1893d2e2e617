"""A large catalogue's model as a checkpoint, made by the product on torchrun ranks (no training):
``benchmarks/export.py`` exports it.

The Trainer builds the model born sharded (each rank allocates only its shards, placed by the
planner) as ``morec train`` does; then every table shard is overwritten, block by block, with
clustered vectors (row r of a table: centroid c(r) + noise, c drawn per row), so the item
vectors have the neighbourhood structure a trained model's have and an ANN index is measured
on something like them (the seeded initial weights are isotropic noise, the worst case for any
index). Users are drawn around the same centroids. ``save_checkpoint`` writes it like a
pretraining's ``best``. Every value is a function of (seed, table, row block).

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m benchmarks.dist_export_model \\
        --out CKPT data.path=... model.embedding_dim=64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from morec_dist.config import load_config
from morec_dist.distributed import shutdown_distributed
from morec_dist.model.init import stable_seed, table_name_of
from morec_dist.train.checkpoint import save_checkpoint
from morec_dist.train.run_dir import provenance
from morec_dist.train.runner import setup_job

BLOCK = 1 << 16


def centroids(seed: int, clusters: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, 17]).standard_normal((clusters, dim)).astype(np.float32)


def block_values(seed: int, table: str, block: int, centres: np.ndarray, noise: float) -> np.ndarray:
    """Rows [block * BLOCK, (block + 1) * BLOCK) of ``table``: centroid + noise, all columns."""
    rng = np.random.default_rng(stable_seed(seed, "export-bench", table, block))
    chosen = rng.integers(0, centres.shape[0], BLOCK)
    return centres[chosen] + noise * rng.standard_normal((BLOCK, centres.shape[1]), dtype=np.float32)


@torch.no_grad()
def fill(target: torch.Tensor, seed: int, table: str, rows: int, cols: int, centres: np.ndarray, noise: float) -> None:
    """``target`` is the window of ``table`` at (rows, cols) offsets."""
    r0, r1 = rows, rows + target.shape[0]
    for block in range(r0 // BLOCK, -(-r1 // BLOCK)):
        start = block * BLOCK
        lo, hi = max(r0, start), min(r1, start + BLOCK)
        values = block_values(seed, table, block, centres, noise)[
            lo - start : hi - start, cols : cols + target.shape[1]
        ]
        target[lo - r0 : hi - r0].copy_(torch.from_numpy(values))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(None, args.overrides)
    ctx, dataset, trainer = setup_job(config)
    tables = set(trainer.model_identity()["tables"])
    centres = centroids(config.run.seed, args.clusters, config.model.embedding_dim)
    for key, value in trainer.model.state_dict().items():
        table = table_name_of(key, tables)
        if table is None:
            continue
        shards = value.local_shards() if isinstance(value, ShardedTensor) else []
        for shard in shards:
            row, col = shard.metadata.shard_offsets[:2]
            fill(shard.tensor, config.run.seed, table, row, col, centres, args.noise)
        if not isinstance(value, ShardedTensor):
            fill(value, config.run.seed, table, 0, 0, centres, args.noise)
    synthetic = {"clusters": args.clusters, "noise": args.noise, "rule": "centroid(seed, row) + noise * N(0, 1)"}
    meta = {
        "model": trainer.model_identity(),
        "epoch": 0,
        "step": 0,
        "synthetic": synthetic,
        **provenance(config, ctx.world_size),
    }
    save_checkpoint(args.out, trainer.model_state(), meta)
    shutdown_distributed(exit_code=0)


if __name__ == "__main__":
    main()
