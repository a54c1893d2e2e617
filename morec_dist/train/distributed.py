"""The distributed context of a job: joining the process group (also after a torchrun
restart) and the one ``DistContext`` (rank, world size, local rank, device, backend, group)
every part of a job receives instead of loose rank / world size / device arguments.

``DistContext`` and ``init_distributed`` are defined in ``morec_dist.model.sharding`` (the
model layer shards over it and must not import upward); this module is the train layer's
entry point to them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from morec_dist.model.sharding import DistContext, init_distributed, pick_device_and_backend

__all__ = ["DistContext", "init_job_distributed", "join_restarted_group"]


def join_restarted_group() -> None:
    """Join the process group of a group torchrun *restarted* (``--max-restarts``), with
    this attempt's keys under their own store prefix.

    torch 2.13's standalone agent keeps its TCPStore across restarts, and the keys the
    gloo rendezvous writes (``default_pg/...``) are the same in every attempt: a restarted
    rank can read the address of a peer of the failed attempt and hang or fail in
    connectFullMesh. The first attempt takes the normal path (``init_distributed``)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timedelta(minutes=10),
    )
    device, backend = pick_device_and_backend(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"/morec/attempt-{restart}", store),
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )


def init_job_distributed() -> DistContext:
    """This rank's context: a restarted group's own rendezvous first, then the open group."""
    join_restarted_group()
    return init_distributed()
