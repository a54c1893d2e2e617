"""A real Prometheus scrapes a real MoRec run: two torchrun ranks and the coordinator actor.

The job runs with ``metrics.enabled``; Prometheus (Debian's server, loopback, 1 s scrapes)
scrapes the coordinator's port and both ranks' ports while it trains. Afterwards every
scraped (step, beta) and (step, accuracy loss) pair must equal the coordinator's own trace
in the job's metrics.json, and the ranks' row counters must be whole steps of the batch.
"""

from __future__ import annotations

import pytest

from tests.e2e_fixtures import finetune
from tests.prometheus_server import PrometheusServer, free_port_range

pytestmark = pytest.mark.slow
BATCH, BLOCKS, STEPS = 16, 4, 400


def samples(server: PrometheusServer, expr: str) -> dict[tuple, dict[float, float]]:
    """{label set: {timestamp: value}} of every sample of ``expr`` in the last 15 minutes."""
    result = server.query(f"{expr}[15m]")
    return {tuple(sorted(r["metric"].items())): {float(t): float(v) for t, v in r["values"]} for r in result}


def test_prometheus_scrapes_beta_and_losses_that_match_the_trainer(pretrained, tiny_data, tmp_path):
    base = free_port_range(3)
    targets = {
        "morec-coordinator": [f"127.0.0.1:{base}"],
        "morec-ranks": [f"127.0.0.1:{base + 1}", f"127.0.0.1:{base + 2}"],
    }
    server = PrometheusServer.start(targets, tmp_path / "prometheus")
    try:
        result = finetune(
            pretrained,
            tiny_data,
            tmp_path / "run",
            "metrics.enabled=true",
            f"metrics.base_port={base}",
            f"train.max_steps={STEPS}",
            "morec.epochs=2",
            f"data.batch_size={BATCH}",
        )
        trace = result["coordinator"]["trace"]
        beta_of = dict(zip(trace["step"], trace["beta"], strict=True))
        accuracy_of = dict(zip(trace["step"], (row[0] for row in trace["losses"]), strict=True))

        (steps,) = samples(server, "morec_coordinator_step").values()
        (betas,) = samples(server, "morec_coordinator_beta").values()
        accuracy = next(
            v for k, v in samples(server, "morec_coordinator_objective_loss").items() if ("objective", "accuracy") in k
        )
        paired = [t for t in steps if t in betas and t in accuracy]
        assert len(paired) >= 3, f"too few coordinator scrapes during the run: {len(paired)}"
        for t in paired:
            step = int(steps[t])
            assert betas[t] == beta_of[step], (step, betas[t], beta_of[step])
            assert accuracy[t] == pytest.approx(accuracy_of[step], rel=1e-12)

        rows = samples(server, "morec_rank_rows_processed_total")
        assert {dict(k)["rank"] for k in rows} == {"0", "1"}
        for series in rows.values():
            assert series and all(
                v % (BATCH * BLOCKS) == 0 and 0 < v <= STEPS * BATCH * BLOCKS for v in series.values()
            )
        probabilities = samples(server, 'morec_coordinator_sampling_probability{objective="alignment"}')
        assert len(probabilities) == 10  # one series per popularity band
    finally:
        server.stop()
