"""Where a job's sockets listen: loopback on one host, the address the user names on many.

torch 2.13's ``TCPStore`` server listens on every interface whatever host it is given (the
host is only what clients dial), and torchrun's agent hosts two of them, neither with
authentication: the c10d rendezvous store and the workers' store (``MASTER_ADDR`` /
``MASTER_PORT``). ``python -m morec_dist.train.bind --bind ADDR <torchrun args>`` runs
``torch.distributed.run`` with both listening on ADDR only: it binds each server's socket
itself and hands it to ``TCPStore`` as ``master_listen_fd``.

The other listeners of a job follow the same choice elsewhere: gloo's (and NCCL's
bootstrap) sockets listen on the interface of ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``
(``single_host_env`` names ``lo``), the embedded Ray head on 127.0.0.1
(``coordinator/service.py``), the exporters on ``metrics.host``.
"""

from __future__ import annotations

import importlib
import ipaddress
import socket
import sys
from typing import Any

LOOPBACK = "127.0.0.1"
# the TCPStore constructor's positional parameters, in order (torch 2.13)
_STORE_PARAMS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant")


def single_host_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the collectives' sockets on loopback, unless the user named an interface."""
    env = dict(env)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def listening_socket(address: str, port: int) -> socket.socket:
    """A listening TCP socket on ``address:port`` (0 = a free port)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    return socket.create_server((address, port), family=family, backlog=4096)


def bound_store_class(address: str) -> type:
    """A ``TCPStore`` whose server (``is_master``) listens on ``address`` only."""
    import torch.distributed as dist  # here: the launcher imports this module without torch

    base: Any = dist.TCPStore

    class BoundTCPStore(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(zip(_STORE_PARAMS, args, strict=False))  # fewer args than params
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                server = listening_socket(address, int(kwargs["port"]))
                kwargs["port"] = server.getsockname()[1]
                kwargs["master_listen_fd"] = server.detach()  # the store owns (and closes) it now
            super().__init__(**kwargs)

    return BoundTCPStore


def bind_stores(address: str) -> None:
    """Make every TCPStore server torchrun's agent creates in this process listen on ``address``."""
    ipaddress.ip_address(address)  # a literal address: a name could resolve to several
    import torch.distributed as dist

    # the rendezvous backends take the class at import; import them before replacing it
    for backend in ("elastic.rendezvous.c10d_rendezvous_backend", "elastic.rendezvous.static_tcp_rendezvous"):
        importlib.import_module(f"torch.distributed.{backend}")

    original = dist.TCPStore
    bound = bound_store_class(address)
    for name, module in list(sys.modules.items()):
        if name.startswith("torch.distributed") and getattr(module, "TCPStore", None) is original:
            module.TCPStore = bound  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--bind":
        print("usage: python -m morec_dist.train.bind --bind ADDRESS <torchrun args>", file=sys.stderr)
        return 2
    try:
        bind_stores(argv[1])
    except ValueError:
        print(f"--bind: expected an IP address (e.g. 127.0.0.1), got {argv[1]!r}", file=sys.stderr)
        return 2
    from torch.distributed.run import main as torchrun

    torchrun(argv[2:])
    return 0


if __name__ == "__main__":
    from morec_dist.fast_exit import exit_without_final_gc

    exit_without_final_gc(main(sys.argv[1:]))
