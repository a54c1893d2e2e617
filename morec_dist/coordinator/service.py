"""Ray plumbing and the ``morec coordinator`` commands.

- ``start_local_ray(object_store_mb)``: the embedded default when a job has no Ray address:
  an in-process head with the object store capped, no dashboard, bound to 127.0.0.1 (Ray
  otherwise resolves 127.0.0.1 to the host's public address and binds every interface;
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it use loopback: set here for this process
  and the ones Ray spawns, and applied for the ``ray.init`` call even when Ray was imported
  earlier). Returns the GCS address that torchrun ranks pass to ``connect_ray``. The head
  dies with the process that started it.
- ``connect_ray(address, namespace)``: join an existing cluster (idempotent).
- ``open_coordinator(config.coordinator, spec, run_id, rank, state)``: get or create the named
  actor, configure it for this run (idempotent per run_id), and return a started client.

CLI (wired into ``morec`` by ``add_coordinator_commands``; also ``python -m
morec_dist.coordinator.service coordinator ...``):

    morec coordinator start  --address HOST:PORT [--name N] [--namespace NS] [--config FILE]
    morec coordinator status --address HOST:PORT ...
    morec coordinator set-preferences --address HOST:PORT [--weight NAME=W ...] [--target-loss X] [--at-step T]
                                      [--budget B [--from-step T]]
    morec coordinator stop   --address HOST:PORT ...

``start`` creates the detached actor on an existing cluster (a job with
``coordinator.ray_address`` set finds and configures it); ``set-preferences`` reaches the
live actor and prints each recorded change as a JSON line (without ``--at-step``: the
earliest step that can still change deterministically). ``--budget`` is a new accuracy
budget of the budget law (``morec.pid.law = "budget"``) for the held-out measurements after
steps >= ``--from-step`` (default: the earliest such step), recorded in the core's
versioned budget history like a preference change; a job on the paper's law refuses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from morec_dist.config import CoordinatorConfig
from morec_dist.coordinator.actor import get_existing, get_or_create
from morec_dist.coordinator.client import CoordinatorClient, Recovery
from morec_dist.coordinator.core import CoordinatorError, CoordinatorSpec

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
MIN_OBJECT_STORE_MB = 80  # Ray refuses smaller stores
PROBE_TIMEOUT_S = 5.0  # an unreachable address fails here, not after Ray's long retries


def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connect to the GCS at ``host:port``; a clear CoordinatorError if nothing answers."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CoordinatorError(f"coordinator.ray_address {address!r}: expected HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise CoordinatorError(
            f"coordinator.ray_address {address}: no Ray head reachable there ({exc.strerror or exc}) within "
            f"{timeout_s:.0f} s"
        ) from None


def start_local_ray(object_store_mb: int, *, num_cpus: int | None = None, namespace: str | None = None) -> str:
    """Start an in-process Ray head on loopback; return its GCS address."""
    if object_store_mb < MIN_OBJECT_STORE_MB:
        raise CoordinatorError(
            f"coordinator.object_store_mb: Ray needs at least {MIN_OBJECT_STORE_MB}, got {object_store_mb}"
        )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault(LOOPBACK_ENV, "0")  # read by Ray at import, here and in the processes it spawns
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    with _loopback_node_ip():
        ray.init(
            address="local",  # always a new head: never attach to another `ray start` on this host
            num_cpus=num_cpus,
            object_store_memory=object_store_mb * 2**20,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            namespace=namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    address = ray.get_runtime_context().gcs_address
    if not address.startswith(LOOPBACK):
        logging.getLogger(__name__).warning("local Ray listens on %s, not on loopback", address)
    return address


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Make Ray resolve this node to 127.0.0.1 even when it was imported before LOOPBACK_ENV was set.

    Ray reads the variable into ``ray_constants.ENABLE_RAY_CLUSTER`` once, at import; when
    another module imported Ray first, the head would advertise (and bind) the public
    address. Pinned to ray 2.60; the constant is restored on exit.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def connect_ray(address: str, namespace: str | None = None) -> None:
    """Join the cluster at ``address`` (no-op if this process already joined one)."""
    if not address:
        raise CoordinatorError("connect_ray: a Ray address (host:port) is required")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loopback = address.split(":")[0] in (LOOPBACK, "localhost")
    if loopback:
        os.environ.setdefault(LOOPBACK_ENV, "0")  # this node is the loopback node too
    import ray

    if ray.is_initialized():
        return
    probe_address(address)
    # Without this Ray rewrites 127.0.0.1 to the public address and misses a loopback head.
    with _loopback_node_ip() if loopback else contextlib.nullcontext():
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)


def open_coordinator(
    coordinator: CoordinatorConfig,
    spec: CoordinatorSpec,
    *,
    run_id: str,
    rank: int,
    state: Mapping[str, Any] | None = None,
    first_step: int = 0,
) -> CoordinatorClient:
    """Get/create and configure the named actor for this run; a started client for ``rank``.

    Ray must be initialised in this process (``connect_ray``). Every rank may call this
    with the same spec / state / run_id: the first configures, the rest find it configured.
    Failure: the client can restore a lost actor (``client.Recovery``): from ``state`` at
    ``first_step`` until the job marks its first checkpoint, then from that checkpoint.
    """
    import ray

    def reopen() -> Any:
        return get_or_create(coordinator.name, coordinator.namespace, detached=coordinator.detached)

    actor = reopen()
    ray.get(actor.configure.remote(spec, state, run_id))
    recovery = Recovery(reopen=reopen, spec=spec, run_id=run_id, state=state, step=first_step)
    client = CoordinatorClient(actor, rank=rank, staleness=spec.staleness, recovery=recovery)
    client.start(first_step)
    return client


# ------------------------------------------------------------------------- CLI


def _parse_weight(text: str) -> tuple[str, float]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--weight {text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weight {text!r}: {value!r} is not a number") from None


def _coordinator_section(args: argparse.Namespace) -> Any:
    from morec_dist.config import load_config

    section = load_config(args.config).coordinator
    if args.address:
        section.ray_address = args.address
    if args.name:
        section.name = args.name
    if args.namespace:
        section.namespace = args.namespace
    if not section.ray_address:
        raise CoordinatorError("morec coordinator: give --address HOST:PORT (or coordinator.ray_address in --config)")
    return section


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default="", help="Ray cluster address host:port (default: coordinator.ray_address)"
    )
    parser.add_argument("--name", default="", help="actor name (default: coordinator.name)")
    parser.add_argument("--namespace", default="", help="Ray namespace (default: coordinator.namespace)")
    parser.add_argument("--config", default=None, help="job config TOML (for the coordinator section)")


def _cmd_start(args: argparse.Namespace) -> int:
    import ray

    section = _coordinator_section(args)
    connect_ray(section.ray_address, section.namespace)
    actor = get_or_create(section.name, section.namespace, detached=True)
    status = ray.get(actor.status.remote())
    print(
        json.dumps(
            {"actor": section.name, "namespace": section.namespace, "address": section.ray_address, **status},
            default=str,
        )
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import ray

    section = _coordinator_section(args)
    connect_ray(section.ray_address, section.namespace)
    actor = get_existing(section.name, section.namespace)
    print(json.dumps(ray.get(actor.status.remote()), default=str))
    return 0


def _check_preference_args(args: argparse.Namespace) -> None:
    """What was asked for is a change, and each step flag goes with its change."""
    preferences = bool(args.weight) or args.target_loss is not None
    if not preferences and args.budget is None:
        raise CoordinatorError("set-preferences: give --weight NAME=VALUE (repeatable), --target-loss and/or --budget")
    if args.at_step is not None and not preferences:
        raise CoordinatorError("set-preferences: --at-step is the step of a --weight / --target-loss change")
    if args.from_step is not None and args.budget is None:
        raise CoordinatorError("set-preferences: --from-step is the step of a --budget change")


def _actor_call(call: Any) -> dict[str, Any]:
    """``ray.get`` of a control call; the core's refusal becomes one CoordinatorError line."""
    import ray

    try:
        return ray.get(call)
    except ray.exceptions.RayTaskError as exc:
        raise CoordinatorError(str(exc.cause) if getattr(exc, "cause", None) else str(exc)) from None


def _cmd_set_preferences(args: argparse.Namespace) -> int:
    _check_preference_args(args)
    section = _coordinator_section(args)
    connect_ray(section.ray_address, section.namespace)
    actor = get_existing(section.name, section.namespace)
    source = f"cli pid={os.getpid()}"
    if args.weight or args.target_loss is not None:
        weights = dict(args.weight) if args.weight else None
        print(json.dumps(_actor_call(actor.set_preferences.remote(weights, args.target_loss, args.at_step, source))))
    if args.budget is not None:
        print(json.dumps(_actor_call(actor.set_budget.remote(args.budget, args.from_step, source))))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    import ray

    section = _coordinator_section(args)
    connect_ray(section.ray_address, section.namespace)
    ray.kill(get_existing(section.name, section.namespace), no_restart=True)
    print(json.dumps({"stopped": section.name, "namespace": section.namespace}))
    return 0


def _reporting_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures (no such actor, a refused change) exit 2 with one line, no traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CoordinatorError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def add_coordinator_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``coordinator {start,status,set-preferences,stop}`` to a ``morec`` parser."""
    coordinator = subparsers.add_parser("coordinator", help="the MoRec coordinator actor on a Ray cluster")
    which = coordinator.add_subparsers(dest="coordinator_command", required=True, metavar="COMMAND")
    start = which.add_parser("start", help="start the named, detached coordinator actor on an existing Ray cluster")
    _common(start)
    start.set_defaults(func=_reporting_errors(_cmd_start))
    status = which.add_parser("status", help="print the live coordinator's status")
    _common(status)
    status.set_defaults(func=_reporting_errors(_cmd_status))
    prefs = which.add_parser(
        "set-preferences", help="change w, l_hat and/or the accuracy budget of a running job from a stated step"
    )
    _common(prefs)
    prefs.add_argument(
        "--weight",
        action="append",
        type=_parse_weight,
        default=[],
        metavar="NAME=W",
        help="new weight of an objective (repeatable)",
    )
    prefs.add_argument("--target-loss", type=float, default=None, help="new accuracy target l_hat")
    prefs.add_argument(
        "--at-step", type=int, default=None, help="first step the change applies to (default: the earliest possible)"
    )
    prefs.add_argument(
        "--budget",
        type=float,
        default=None,
        help="new accuracy budget (relative, e.g. 0.03: held-out Hit@K at most 3%% below the pretrained model's); "
        'morec.pid.law = "budget" only',
    )
    prefs.add_argument(
        "--from-step",
        type=int,
        default=None,
        help="first step whose held-out measurement uses the new --budget (default: the earliest possible)",
    )
    prefs.set_defaults(func=_reporting_errors(_cmd_set_preferences))
    stop = which.add_parser("stop", help="kill the coordinator actor")
    _common(stop)
    stop.set_defaults(func=_reporting_errors(_cmd_stop))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="morec")
    add_coordinator_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] if len(sys.argv) > 1 else None))
