"""The distributed context: which device and backend a rank uses, joining the process group
torchrun describes (also after a torchrun restart), and the host-side collectives.

One process group serves both kinds of tensors. On CUDA it is opened with the mixed backend
``cpu:gloo,cuda:nccl``: NCCL has no CPU collectives, and the job reduces CPU scalars (loss
sums, the SIGTERM flag, evaluation counts) beside CUDA tensors (sharded embeddings, DDP
gradients). On CPU it is plain gloo. The helpers here (``all_reduce_sum``, ``any_rank``)
keep their tensors on the CPU on purpose: they carry a few host scalars, so the gloo half
of the group carries them on either machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# The backend of the one process group, by the device type the rank computes on.
GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"


@dataclass(frozen=True)
class DistContext:
    """Where this rank stands: every layer receives this instead of loose arguments."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    pg: dist.ProcessGroup | None

    @property
    def distributed(self) -> bool:
        return self.pg is not None and self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | None = None) -> DistContext:
        """One process, no process group (tests, a single-rank tool)."""
        device = device or torch.device("cpu")
        return cls(0, 1, 0, device, backend_for(device.type), None)


def backend_for(device_type: str) -> str:
    """The process group's backend for ranks that compute on ``device_type``: gloo for the
    CPU half everywhere, NCCL for CUDA tensors where there are any."""
    if device_type == "cuda":
        return GPU_BACKEND
    if device_type == "cpu":
        return CPU_BACKEND
    raise ValueError(f"no process-group backend for device type {device_type!r} (expected 'cpu' or 'cuda')")


def pick_device(local_rank: int) -> torch.device:
    """This rank's GPU where one is visible (and made current), otherwise the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed() -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...) or reuse the open one.

    Without torchrun's variables this is a single process: world size 1, no process group.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    backend = backend_for(device.type)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return DistContext(0, 1, 0, device, backend, None)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, dist.group.WORLD)


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
    device = pick_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend_for(device.type),
        store=dist.PrefixStore(f"/morec/attempt-{restart}", store),
        rank=rank,
        world_size=world,
        device_id=device if device.type == "cuda" else None,
    )


def init_job_distributed() -> DistContext:
    """This rank's context: a restarted group's own rendezvous first, then the open group."""
    join_restarted_group()
    return init_distributed()


def shutdown_distributed(exit_code: int | None = None) -> None:
    """End a worker. torch 2.13's gloo teardown races at interpreter exit (a few percent of
    clean runs abort), so with ``exit_code`` the process leaves through ``os._exit`` after a
    barrier and a flush, skipping that teardown."""
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_code is not None:
        os._exit(exit_code)
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sums a few host scalars over ranks in float64 (exact for counts below 2**53); a CPU
    tensor, so it travels on the group's gloo half on a GPU job too."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if ctx.distributed:
        dist.all_reduce(tensor, group=ctx.pg)
    return tensor.tolist()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """Collective: True on every rank when ``flag`` is True on any rank (a CPU tensor)."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ctx.pg)
    return bool(tensor.item())
