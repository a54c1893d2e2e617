"""torchrun rank program of ``benchmarks/eval_scale.py``: one catalogue size, one signal
update and one full evaluation through eval/ranking.py, timed, with this rank's peak RSS.

The model is synthetic but goes through the evaluator's own scorer (``model_scorer``: the
item vectors of this rank's range in equal rounds, user vectors per batch): a vector is a
fixed function of its id (random-feature cosines, seeded), so any world size sees the same
scores and no table is held. Users, held-out items and histories are drawn from seeds.
Writes rank 0's figures (every rank's RSS gathered) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import peak_rss_mb, reset_peak_rss
from morec_dist.data.features import FeatureBuilder
from morec_dist.distributed import DistContext, init_distributed, shutdown_distributed
from morec_dist.eval.ranking import (
    EvalOptions,
    UserSet,
    all_gather_stack,
    item_range,
    model_scorer,
    ranked_batches,
    stop_checker,
)
from morec_dist.model.spec import VectorScorer

HISTORY_PER_USER = 20


class IdVectors(nn.Module):
    """user_vectors / item_vectors as a fixed function of the id: cos(id * w + b), d dims."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.rand(2, dim, generator=g, dtype=torch.float64) * 0.01
        self.b = torch.rand(2, dim, generator=g, dtype=torch.float64) * 6.283

    def _vectors(self, kjt: Any, side: int) -> torch.Tensor:
        ids = kjt.values().to(torch.float64).unsqueeze(1)
        return torch.cos(ids * self.w[side] + self.b[side]).to(torch.float32)

    def user_vectors(self, user_kjt: Any) -> torch.Tensor:
        return self._vectors(user_kjt, 0)

    def item_vectors(self, item_kjt: Any) -> torch.Tensor:
        return self._vectors(item_kjt, 1)


def synthetic_users(num_users: int, num_items: int, seed: int, ctx: DistContext) -> UserSet:
    """Users 1..U, a held-out item each and HISTORY_PER_USER history items, of which this
    rank keeps those in its item range (as evaluator.load_users does)."""
    rng = np.random.default_rng([seed, 1])
    targets = rng.integers(1, num_items + 1, num_users)
    history = rng.integers(1, num_items + 1, (num_users, HISTORY_PER_USER))
    lo, hi = item_range(num_items, ctx)
    keep = (history >= lo) & (history < hi)
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(keep.sum(axis=1))
    return UserSet(np.arange(1, num_users + 1, dtype=np.int64), targets, indptr, history[keep])


def phase(model, features, users, k: int, ctx: DistContext, batch_users: int, negatives: int, seed: int):
    """One pass over ``users`` (item vectors included): (wall seconds, peak RSS MB, sum of
    the ranks (a checksum), this process's CPU seconds: less sensitive to a shared machine's load)."""
    reset_peak_rss()
    extra = None
    if negatives:
        extra = np.random.default_rng([seed, 7919]).integers(1, features.num_items + 1, (len(users), negatives))
    options = EvalOptions(batch_users=batch_users)
    started, cpu = time.perf_counter(), time.process_time()
    scorer = model_scorer(model, features, ctx, stop_checker(ctx, options), VectorScorer())  # no spec: say it
    ranks = 0
    for batch in ranked_batches(scorer, users, features.num_items, k, ctx, options, extra_columns=extra):
        ranks += int(batch.ranks.sum())
    seconds = time.perf_counter() - started
    return seconds, peak_rss_mb(), ranks, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--eval-users", type=int, required=True)
    parser.add_argument("--signal-users", type=int, required=True)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--eval-k", type=int, default=10)
    parser.add_argument("--signal-k", type=int, default=100)
    parser.add_argument("--negatives", type=int, default=10)
    parser.add_argument("--batch-users", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = init_distributed()
    torch.manual_seed(args.seed)
    num_users = max(args.eval_users, args.signal_users)
    features = FeatureBuilder("/nonexistent", num_users, args.items, "ids")  # ids only: no files read
    model = IdVectors(args.dim, args.seed)
    common = (ctx, args.batch_users)
    signal_users = synthetic_users(args.signal_users, args.items, args.seed, ctx)
    signal = phase(model, features, signal_users, args.signal_k, *common, args.negatives, args.seed)
    eval_users = synthetic_users(args.eval_users, args.items, args.seed + 1, ctx)
    full = phase(model, features, eval_users, args.eval_k, *common, 0, args.seed)
    per_rank = all_gather_stack(
        torch.tensor([signal[0], signal[1], full[0], full[1], signal[3], full[3]], dtype=torch.float64), ctx
    ).tolist()
    if ctx.rank == 0:
        lo, hi = item_range(args.items, ctx)
        result = {
            "items": args.items,
            "world_size": ctx.world_size,
            "items_per_rank": hi - lo,
            "dim": args.dim,
            "signal": {
                "users": args.signal_users,
                "k": args.signal_k,
                "negatives": args.negatives,
                "seconds": max(r[0] for r in per_rank),
                "peak_rss_mb_per_rank": [r[1] for r in per_rank],
                "cpu_seconds_per_rank": [r[4] for r in per_rank],
                "rank_checksum": signal[2],
            },
            "evaluation": {
                "users": args.eval_users,
                "k": args.eval_k,
                "seconds": max(r[2] for r in per_rank),
                "peak_rss_mb_per_rank": [r[3] for r in per_rank],
                "cpu_seconds_per_rank": [r[5] for r in per_rank],
                "rank_checksum": full[2],
            },
        }
        args.out.write_text(json.dumps(result, indent=1))
    shutdown_distributed(exit_code=0)


if __name__ == "__main__":
    main()
