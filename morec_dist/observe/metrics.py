"""Prometheus metrics of a job: their definitions, the typed publishers, and the exporters.

This module owns every metric name the project exports. Two publishers write them:

- ``RankMetrics``: one per training process, the view of that rank (its step, throughput,
  step and reader-wait durations, its round trip to the coordinator, its per-block losses);
- ``CoordinatorMetrics``: one in the coordinator, the global view (per-objective loss, beta
  and the PID terms, the sampling distributions p_k, the sampler version, the aggregated step;
  under the budget law also the accuracy set point, the measured and smoothed held-out
  accuracy of the control slice, the accuracy share and the safety rule).

Conventions (checked over every family by tests/test_metrics.py): names start with
``morec_``, durations are in seconds, counters end in ``_total``, and labels come from a
small fixed set (``rank``, ``objective``, ``group``) whose values are bounded by the job's
configuration: never a user or item id.

Each process owns its own ``CollectorRegistry`` (never prometheus_client's global default),
served by ``start_exporter`` on loopback unless configured otherwise. Ports follow
``MetricsConfig``: the coordinator on ``metrics.base_port``, local rank r on
``metrics.base_port + 1 + r``, so one host's processes never collide.
"""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, start_http_server
from prometheus_client.registry import Collector

from morec_dist.config import ConfigError, MetricsConfig

# Every label any metric may carry; each has a value set bounded by the config.
# "table", "sharding_type", "compute_kernel": one series per embedding table, fixed at start
ALLOWED_LABELS = frozenset({"rank", "objective", "group", "table", "sharding_type", "compute_kernel"})
PID_TERMS = ("p", "i", "d", "error")

# Step times range from milliseconds (tiny CPU tests) to minutes (large GPU batches).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Waits on the reader or on a coordinator round trip should be far below a step.
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class MetricsError(ValueError):
    """A metric value or label is malformed, or an exporter cannot start."""


class MetricsPortInUseError(MetricsError, ConfigError):
    """The exporter's port is taken by another process: a configuration problem
    (``metrics.base_port``), so the CLI reports it like any other bad config value."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


def coordinator_port(base_port: int) -> int:
    """The coordinator exports on ``metrics.base_port`` itself."""
    return base_port


def rank_port(base_port: int, local_rank: int) -> int:
    """Local rank r exports on ``metrics.base_port + 1 + r``."""
    if local_rank < 0:
        raise MetricsError(f"local_rank: expected >= 0, got {local_rank}")
    return base_port + 1 + local_rank


def _finite(value: float, where: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise MetricsError(f"{where}: expected a finite number, got {value}")
    return value


def _non_negative(value: float, where: str) -> float:
    value = _finite(value, where)
    if value < 0:
        raise MetricsError(f"{where}: expected >= 0, got {value}")
    return value


class _Snapshot(CollectorRegistry):
    """A publisher's own registry, read under the lock its publisher writes under: a scrape
    sees every value of one step or of the next, never step N+1 beside beta N (each
    prometheus_client metric locks only itself, so a scrape between two ``set`` calls of
    one publish would mix them).

    The publisher's metrics register here, and this registry registers in the job's as one
    collector; ``describe`` lists their names, so a name clash there is still refused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self._described: list[Metric] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._described.extend(collector.describe())  # type: ignore[attr-defined]

    def describe(self) -> list[Metric]:
        return list(self._described)

    def collect(self) -> list[Metric]:
        with self.lock:  # materialised inside the lock: the values of one publish
            return list(super().collect())


# ----------------------------------------------------------------------------- per rank


class RankMetrics:
    """The metrics of one training rank, all labelled with its global ``rank``.

    ``observe_step`` is called once per optimizer step with what that step measured.
    """

    def __init__(self, registry: CollectorRegistry, rank: int) -> None:
        if rank < 0:
            raise MetricsError(f"rank: expected >= 0, got {rank}")
        self.rank = str(rank)
        own = self._snapshot = _Snapshot()
        r = ("rank",)
        self._step = Gauge("morec_rank_step", "Last optimizer step this rank finished.", r, registry=own)
        self._rows = Counter(
            "morec_rank_rows_processed_total",
            "Training rows (all blocks) this rank has consumed.",
            r,
            registry=own,
        )
        self._rows_per_second = Gauge(
            "morec_rank_rows_per_second", "Rows of the last step divided by its duration.", r, registry=own
        )
        self._step_duration = Histogram(
            "morec_rank_step_duration_seconds",
            "Wall time of one optimizer step, reader wait included.",
            r,
            buckets=STEP_BUCKETS,
            registry=own,
        )
        self._reader_wait = Histogram(
            "morec_rank_reader_wait_seconds",
            "Time a step waited for its batch from the reader.",
            r,
            buckets=WAIT_BUCKETS,
            registry=own,
        )
        self._report_latency = Histogram(
            "morec_rank_coordinator_report_latency_seconds",
            "Round trip of one loss report to the coordinator.",
            r,
            buckets=WAIT_BUCKETS,
            registry=own,
        )
        self._staleness = Gauge(
            "morec_rank_coordinator_staleness_steps",
            "Steps between this step and the coordinator state (beta, p_k) it trained with.",
            r,
            registry=own,
        )
        self._waits = Counter(
            "morec_rank_coordinator_waits_total",
            "Steps that blocked because the coordinator state was staler than allowed.",
            r,
            registry=own,
        )
        self._block_loss = Gauge(
            "morec_rank_block_loss",
            "This rank's loss on its block of each objective, last step.",
            ("rank", "objective"),
            registry=own,
        )
        self._table_bytes = Gauge(
            "morec_rank_table_bytes",
            "Bytes of each embedding table's weights this rank holds, by the planner's placement.",
            ("rank", "table", "sharding_type", "compute_kernel"),
            registry=own,
        )
        registry.register(own)  # last: the job's registry checks the names of all of them

    def observe_placement(self, tables: Iterable[tuple[str, str, str, int]]) -> None:
        """The placement chosen at start: (table, sharding type, compute kernel, bytes here)."""
        for table, sharding_type, kernel, size in tables:
            self._table_bytes.labels(self.rank, table, sharding_type, kernel).set(size)

    def observe_step(
        self,
        step: int,
        rows: int,
        duration_s: float,
        reader_wait_s: float,
        block_losses: Mapping[str, float],
        staleness: int,
        report_latency_s: float,
        waited: bool,
    ) -> None:
        """Record one finished step. Durations are seconds; ``rows`` counts every block's rows."""
        if step < 0 or rows < 0 or staleness < 0:
            raise MetricsError(f"observe_step: step, rows and staleness must be >= 0, got {step}, {rows}, {staleness}")
        duration_s = _non_negative(duration_s, "observe_step.duration_s")
        reader_wait_s = _non_negative(reader_wait_s, "observe_step.reader_wait_s")
        report_latency_s = _non_negative(report_latency_s, "observe_step.report_latency_s")
        losses = {name: _finite(v, f"observe_step.block_losses[{name!r}]") for name, v in block_losses.items()}
        with self._snapshot.lock:  # validated above: nothing below raises half-way
            self._write_step(step, rows, duration_s, reader_wait_s, losses, staleness, report_latency_s, waited)

    def _write_step(
        self,
        step: int,
        rows: int,
        duration_s: float,
        reader_wait_s: float,
        losses: dict[str, float],
        staleness: int,
        report_latency_s: float,
        waited: bool,
    ) -> None:
        r = self.rank
        self._step.labels(r).set(step)
        self._rows.labels(r).inc(rows)
        if duration_s > 0:
            self._rows_per_second.labels(r).set(rows / duration_s)
        self._step_duration.labels(r).observe(duration_s)
        self._reader_wait.labels(r).observe(reader_wait_s)
        self._report_latency.labels(r).observe(report_latency_s)
        self._staleness.labels(r).set(staleness)
        # Touch the counter even when it does not move, so the series exists from step one.
        self._waits.labels(r).inc(1 if waited else 0)
        for name, value in losses.items():
            self._block_loss.labels(r, name).set(value)


# --------------------------------------------------------------------------- coordinator


class CoordinatorMetrics:
    """The global view the coordinator publishes after each aggregated step."""

    def __init__(self, registry: CollectorRegistry) -> None:
        own = self._snapshot = _Snapshot()
        self._step = Gauge("morec_coordinator_step", "Last step aggregated over all ranks.", registry=own)
        self._loss = Gauge(
            "morec_coordinator_objective_loss",
            "Global loss of each objective (mean over ranks) at the aggregated step.",
            ("objective",),
            registry=own,
        )
        self._beta = Gauge(
            "morec_coordinator_beta", "Weight of the accuracy loss set by the PID controller.", registry=own
        )
        self._target = Gauge(
            "morec_coordinator_target_loss",
            "Accuracy loss the PID controller steers towards (l_hat).",
            registry=own,
        )
        self._pid = {
            "p": Gauge("morec_coordinator_pid_proportional", "PID proportional term P_t.", registry=own),
            "i": Gauge("morec_coordinator_pid_integral", "PID integral term I_t.", registry=own),
            "d": Gauge("morec_coordinator_pid_derivative", "PID derivative term D_t.", registry=own),
            "error": Gauge("morec_coordinator_pid_error", "PID error e_t = l_hat - l_t.", registry=own),
        }
        self._probability = Gauge(
            "morec_coordinator_sampling_probability",
            "Probability p_k[g] that a block of objective k draws group g (group = the 1-based id in the data).",
            ("objective", "group"),
            registry=own,
        )
        self._version = Gauge(
            "morec_coordinator_sampler_version",
            "Version of the sampling distributions; bumps on every update.",
            registry=own,
        )
        # the budget law (morec.pid.law = "budget"); absent under the paper's law
        self._setpoint = Gauge(
            "morec_coordinator_accuracy_setpoint",
            "Held-out Hit@K the budget law holds: (1 - budget) x the pretrained model's, on the control slice.",
            registry=own,
        )
        self._heldout = Gauge(
            "morec_coordinator_heldout_accuracy",
            "Held-out Hit@K of the control slice at the newest measurement.",
            registry=own,
        )
        self._smoothed = Gauge(
            "morec_coordinator_heldout_accuracy_smoothed",
            "The budget law's smoothed held-out Hit@K (its controlled variable).",
            registry=own,
        )
        self._share = Gauge(
            "morec_coordinator_accuracy_share",
            "Accuracy share of the combined loss, beta / (beta + lambda * sum w), set by the budget law.",
            registry=own,
        )
        self._safety = Gauge(
            "morec_coordinator_budget_safety",
            "1 while the budget is broken by far (full accuracy share, sampler paused), else 0.",
            registry=own,
        )
        registry.register(own)  # last: the job's registry checks the names of all of them

    def publish(
        self,
        step: int,
        beta: float,
        pid_terms: Mapping[str, float],
        global_losses: Mapping[str, float],
        probabilities: Mapping[str, Sequence[float]],
        version: int,
        target_loss: float,
    ) -> None:
        """Publish one aggregated step.

        ``pid_terms`` needs the keys p, i, d and error (other keys, e.g. those of a whole
        ``PIDStep``, are ignored); ``probabilities`` maps each objective to p_k, 0-based.
        """
        if step < 0 or version < 0:
            raise MetricsError(f"publish: step and version must be >= 0, got {step}, {version}")
        missing = [t for t in PID_TERMS if t not in pid_terms]
        if missing:
            raise MetricsError(f"publish.pid_terms: missing {missing}; expected keys {list(PID_TERMS)}")
        terms = {t: _finite(pid_terms[t], f"publish.pid_terms[{t!r}]") for t in PID_TERMS}
        losses = {name: _finite(v, f"publish.global_losses[{name!r}]") for name, v in global_losses.items()}
        probs = {name: [_probability(v, name, g) for g, v in enumerate(p)] for name, p in probabilities.items()}
        beta = _finite(beta, "publish.beta")
        target_loss = _finite(target_loss, "publish.target_loss")

        with self._snapshot.lock:  # one step's values together (validated above: no raise half-way)
            self._step.set(step)
            self._beta.set(beta)
            self._target.set(target_loss)
            for term, value in terms.items():
                self._pid[term].set(value)
            for name, value in losses.items():
                self._loss.labels(name).set(value)
            for name, p in probs.items():
                for g, value in enumerate(p):
                    self._probability.labels(name, str(g + 1)).set(value)
            self._version.set(version)

    def publish_control(self, setpoint: float, measured: float, smoothed: float, share: float, safety: bool) -> None:
        """The budget law's state after its newest measurement (rates in [0, 1])."""
        values = {
            "setpoint": setpoint,
            "measured": measured,
            "smoothed": smoothed,
            "share": share,
        }
        for name, value in values.items():
            value = _finite(value, f"publish_control.{name}")
            if not 0.0 <= value <= 1.0:
                raise MetricsError(f"publish_control.{name}: expected a rate in [0, 1], got {value}")
        with self._snapshot.lock:
            self._setpoint.set(setpoint)
            self._heldout.set(measured)
            self._smoothed.set(smoothed)
            self._share.set(share)
            self._safety.set(1.0 if safety else 0.0)


def _probability(value: float, objective: str, index: int) -> float:
    value = _finite(value, f"publish.probabilities[{objective!r}][{index}]")
    if not 0.0 <= value <= 1.0:
        raise MetricsError(
            f"publish.probabilities[{objective!r}][{index}]: expected a probability in [0, 1], got {value}"
        )
    return value


# ------------------------------------------------------------------------------ exporter


class Exporter:
    """A running HTTP endpoint serving one registry at ``/metrics``."""

    def __init__(self, host: str, port: int, server: WSGIServer, thread: threading.Thread) -> None:
        self.host = host
        self.port = port
        self._server = server
        self._thread = thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_exporter(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> Exporter:
    """Serve ``registry`` on ``host:port`` (0 = any free port) from a daemon thread.

    A port taken by another process raises ``MetricsPortInUseError`` naming the port and
    ``metrics.base_port``, the key that moves every port of the job.
    """
    if not 0 <= port <= 65535:
        raise MetricsError(f"metrics port: expected 0..65535, got {port} (from metrics.base_port)")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsPortInUseError(
                f"metrics exporter: port {port} on {host} is already in use; choose a free range with "
                f"metrics.base_port (the coordinator uses metrics.base_port, local rank r uses "
                f"metrics.base_port + 1 + r)",
                port,
            ) from None
        raise MetricsError(
            f"metrics exporter: cannot listen on {host}:{port} (metrics.host, metrics.base_port): {exc}"
        ) from exc
    return Exporter(host, int(server.server_port), server, thread)


def start_rank_exporter(registry: CollectorRegistry, host: str, base_port: int, local_rank: int) -> Exporter:
    """The exporter of local rank r, on ``base_port + 1 + r`` (from ``config.metrics``)."""
    return start_exporter(registry, host, rank_port(base_port, local_rank))


def start_coordinator_exporter(registry: CollectorRegistry, host: str, base_port: int) -> Exporter:
    """The coordinator's exporter, on ``base_port`` (from ``config.metrics``)."""
    return start_exporter(registry, host, coordinator_port(base_port))


def open_rank_metrics(metrics: MetricsConfig, rank: int, local_rank: int) -> tuple[RankMetrics, Exporter]:
    """A rank's publisher on its own registry, already served per ``config.metrics``.

    Callers check ``metrics.enabled`` first; stop the exporter when the rank ends.
    """
    registry = CollectorRegistry()
    publisher = RankMetrics(registry, rank)
    return publisher, start_rank_exporter(registry, metrics.host, metrics.base_port, local_rank)


def open_coordinator_metrics(metrics: MetricsConfig) -> tuple[CoordinatorMetrics, Exporter]:
    """The coordinator's publisher on its own registry, served on ``metrics.base_port``."""
    registry = CollectorRegistry()
    publisher = CoordinatorMetrics(registry)
    return publisher, start_coordinator_exporter(registry, metrics.host, metrics.base_port)
