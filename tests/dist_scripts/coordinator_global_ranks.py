"""A torchrun rank of the global coordinator protocol (synthetic, beta-dependent losses).

Launched by tests/test_coordinator_global.py with the MOREC_TEST_* variables of
coordinator_ranks.py plus MOREC_TEST_SLOW_RANK / MOREC_TEST_SLOW_MS (that rank sleeps
that long per step; the others a seeded 0-5 ms). Rank 0 is the only Ray client. Writes
rank<r>.json: the decisions used, the wall-clock start / end of every step, the counters.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coordinator_ranks import BLOCKS, synthetic_report, synthetic_signals

from morec_dist.coordinator.collective import GlobalCoordinatorClient


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = int(os.environ["MOREC_TEST_STEPS"])
    staleness = int(os.environ["MOREC_TEST_STALENESS"])
    every = int(os.environ["MOREC_TEST_EVERY"])
    slow_rank, slow_ms = (
        int(os.environ.get("MOREC_TEST_SLOW_RANK", "-1")),
        float(os.environ.get("MOREC_TEST_SLOW_MS", "0")),
    )
    jitter = random.Random(int(os.environ["MOREC_TEST_JITTER_SEED"]) * 10 + rank)
    inner = None
    if rank == 0:
        from morec_dist.coordinator.actor import get_existing
        from morec_dist.coordinator.client import CoordinatorClient
        from morec_dist.coordinator.service import connect_ray

        connect_ray(os.environ["MOREC_TEST_RAY_ADDRESS"], os.environ["MOREC_TEST_NAMESPACE"])
        inner = CoordinatorClient(
            get_existing(os.environ["MOREC_TEST_ACTOR"], os.environ["MOREC_TEST_NAMESPACE"]),
            rank=0,
            staleness=staleness,
        )
        inner.start(0)
    client = GlobalCoordinatorClient(
        rank=rank,
        world_size=world,
        staleness=staleness,
        num_blocks=BLOCKS,
        weight_names=["revenue", "fairness", "alignment"],
        prob_sizes={"revenue": 2, "fairness": 4, "alignment": 3},
        inner=inner,
    )
    client.start(0)
    used, times = [], []
    for step in range(steps):
        decision = client.decision_for_step(step)
        if step == 3:  # asked twice (an epoch whose reader ran dry asks for the next epoch's first step)
            assert client.decision_for_step(step) == decision
        began = time.time()
        used.append(
            {
                "step": step,
                "beta": decision.beta,
                "weights": decision.weights,
                "p_version": decision.p_version,
                "probabilities": decision.probabilities,
            }
        )
        time.sleep(slow_ms / 1000 if rank == slow_rank else jitter.uniform(0.0, 0.005))
        client.report(step, *synthetic_report(rank, step, decision.beta))
        times.append((began, time.time()))
        if rank == 0 and every and (step + 1) % every == 0:
            client.submit_signals(step, synthetic_signals(step))
    client.close()
    out = Path(os.environ["MOREC_TEST_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"decisions": used, "times": times, "stats": client.stats()}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
