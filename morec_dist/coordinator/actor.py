"""The Ray actor that owns the job's one ``CoordinatorCore``.

An asyncio actor: every method runs on the actor's single event loop, so the core is never
touched concurrently, and ``report`` / ``decision`` can *wait* for a decision without
blocking other callers: they await a condition that is notified after every state change.
``report(rank, t, ...)`` records the step and returns ``decision(t + staleness)`` once it
exists, so a rank gets the decision it will need s steps later from the call it already
makes, and never pays a separate round trip.

The actor is named, lives in a namespace, takes no CPU slot, and is detached where asked
(it then outlives the job, e.g. one started by ``morec coordinator start``). It starts
unconfigured; ``configure(spec, state, run_id)`` installs a fresh core (or one restored
from a checkpoint) and is idempotent per ``run_id``, so every rank may call it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from morec_dist.coordinator.core import CoordinatorCore, CoordinatorError, CoordinatorSpec, Decision

ACTOR_MAX_RESTARTS = 5
# slots of the default (step) group: per-rank reports of the per_rank baseline wait in them
ACTOR_MAX_CONCURRENCY = 1000
CONTROL_GROUP = "control"
CONTROL_CONCURRENCY = 8


def _control(method):
    """Run ``method`` in the actor's ``control`` concurrency group (what ``@ray.method(
    concurrency_group=...)`` sets, without importing Ray here: pinned ray 2.60 attribute)."""
    method.__ray_concurrency_group__ = CONTROL_GROUP
    return method


class CoordinatorNotConfigured(CoordinatorError):
    """The actor holds no core: not configured yet, or restarted after a crash."""


class CoordinatorActor:
    def __init__(self) -> None:
        self.core: CoordinatorCore | None = None
        self.run_id: str | None = None
        self._changed: asyncio.Condition | None = None
        self._metrics: Any = None  # CoordinatorMetrics when the job enabled metrics
        self._exporter: Any = None
        self._published_through = -1
        self._lock = threading.Lock()  # the core is shared by the step loop and the control loop

    def _start_metrics(self, spec: CoordinatorSpec) -> None:
        """Export the global view on the job's coordinator port (once per actor process)."""
        if spec.metrics_endpoint is None or self._exporter is not None:
            return
        from prometheus_client import CollectorRegistry

        from morec_dist.observe.metrics import CoordinatorMetrics, start_coordinator_exporter

        host, base_port = spec.metrics_endpoint
        registry = CollectorRegistry()
        self._metrics = CoordinatorMetrics(registry)
        self._exporter = start_coordinator_exporter(registry, host, base_port)

    def _publish(self) -> None:
        core = self.core
        if self._metrics is None or core is None or not core.trace:
            return
        if core.budget is not None:
            self._publish_control(core)
        if core.last_pid is None:
            return
        record = core.trace[-1]
        if record.step <= self._published_through:
            return
        pid = core.last_pid
        version = len(core.versions) - 1
        self._metrics.publish(
            step=record.step,
            beta=record.beta,
            pid_terms={"p": pid.p, "i": pid.i, "d": pid.d, "error": pid.error},
            # a block with no rows in a step has no loss (NaN): not published for that step
            global_losses={name: loss for name, loss in zip(core.names, record.losses, strict=True) if loss == loss},
            probabilities=core.versions[version][1],
            version=version,
            target_loss=record.target_loss,
        )
        self._published_through = record.step

    def _publish_control(self, core: CoordinatorCore) -> None:
        """The budget law's view: beta in force at the newest aggregated step, the set point,
        the held-out accuracy (measured and smoothed), the share and the safety rule."""
        record = core.trace[-1]
        control = core.last_control
        if record.step <= self._published_through or record.beta != record.beta:  # NaN: not decided yet
            return
        version = len(core.versions) - 1
        budget = core.budget
        assert budget is not None
        self._metrics.publish(
            step=record.step,
            beta=record.beta,
            pid_terms={"p": 0.0, "i": 0.0, "d": 0.0, "error": 0.0},
            global_losses={name: loss for name, loss in zip(core.names, record.losses, strict=True) if loss == loss},
            probabilities=core.versions[version][1],
            version=version,
            target_loss=record.target_loss,
        )
        self._metrics.publish_control(
            setpoint=budget.setpoint,
            measured=control.measured if control is not None else budget.reference,
            smoothed=budget.smoothed,
            share=budget.share,
            safety=budget.safety,
        )
        self._published_through = record.step

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created inside the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    def _need_core(self) -> CoordinatorCore:
        if self.core is None:
            raise CoordinatorNotConfigured(
                "the coordinator is not configured yet (the job calls configure(spec) first, or the actor was "
                "restarted)"
            )
        return self.core

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    async def _wait_ready(self, step: int) -> Decision:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self._ready(step))
        with self._lock:
            return self._need_core().decision(step)

    def _ready(self, step: int) -> bool:
        with self._lock:
            return self.core is not None and self.core.ready(step)

    # ------------------------------------------------------------------ set-up
    async def configure(
        self, spec: CoordinatorSpec, state: Mapping[str, Any] | None = None, run_id: str = ""
    ) -> dict[str, Any]:
        if self.core is not None and run_id and run_id == self.run_id:
            return self.core.status()
        core = CoordinatorCore(spec)
        if state is not None:
            core.load_state_dict(state)
        with self._lock:
            self.core, self.run_id = core, run_id
        self._start_metrics(spec)
        self._published_through = -1
        await self._notify()
        return core.status()

    async def replay(
        self,
        rank: int,
        reports: Sequence[Sequence[Any]],
        signals: Sequence[Sequence[Any]] = (),
        measurements: Sequence[Sequence[Any]] = (),
    ) -> int:
        """Re-apply ``rank``'s reports ``[(step, sums, counts), ...]``, submitted held-out
        measurements ``[(step, hit), ...]`` and signals ``[(step, {objective: signal}), ...]``
        made since the state ``configure`` restored (measurements first: a sampler update
        reads the safety rule of the newest measurement before it); reports the core already
        holds are skipped. Returns how many reports were applied."""
        core = self._need_core()
        applied = 0
        with self._lock:
            for step, hit in measurements:
                core.submit_measurement(int(step), hit)
            for step, payload in signals:
                core.submit_signals(int(step), payload)
            for step, sums, counts in reports:
                if not core.has_report(rank, int(step)):
                    core.report(rank, int(step), sums, counts)
                    applied += 1
        await self._notify()
        return applied

    @_control
    async def configured(self) -> str | None:
        return self.run_id if self.core is not None else None

    # ------------------------------------------------------------ the hot path
    async def report(self, rank: int, step: int, loss_sums: Sequence[float], row_counts: Sequence[int]) -> Decision:
        core = self._need_core()
        with self._lock:
            core.report(rank, step, loss_sums, row_counts)
            self._publish()
        await self._notify()
        return await self._wait_ready(step + core.spec.staleness)

    async def decision(self, step: int) -> Decision:
        self._need_core()
        return await self._wait_ready(step)

    async def wait_recorded(self, rank: int, steps: Sequence[int]) -> None:
        """Return once the core holds ``rank``'s reports of ``steps`` (aggregated or pending)."""
        core = self._need_core()
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self._recorded(core, rank, steps))

    def _recorded(self, core: CoordinatorCore, rank: int, steps: Sequence[int]) -> bool:
        with self._lock:
            return all(core.has_report(rank, t) for t in steps)

    async def decisions(self, first: int, stop: int) -> list[Decision]:
        return [await self.decision(t) for t in range(first, stop)]

    # ------------------------------------------------------- sampler, preferences
    async def submit_signals(self, step: int, signals: Mapping[str, Sequence[float]]) -> int:
        with self._lock:
            version = self._need_core().submit_signals(step, signals)
        await self._notify()
        return version

    async def submit_measurement(self, step: int, hit: float) -> dict[str, Any]:
        """The budget law's held-out Hit@K after ``step`` (``CoordinatorCore.submit_measurement``)."""
        with self._lock:
            record = self._need_core().submit_measurement(step, hit)
            self._publish()
        await self._notify()
        return record

    @_control
    async def set_budget(self, budget: float, effective_step: int | None = None, source: str = "") -> dict[str, Any]:
        """A new accuracy budget from a stated step (``CoordinatorCore.set_budget``); like a
        preference change it never makes a decision ready or unready."""
        with self._lock:
            change = self._need_core().set_budget(budget, effective_step, source)
        return asdict(change)

    @_control
    async def budget_history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(c) for c in self._need_core().budget_history]

    @_control
    async def set_preferences(
        self,
        weights: Mapping[str, float] | None = None,
        target_loss: float | None = None,
        effective_step: int | None = None,
        source: str = "",
    ) -> dict[str, Any]:
        # never makes a decision ready or unready (only steps not decided yet can change)
        with self._lock:
            change = self._need_core().set_preferences(weights, target_loss, effective_step, source)
        return asdict(change)

    # ---------------------------------------------------------------- inspection
    @_control
    async def status(self) -> dict[str, Any]:
        with self._lock:
            if self.core is None:
                return {"configured": False}
            return {"configured": True, "run_id": self.run_id, **self.core.status()}

    @_control
    async def trace(self) -> dict[str, list]:
        with self._lock:
            return self._need_core().trace_dict()

    @_control
    async def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(c) for c in self._need_core().history]

    @_control
    async def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._need_core().state_dict()

    async def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._need_core().load_state_dict(state)
        await self._notify()


# Ray gives this resource (amount 1) to the head node only.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def get_or_create(name: str, namespace: str, *, detached: bool = False, max_restarts: int = ACTOR_MAX_RESTARTS) -> Any:
    """The named coordinator actor in ``namespace``: the existing one, or a new one.

    Needs ``ray.init`` done in this process. Races between ranks are safe
    (``get_if_exists``): exactly one actor exists per (namespace, name).
    """
    import ray

    if not ray.is_initialized():
        raise CoordinatorError("get_or_create: Ray is not initialised in this process (call service.connect_ray first)")
    options: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "num_cpus": 0,
        "max_concurrency": ACTOR_MAX_CONCURRENCY,
        "max_restarts": max_restarts,  # a restarted actor is restored by the clients (see client.py)
        # On the head node, whatever node asks first: there it outlives any trainer pod that is
        # stopped or replaced, and its metrics endpoint stays where the PodMonitor looks for it.
        "resources": {HEAD_NODE_RESOURCE: 0.001},
    }
    if detached:
        options["lifetime"] = "detached"
    # concurrency groups are a class option (Ray refuses them in .options())
    remote_class = ray.remote(concurrency_groups={CONTROL_GROUP: CONTROL_CONCURRENCY})(CoordinatorActor)
    return remote_class.options(**options).remote()


def get_existing(name: str, namespace: str) -> Any:
    """The named actor, or a clear error if no such actor runs on this cluster."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise CoordinatorError(
            f"no coordinator actor named {name!r} in namespace {namespace!r} on this Ray cluster"
        ) from None
