"""Replays a schedule of known values through RankMetrics and CoordinatorMetrics, exported.

The exporter process of tests/test_prometheus_scrape.py: one process with the job's port
layout (the coordinator on ``--base-port``, local rank r on ``--base-port + 1 + r``), each
with its own registry as in a real job. It writes ``--ready-file`` (the ports, JSON) once
every exporter listens, waits for a line on stdin (sent once Prometheus scrapes it, so the
history starts before the first step), replays the schedule one step every ``interval_s``, writes
``--done-file`` (the wall time after the last step), then keeps serving until its stdin
closes, so it never outlives the test that started it.

    python tests/tools/publish_metrics.py --schedule s.json --base-port 9400 \
        --ready-file ready.json --done-file done.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from morec_dist.observe.metrics import CoordinatorMetrics, RankMetrics, start_coordinator_exporter, start_rank_exporter


def _write_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schedule", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--done-file", type=Path, required=True)
    args = parser.parse_args(argv)

    schedule = json.loads(args.schedule.read_text())
    coordinator_registry = CollectorRegistry()
    coordinator = CoordinatorMetrics(coordinator_registry)
    exporters = [start_coordinator_exporter(coordinator_registry, args.host, args.base_port)]
    ranks = []
    for rank in range(schedule["ranks"]):
        registry = CollectorRegistry()
        ranks.append(RankMetrics(registry, rank))
        exporters.append(start_rank_exporter(registry, args.host, args.base_port, local_rank=rank))
    _write_atomically(args.ready_file, {"ports": [e.port for e in exporters]})

    sys.stdin.readline()  # the go signal
    for metrics, placement in zip(ranks, schedule.get("placement", [[]] * len(ranks)), strict=True):
        metrics.observe_placement([tuple(table) for table in placement])  # once, as a job does at start
    for entry in schedule["steps"]:
        for metrics, observed in zip(ranks, entry["ranks"], strict=True):
            metrics.observe_step(step=entry["step"], **observed)
        coordinator.publish(step=entry["step"], **entry["coordinator"])
        if "control" in entry:  # the budget law's view
            coordinator.publish_control(**entry["control"])
        time.sleep(schedule["interval_s"])
    _write_atomically(args.done_file, {"time": time.time()})

    sys.stdin.read()  # serve until the test closes our stdin (or dies)
    for exporter in exporters:
        exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
