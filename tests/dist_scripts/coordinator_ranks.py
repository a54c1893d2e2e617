"""A torchrun rank that drives the coordinator actor with synthetic, beta-dependent losses.

Launched by tests/test_coordinator_ray.py as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_scripts/coordinator_ranks.py``
with MOREC_TEST_RAY_ADDRESS, MOREC_TEST_ACTOR, MOREC_TEST_NAMESPACE, MOREC_TEST_STEPS,
MOREC_TEST_STALENESS, MOREC_TEST_EVERY, MOREC_TEST_JITTER_SEED and MOREC_TEST_OUT set.
Each rank sleeps a seeded random time per step so reports interleave out of order; the
losses depend on the beta the rank was given, so a timing-dependent beta would change
every later number. Writes rank<r>.json with the decisions it used and its wait counters.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from morec_dist.coordinator.actor import get_existing
from morec_dist.coordinator.client import CoordinatorClient
from morec_dist.coordinator.service import connect_ray

BLOCKS = 4


def synthetic_report(rank: int, step: int, beta: float) -> tuple[list[float], list[int]]:
    """Shared with the test: per-block loss sums and counts of one rank at one step."""
    counts = [8 + rank + b for b in range(BLOCKS)]
    means = [0.2 + 0.05 * b + 0.1 * (rank + 1) / (step + 1) + 0.3 * beta for b in range(BLOCKS)]
    return [m * c for m, c in zip(means, counts, strict=True)], counts


def synthetic_signals(step: int) -> dict[str, list[float]]:
    return {"fairness": [float((step + g) % 4) for g in range(4)], "alignment": [float(step % 3 + 1), 2.0, 3.0]}


def main() -> int:
    rank = int(os.environ["RANK"])
    steps = int(os.environ["MOREC_TEST_STEPS"])
    staleness = int(os.environ["MOREC_TEST_STALENESS"])
    every = int(os.environ["MOREC_TEST_EVERY"])
    jitter = random.Random(int(os.environ["MOREC_TEST_JITTER_SEED"]) * 10 + rank)
    connect_ray(os.environ["MOREC_TEST_RAY_ADDRESS"], os.environ["MOREC_TEST_NAMESPACE"])
    actor = get_existing(os.environ["MOREC_TEST_ACTOR"], os.environ["MOREC_TEST_NAMESPACE"])
    client = CoordinatorClient(actor, rank=rank, staleness=staleness)
    client.start(0)
    used = []
    started = time.perf_counter()
    for step in range(steps):
        decision = client.decision_for_step(step)
        used.append(
            {
                "step": step,
                "beta": decision.beta,
                "weights": decision.weights,
                "p_version": decision.p_version,
                "probabilities": decision.probabilities,
            }
        )
        time.sleep(jitter.uniform(0.0, 0.02))  # "compute": reorders the two ranks' reports
        client.report(step, *synthetic_report(rank, step, decision.beta))
        if rank == 0 and (step + 1) % every == 0:
            client.submit_signals(step, synthetic_signals(step))
    client.flush()
    out = Path(os.environ["MOREC_TEST_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"decisions": used, "stats": client.stats(), "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
