"""The sharding environment of a job: one ``DistContext`` (rank, world size, device, backend,
process group), how it is opened and closed, and the small collectives every layer uses.

It sits below ``model/``, ``eval/`` and ``train/``: they take a ``DistContext`` instead of
loose rank / world size / device arguments.
"""

from morec_dist.distributed.context import (
    DistContext,
    all_reduce_sum,
    any_rank,
    backend_for,
    init_distributed,
    init_job_distributed,
    join_restarted_group,
    pick_device,
    shutdown_distributed,
)

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "any_rank",
    "backend_for",
    "init_distributed",
    "init_job_distributed",
    "join_restarted_group",
    "pick_device",
    "shutdown_distributed",
]
