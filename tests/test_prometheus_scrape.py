"""A real Prometheus scrapes a real exporter process; the values it stores are the published ones.

The exporter process (tests/tools/publish_metrics.py) replays a seeded schedule of steps
through RankMetrics (two ranks) and CoordinatorMetrics on the job's port layout. Prometheus
(Debian's package, on loopback, scraping every second) scrapes it while it runs; the tests
then query the HTTP API and compare with what the schedule says, and evaluate every PromQL
expression of the Grafana dashboard against the same server.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from morec_dist.observe.metrics import CoordinatorMetrics, RankMetrics
from tests.prometheus_server import PrometheusServer, free_port_range

REPO = Path(__file__).resolve().parent.parent
PUBLISHER = REPO / "tests" / "tools" / "publish_metrics.py"
DASHBOARD = REPO / "morec_dist" / "observe" / "grafana" / "morec-dashboard.json"
JOB = "morec"
RANKS = 2
STEPS = 8
OBJECTIVES = {"revenue": 4, "fairness": 2, "alignment": 3}  # name -> number of groups


def make_schedule(seed: int) -> dict[str, Any]:
    """Seeded per-step values for every rank and the coordinator."""
    rng = random.Random(seed)
    names = ["accuracy", *OBJECTIVES]
    steps = []
    for step in range(1, STEPS + 1):
        ranks = [
            {
                "rows": rng.randrange(1000, 5000),
                "duration_s": rng.uniform(0.01, 2.0),
                "reader_wait_s": rng.uniform(0.0, 0.05),
                "block_losses": {n: rng.uniform(0.1, 3.0) for n in names},
                "staleness": rng.randrange(0, 3),
                "report_latency_s": rng.uniform(0.0005, 0.02),
                "waited": rng.random() < 0.4,
            }
            for _ in range(RANKS)
        ]
        probabilities = {}
        for name, groups in OBJECTIVES.items():
            raw = [rng.random() + 0.01 for _ in range(groups)]
            probabilities[name] = [v / sum(raw) for v in raw]
        coordinator = {
            "beta": rng.uniform(0.1, 1.5),
            "pid_terms": {
                "p": rng.uniform(0, 0.05),
                "i": rng.uniform(-0.2, 0.2),
                "d": 0.0,
                "error": rng.uniform(-1, 1),
            },
            "global_losses": {n: rng.uniform(0.1, 3.0) for n in names},
            "probabilities": probabilities,
            "version": step // 3,
            "target_loss": 0.42,
        }
        control = {
            "setpoint": 0.098,
            "measured": rng.uniform(0.08, 0.11),
            "smoothed": rng.uniform(0.09, 0.1),
            "share": rng.uniform(0.2, 0.95),
            "safety": rng.random() < 0.3,
        }
        steps.append({"step": step, "ranks": ranks, "coordinator": coordinator, "control": control})
    # the planner's placement, published once at start: (table, type, kernel, bytes on the rank)
    placement = [
        [["t_user_id", "row_wise", "fused", 1000 * (rank + 1)], ["t_item_id", "table_wise", "fused", 4096 * rank]]
        for rank in range(RANKS)
    ]
    # 0.35 s per step: the steps span several 1 s scrapes, so rate() has points to work on.
    return {"ranks": RANKS, "interval_s": 0.35, "steps": steps, "placement": placement}


@pytest.fixture(scope="module")
def schedule() -> dict[str, Any]:
    return make_schedule(seed=6)


@pytest.fixture(scope="module")
def publisher(schedule, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The exporter process; yields its ports and the path of its done file."""
    work = tmp_path_factory.mktemp("publisher")
    (work / "schedule.json").write_text(json.dumps(schedule))
    ready, done = work / "ready.json", work / "done.json"
    base_port = free_port_range(1 + RANKS)
    process = subprocess.Popen(
        [
            sys.executable,
            str(PUBLISHER),
            "--schedule",
            str(work / "schedule.json"),
            "--base-port",
            str(base_port),
            "--ready-file",
            str(ready),
            "--done-file",
            str(done),
        ],
        stdin=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, f"publisher exited with {process.returncode} before listening"
            assert time.monotonic() < deadline, "publisher did not start its exporters within 30 s"
            time.sleep(0.05)
        ports = json.loads(ready.read_text())["ports"]
        yield {"ports": ports, "base_port": base_port, "done": done, "process": process}
    finally:
        if process.stdin is not None:
            process.stdin.close()  # the publisher serves until its stdin closes
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def prometheus_targets(publisher) -> dict[str, list[str]]:
    return {JOB: [f"127.0.0.1:{port}" for port in publisher["ports"]]}


@pytest.fixture(scope="module")
def scraped(prometheus, publisher) -> PrometheusServer:
    """Prometheus once every target has been scraped after the last published step.

    The publisher starts its schedule only once Prometheus scrapes every target, so the
    stored history covers all steps.
    """
    targets = 1 + RANKS
    prometheus.wait_for(f'up{{job="{JOB}"}} == 1', lambda result: len(result) == targets, timeout_s=30)
    publisher["process"].stdin.write(b"go\n")
    publisher["process"].stdin.flush()
    deadline = time.monotonic() + 60
    while not publisher["done"].exists():
        assert time.monotonic() < deadline, "publisher did not finish its schedule"
        time.sleep(0.1)
    done_at = json.loads(publisher["done"].read_text())["time"]
    prometheus.wait_for(
        f'up{{job="{JOB}"}} == 1 and timestamp(up{{job="{JOB}"}}) > {done_at:.3f}',
        lambda result: len(result) == targets,
        timeout_s=30,
    )
    return prometheus


def last(schedule: dict[str, Any]) -> dict[str, Any]:
    return schedule["steps"][-1]


def test_ports_follow_the_metrics_config_layout(publisher):
    base = publisher["base_port"]
    assert publisher["ports"] == [base] + [base + 1 + r for r in range(RANKS)]


def test_coordinator_values_match_the_published_ones(scraped, schedule):
    final = last(schedule)["coordinator"]
    assert scraped.scalar("morec_coordinator_step") == STEPS
    assert scraped.scalar("morec_coordinator_beta") == pytest.approx(final["beta"], rel=1e-12)
    assert scraped.scalar("morec_coordinator_target_loss") == pytest.approx(0.42, rel=1e-12)
    assert scraped.scalar("morec_coordinator_sampler_version") == final["version"]
    terms = {"p": "proportional", "i": "integral", "d": "derivative", "error": "error"}
    for key, name in terms.items():
        assert scraped.scalar(f"morec_coordinator_pid_{name}") == pytest.approx(
            final["pid_terms"][key], rel=1e-12, abs=1e-15
        )
    losses = scraped.values("morec_coordinator_objective_loss", by="objective")
    assert losses == pytest.approx(final["global_losses"], rel=1e-12)
    control = last(schedule)["control"]
    assert scraped.scalar("morec_coordinator_accuracy_setpoint") == pytest.approx(control["setpoint"], rel=1e-12)
    assert scraped.scalar("morec_coordinator_heldout_accuracy") == pytest.approx(control["measured"], rel=1e-12)
    assert scraped.scalar("morec_coordinator_heldout_accuracy_smoothed") == pytest.approx(
        control["smoothed"], rel=1e-12
    )
    assert scraped.scalar("morec_coordinator_accuracy_share") == pytest.approx(control["share"], rel=1e-12)
    assert scraped.scalar("morec_coordinator_budget_safety") == float(control["safety"])
    for name, p in final["probabilities"].items():
        got = scraped.values(f'morec_coordinator_sampling_probability{{objective="{name}"}}', by="group")
        assert got == pytest.approx({str(g + 1): v for g, v in enumerate(p)}, rel=1e-12)
        assert scraped.scalar(f'sum(morec_coordinator_sampling_probability{{objective="{name}"}})') == pytest.approx(
            1.0
        )


def test_rank_values_match_the_published_ones(scraped, schedule):
    steps = schedule["steps"]
    for rank in range(RANKS):
        sel = f'{{rank="{rank}"}}'
        seen = [s["ranks"][rank] for s in steps]
        final = seen[-1]
        assert scraped.scalar(f"morec_rank_step{sel}") == STEPS
        assert scraped.scalar(f"morec_rank_rows_processed_total{sel}") == sum(s["rows"] for s in seen)
        assert scraped.scalar(f"morec_rank_rows_per_second{sel}") == pytest.approx(
            final["rows"] / final["duration_s"], rel=1e-12
        )
        assert scraped.scalar(f"morec_rank_step_duration_seconds_count{sel}") == STEPS
        assert scraped.scalar(f"morec_rank_step_duration_seconds_sum{sel}") == pytest.approx(
            sum(s["duration_s"] for s in seen), rel=1e-12
        )
        assert scraped.scalar(f"morec_rank_reader_wait_seconds_sum{sel}") == pytest.approx(
            sum(s["reader_wait_s"] for s in seen), rel=1e-12
        )
        assert scraped.scalar(f"morec_rank_coordinator_report_latency_seconds_sum{sel}") == pytest.approx(
            sum(s["report_latency_s"] for s in seen), rel=1e-12
        )
        under_half_second = sum(1 for s in seen if s["duration_s"] <= 0.5)
        assert scraped.scalar(f'morec_rank_step_duration_seconds_bucket{{rank="{rank}",le="0.5"}}') == under_half_second
        assert scraped.scalar(f"morec_rank_coordinator_staleness_steps{sel}") == final["staleness"]
        assert scraped.scalar(f"morec_rank_coordinator_waits_total{sel}") == sum(1 for s in seen if s["waited"])
        block = scraped.values(f"morec_rank_block_loss{sel}", by="objective")
        assert block == pytest.approx(final["block_losses"], rel=1e-12)
        placed = scraped.values(f"morec_rank_table_bytes{sel}", by="table")
        assert placed == {table: size for table, _, _, size in schedule["placement"][rank]}


def test_rates_are_computed_over_the_scraped_history(scraped, schedule):
    """rate() needs at least two scrapes of a series: the steps spanned several."""
    result = scraped.query("rate(morec_rank_rows_processed_total[1m])")
    assert len(result) == RANKS
    assert all(float(r["value"][1]) > 0 for r in result)
    history = scraped.query('count_over_time(morec_rank_step{rank="0"}[1m])')
    assert float(history[0]["value"][1]) >= 3


def test_every_defined_metric_reaches_prometheus(scraped):
    """The names Prometheus stored are exactly the families the publishers define."""
    registry = CollectorRegistry()
    RankMetrics(registry, rank=0)
    CoordinatorMetrics(registry)
    defined = set()
    for family in registry.collect():
        if family.type == "counter":
            defined.add(family.name + "_total")
        elif family.type == "histogram":
            defined |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            defined.add(family.name)
    body = scraped.api("label/__name__/values", [("match[]", f'{{job="{JOB}"}}')])
    stored = {n for n in body["data"] if n.startswith("morec_") and not n.endswith("_created")}
    assert stored == defined


# ------------------------------------------------------------------------------ dashboard


def dashboard_expressions(node: Any) -> list[str]:
    """Every ``expr`` of every panel target, rows and nested panels included."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(dashboard_expressions(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(dashboard_expressions(value))
    return found


def as_prometheus_query(expr: str) -> str:
    """Grafana's variables as Grafana fills them with "All" selected and a 1 m rate window."""
    query = expr.replace("$__rate_interval", "1m").replace("${rank}", ".*").replace("$rank", ".*")
    leftover = re.findall(r"\$\{?\w+", query)
    assert not leftover, f"dashboard expression uses a variable the test does not fill: {leftover} in {expr!r}"
    return query


def test_dashboard_expressions_all_answer_with_data(scraped):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_expressions(dashboard["panels"])
    assert len(exprs) >= 15
    failures = []
    for expr in exprs:
        body = scraped.query_raw(as_prometheus_query(expr))
        if body.get("status") != "success":
            failures.append(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        elif not body["data"]["result"]:
            failures.append(f"{expr}: empty result")
    assert not failures, "\n".join(failures)


def test_dashboard_rank_variable_lists_the_ranks(scraped):
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "rank"]
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
    assert match, variable["query"]
    metric, label = match.groups()
    body = scraped.api(f"label/{label}/values", [("match[]", metric)])
    assert body["status"] == "success"
    assert sorted(body["data"]) == [str(r) for r in range(RANKS)]


def test_dashboard_covers_every_metric(scraped):
    """Each family a publisher defines is charted somewhere on the dashboard."""
    text = " ".join(dashboard_expressions(json.loads(DASHBOARD.read_text())["panels"]))
    registry = CollectorRegistry()
    RankMetrics(registry, rank=0)
    CoordinatorMetrics(registry)
    missing = [f.name for f in registry.collect() if f.name not in text]
    assert not missing, f"metrics not on the dashboard: {missing}"
