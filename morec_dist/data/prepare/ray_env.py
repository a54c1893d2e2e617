"""The Ray runtime the ETL runs on: a capped local Ray by default, or a cluster's address.

``ray_runtime`` connects once (or reuses a connection the caller already made), sets Ray
Data's memory limits so every operator streams in bounded memory, and shuts down only what
it started.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_OBJECT_STORE_MB = 2048
# Ray Data's block target: a sorted (group, range) of the layout stays one block up to this.
TARGET_MAX_BLOCK_BYTES = 512 << 20


@contextmanager
def ray_runtime(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_mb: int = DEFAULT_OBJECT_STORE_MB,
    progress: bool = False,
) -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            # address="local": always a fresh local Ray, never another job's running cluster
            ray.init(
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 1,
                object_store_memory=object_store_mb << 20,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        started = True
    if not progress:  # stage log lines only; Ray Data's own INFO lines are noise then
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = TARGET_MAX_BLOCK_BYTES
    if not address:
        # Ray Data's streaming budget: half the object store, so operators back-pressure
        # (and the sort spills) instead of growing without bound
        from ray.data._internal.execution.interfaces import ExecutionResources

        ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=(object_store_mb << 20) // 2)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    try:
        yield
    finally:
        if started:
            ray.shutdown()
