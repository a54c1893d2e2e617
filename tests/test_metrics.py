"""The metric definitions, their naming conventions, and the exporters over real HTTP."""

from __future__ import annotations

import math
import re
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from morec_dist.config import ConfigError, load_config
from morec_dist.observe.metrics import (
    ALLOWED_LABELS,
    CoordinatorMetrics,
    MetricsError,
    MetricsPortInUseError,
    RankMetrics,
    open_coordinator_metrics,
    open_rank_metrics,
    start_coordinator_exporter,
    start_exporter,
    start_rank_exporter,
)

PID = {"p": 0.02, "i": -0.125, "d": 0.0, "error": 0.375}


def populated_registry() -> CollectorRegistry:
    """Both publishers in one registry, every labelled series touched once."""
    registry = CollectorRegistry()
    rank = RankMetrics(registry, rank=3)
    rank.observe_placement([("t_user_id", "row_wise", "fused", 1 << 20), ("t_item_id", "table_wise", "fused", 0)])
    rank.observe_step(
        step=7,
        rows=2200,
        duration_s=0.25,
        reader_wait_s=0.002,
        block_losses={"accuracy": 0.69, "revenue": 1.5},
        staleness=2,
        report_latency_s=0.004,
        waited=True,
    )
    coordinator = CoordinatorMetrics(registry)
    coordinator.publish(
        step=7,
        beta=0.8,
        pid_terms=PID,
        global_losses={"accuracy": 0.7, "revenue": 1.4},
        probabilities={"revenue": [0.25, 0.75], "fairness": [0.5, 0.25, 0.25]},
        version=2,
        target_loss=0.6,
    )
    coordinator.publish_control(setpoint=0.098, measured=0.097, smoothed=0.0985, share=0.75, safety=False)
    return registry


def scrape(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def sample(families, name: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not exported")


# ----------------------------------------------------------------------- conventions

TIME_WORDS = re.compile(r"(duration|latency|wait(?!s(_|$)))")  # "waits" is a count
NON_BASE_UNITS = re.compile(
    r"_(ms|millis|milliseconds|microseconds|us|minutes|hours|days|kilobytes|megabytes|percent)(_|$)"
)


def test_every_family_follows_prometheus_naming_conventions():
    families = list(populated_registry().collect())
    assert len(families) == 25  # 11 per rank + 14 global; a new metric must pass these checks too
    problems = []
    for f in families:
        if not f.name.startswith("morec_"):
            problems.append(f"{f.name}: no morec_ prefix")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", f.name):
            problems.append(f"{f.name}: not snake_case")
        if not f.documentation.strip():
            problems.append(f"{f.name}: no help text")
        if NON_BASE_UNITS.search(f.name):
            problems.append(f"{f.name}: not in base units")
        if TIME_WORDS.search(f.name) and "_seconds" not in f.name:
            problems.append(f"{f.name}: a time without _seconds")
        if f.type != "counter" and f.name.endswith("_total"):
            problems.append(f"{f.name}: a {f.type} named like a counter")
        for s in f.samples:
            if f.type == "counter" and not (s.name.endswith("_total") or s.name.endswith("_created")):
                problems.append(f"{s.name}: counter sample without _total")
            extra = set(s.labels) - ALLOWED_LABELS - ({"le"} if f.type == "histogram" else set())
            if extra:
                problems.append(f"{s.name}: unbounded or unexpected labels {sorted(extra)}")
            if any(re.search(r"(user|item)", k) for k in s.labels):
                problems.append(f"{s.name}: a user/item label")
    assert not problems, "\n".join(problems)


def test_the_exposition_text_follows_the_conventions_too():
    """What a scraper sees (text format) and not only the Python objects."""
    with start_exporter(populated_registry()) as exporter:
        families = scrape(exporter.url)
    counters = [f for f in families.values() if f.type == "counter"]
    assert {f.name for f in counters} == {"morec_rank_rows_processed", "morec_rank_coordinator_waits"}
    for f in families.values():
        assert f.name.startswith("morec_")
        for s in f.samples:
            if f.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
            if f.type == "histogram":
                assert f.name.endswith("_seconds"), f.name


def test_no_metric_lands_in_the_global_default_registry():
    before = {f.name for f in REGISTRY.collect()}
    populated_registry()
    after = {f.name for f in REGISTRY.collect()}
    assert after == before
    assert not any(n.startswith("morec_") for n in after)


def test_two_ranks_in_one_process_use_separate_registries():
    """Same names twice would clash in one registry; per-process registries keep them apart."""
    a, b = CollectorRegistry(), CollectorRegistry()
    RankMetrics(a, rank=0)
    RankMetrics(b, rank=1)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        RankMetrics(a, rank=2)


# ------------------------------------------------------------------------- exporters


def test_rank_and_coordinator_values_over_http():
    with start_exporter(populated_registry(), "127.0.0.1", 0) as exporter:
        assert exporter.port > 0
        families = scrape(exporter.url)
    r = {"rank": "3"}
    assert sample(families, "morec_rank_step", **r) == 7
    assert sample(families, "morec_rank_rows_processed_total", **r) == 2200
    assert sample(families, "morec_rank_rows_per_second", **r) == pytest.approx(2200 / 0.25)
    assert sample(families, "morec_rank_step_duration_seconds_count", **r) == 1
    assert sample(families, "morec_rank_step_duration_seconds_sum", **r) == 0.25
    assert sample(families, "morec_rank_step_duration_seconds_bucket", le="0.1", **r) == 0
    assert sample(families, "morec_rank_step_duration_seconds_bucket", le="0.25", **r) == 1
    assert sample(families, "morec_rank_reader_wait_seconds_sum", **r) == 0.002
    assert sample(families, "morec_rank_coordinator_report_latency_seconds_sum", **r) == 0.004
    assert sample(families, "morec_rank_coordinator_staleness_steps", **r) == 2
    assert sample(families, "morec_rank_coordinator_waits_total", **r) == 1
    assert sample(families, "morec_rank_block_loss", objective="revenue", **r) == 1.5
    assert sample(families, "morec_coordinator_step") == 7
    assert sample(families, "morec_coordinator_beta") == 0.8
    assert sample(families, "morec_coordinator_target_loss") == 0.6
    assert sample(families, "morec_coordinator_sampler_version") == 2
    assert sample(families, "morec_coordinator_pid_proportional") == PID["p"]
    assert sample(families, "morec_coordinator_pid_integral") == PID["i"]
    assert sample(families, "morec_coordinator_pid_derivative") == PID["d"]
    assert sample(families, "morec_coordinator_pid_error") == PID["error"]
    assert sample(families, "morec_coordinator_objective_loss", objective="accuracy") == 0.7
    # group labels are the 1-based group ids of the data; index 0 is group "1"
    assert sample(families, "morec_coordinator_sampling_probability", objective="fairness", group="1") == 0.5
    assert sample(families, "morec_coordinator_sampling_probability", objective="revenue", group="2") == 0.75
    # the budget law's view
    assert sample(families, "morec_coordinator_accuracy_setpoint") == 0.098
    assert sample(families, "morec_coordinator_heldout_accuracy") == 0.097
    assert sample(families, "morec_coordinator_heldout_accuracy_smoothed") == 0.0985
    assert sample(families, "morec_coordinator_accuracy_share") == 0.75
    assert sample(families, "morec_coordinator_budget_safety") == 0


def test_counters_accumulate_and_gauges_follow_the_last_step():
    registry = CollectorRegistry()
    rank = RankMetrics(registry, rank=0)
    for step, waited in ((1, False), (2, True), (3, True)):
        rank.observe_step(step, 100 * step, 0.5, 0.0, {"accuracy": 1.0 / step}, 0, 0.001, waited)
    with start_exporter(registry) as exporter:
        families = scrape(exporter.url)
    assert sample(families, "morec_rank_rows_processed_total", rank="0") == 600
    assert sample(families, "morec_rank_coordinator_waits_total", rank="0") == 2
    assert sample(families, "morec_rank_step_duration_seconds_count", rank="0") == 3
    assert sample(families, "morec_rank_block_loss", rank="0", objective="accuracy") == pytest.approx(1 / 3)
    assert sample(families, "morec_rank_rows_per_second", rank="0") == 600


def test_exporter_ports_follow_the_metrics_config():
    # a config that a user would write; the ports derive from metrics.base_port alone
    base = free_base_port(3)
    config = load_config(overrides=[f"metrics.base_port={base}", "metrics.enabled=true"])
    m = config.metrics
    registries = [CollectorRegistry() for _ in range(3)]
    CoordinatorMetrics(registries[0]).publish(1, 0.5, PID, {"accuracy": 0.5}, {}, 0, 0.5)
    exporters = [start_coordinator_exporter(registries[0], m.host, m.base_port)]
    for local_rank in (0, 1):
        RankMetrics(registries[1 + local_rank], rank=10 + local_rank).observe_step(1, 1, 0.1, 0, {}, 0, 0, False)
        exporters.append(start_rank_exporter(registries[1 + local_rank], m.host, m.base_port, local_rank))
    try:
        assert [e.port for e in exporters] == [base, base + 1, base + 2]
        assert all(e.host == "127.0.0.1" for e in exporters)  # loopback unless configured
        assert "morec_coordinator_beta" in scrape(exporters[0].url)
        assert sample(scrape(exporters[2].url), "morec_rank_step", rank="11") == 1
    finally:
        for e in exporters:
            e.stop()


def test_open_helpers_serve_each_process_registry_from_the_config():
    base = free_base_port(3)
    config = load_config(overrides=[f"metrics.base_port={base}"]).metrics
    coordinator, coordinator_exporter = open_coordinator_metrics(config)
    rank, rank_exporter = open_rank_metrics(config, rank=5, local_rank=1)
    try:
        assert (coordinator_exporter.port, rank_exporter.port) == (base, base + 2)
        coordinator.publish(3, 0.7, PID, {"accuracy": 0.5}, {"revenue": [1.0]}, 1, 0.4)
        rank.observe_step(3, 10, 0.1, 0.0, {"accuracy": 0.5}, 1, 0.001, False)
        coordinator_families, rank_families = scrape(coordinator_exporter.url), scrape(rank_exporter.url)
        assert sample(coordinator_families, "morec_coordinator_beta") == 0.7
        assert "morec_rank_step" not in coordinator_families  # one registry per process
        assert sample(rank_families, "morec_rank_step", rank="5") == 3
        assert "morec_coordinator_beta" not in rank_families
    finally:
        coordinator_exporter.stop()
        rank_exporter.stop()


def free_base_port(count: int) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65471:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


def test_a_stopped_exporter_releases_its_port():
    exporter = start_exporter(CollectorRegistry())
    port = exporter.port
    exporter.stop()
    exporter.stop()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    start_exporter(CollectorRegistry(), port=port).stop()


def test_port_in_use_by_another_process_names_the_port_and_the_config_key():
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(holder.stdout.readline())
        with pytest.raises(MetricsPortInUseError) as info:
            start_exporter(CollectorRegistry(), "127.0.0.1", port)
        message = str(info.value)
        assert str(port) in message and "metrics.base_port" in message and "already in use" in message
        assert info.value.port == port
        assert isinstance(info.value, ConfigError)  # the CLI reports it as a config problem
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_bad_values_are_refused_with_the_field_named():
    registry = CollectorRegistry()
    rank, coordinator = RankMetrics(registry, rank=0), CoordinatorMetrics(registry)
    with pytest.raises(MetricsError, match=r"block_losses\['revenue'\]"):
        rank.observe_step(1, 10, 0.1, 0.0, {"revenue": math.nan}, 0, 0.0, False)
    with pytest.raises(MetricsError, match="duration_s"):
        rank.observe_step(1, 10, -0.1, 0.0, {}, 0, 0.0, False)
    with pytest.raises(MetricsError, match=r"missing \['error'\]"):
        coordinator.publish(1, 0.5, {"p": 0, "i": 0, "d": 0}, {}, {}, 0, 0.5)
    with pytest.raises(MetricsError, match=r"publish_control.smoothed: expected a rate"):
        coordinator.publish_control(setpoint=0.1, measured=0.1, smoothed=1.5, share=0.5, safety=False)
    with pytest.raises(MetricsError, match=r"probabilities\['fairness'\]\[1\]"):
        coordinator.publish(1, 0.5, PID, {}, {"fairness": [0.5, 1.5]}, 0, 0.5)
    with pytest.raises(MetricsError, match="beta"):
        coordinator.publish(1, math.inf, PID, {}, {}, 0, 0.5)
    with pytest.raises(MetricsError, match="rank"):
        RankMetrics(CollectorRegistry(), rank=-1)


def _coordinator_view(text: str) -> tuple[float, ...]:
    """step, beta, version and every p of one scrape (the values one publish writes)."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = [families[name].samples[0].value for name in ("morec_coordinator_step", "morec_coordinator_beta")]
    values.append(families["morec_coordinator_sampler_version"].samples[0].value)
    values += [s.value for s in families["morec_coordinator_sampling_probability"].samples]
    return tuple(values)


def _rank_view(text: str) -> tuple[float, ...]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = [families["morec_rank_step"].samples[0].value]
    values += [s.value for s in families["morec_rank_block_loss"].samples]
    return tuple(values)


SCRAPES = 150


def test_a_scrape_never_pairs_one_steps_values_with_anothers():
    """Every value a publish writes is a function of its step here, so a scrape taken while
    the next step is half written (step N+1 with beta N) shows as a mismatch. Many groups
    make a publish long enough that unsynchronised scrapes land inside one often: without
    the lock (each metric locked only itself) about half of 100 scrapes came out torn, in
    ~1 s; the publisher and the exporter share a lock, so none may."""
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    coordinator, rank = CoordinatorMetrics(registry), RankMetrics(registry, rank=0)
    groups, stop, published = 50, threading.Event(), threading.Event()

    def publish_forever() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            p = step % 1000 / 1000
            coordinator.publish(step, p, PID, {"accuracy": p}, {"fairness": [p] * groups}, step, 0.5)
            rank.observe_step(step, 1, 0.1, 0.0, {f"o{i}": float(step) for i in range(groups)}, 0, 0.0, False)
            published.set()  # the labelled series exist from here on

    writer = threading.Thread(target=publish_forever, daemon=True)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # switch threads often (default 5 ms): a torn publish shows at once
    writer.start()
    try:
        assert published.wait(timeout=60)
        torn = []
        for _ in range(SCRAPES):
            text = generate_latest(registry).decode()  # what the HTTP handler serves
            step, beta, version, *p = _coordinator_view(text)
            if not (beta == step % 1000 / 1000 and version == step and set(p) == {beta}):
                torn.append(("coordinator", step, beta, version, sorted(set(p))[:3]))
                continue
            rank_step, *losses = _rank_view(text)
            if set(losses) != {rank_step}:
                torn.append(("rank", rank_step, sorted(set(losses))[:3]))
    finally:
        stop.set()
        writer.join(timeout=10)
        sys.setswitchinterval(old_interval)
    assert not torn, f"{len(torn)} of {SCRAPES} scrapes mixed two steps, e.g. {torn[:3]}"


def test_the_placement_is_exported_per_rank_and_table():
    """The planner's placement as morec_rank_table_bytes: one series per table, its type,
    kernel and the bytes this rank holds (0 for a table placed on another rank)."""
    families = {f.name: f for f in populated_registry().collect()}
    labels = {"rank": "3", "sharding_type": "row_wise", "compute_kernel": "fused"}
    assert sample(families, "morec_rank_table_bytes", table="t_user_id", **labels) == 1 << 20
    assert sample(families, "morec_rank_table_bytes", table="t_item_id", sharding_type="table_wise") == 0
