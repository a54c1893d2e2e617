"""Observability of a job: Prometheus metrics of the ranks and the coordinator, and their exporters.

The Grafana dashboard for these metrics is ``grafana/morec-dashboard.json`` beside this file.
"""

from morec_dist.observe.metrics import (
    CoordinatorMetrics,
    Exporter,
    MetricsError,
    MetricsPortInUseError,
    RankMetrics,
    coordinator_port,
    open_coordinator_metrics,
    open_rank_metrics,
    rank_port,
    start_coordinator_exporter,
    start_exporter,
    start_rank_exporter,
)

__all__ = [
    "CoordinatorMetrics",
    "Exporter",
    "MetricsError",
    "MetricsPortInUseError",
    "RankMetrics",
    "coordinator_port",
    "open_coordinator_metrics",
    "open_rank_metrics",
    "rank_port",
    "start_coordinator_exporter",
    "start_exporter",
    "start_rank_exporter",
]
