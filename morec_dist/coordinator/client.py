"""The rank side of the coordinator: fire-and-forget reports, bounded-staleness decisions.

``RankClient`` is the one protocol of a rank's coordinator client (this module's per-rank
``CoordinatorClient`` and the global protocol's ``collective.GlobalCoordinatorClient``).

Per step t a rank calls ``report(t, sums, counts)`` (non-blocking: one ``.remote()`` whose
reply is ``decision(t + s)``) and ``decision_for_step(t)``. The decision for t was requested
s steps earlier, so it is normally already local and costs nothing; the rank blocks only
when the coordinator has not produced it yet (another rank is behind, or s = 0). Each such
wait is logged, counted and timed (``stats()``).

Determinism: the decision of step t is a pure function of the reports of steps <= t - s
(and the signals / preference history), never of when replies arrive: waiting changes
wall time only, not beta.

The ObjectRefs held are bounded (at most ``max_in_flight`` unconsumed replies; beyond that
the oldest is resolved, which also surfaces its error). Errors raised by the actor (a bad
report, an unconfigured coordinator) surface at the latest when that reply is consumed and
at the end in ``flush()``.

Coordinator failure: a client opened with a ``Recovery`` keeps the reports (and, on the
submitting rank, the signals) it made since the last checkpoint (``mark_checkpoint``;
bounded by ``max_log``). When a call finds the actor dead or restarted-and-unconfigured,
the client gets the actor again (Ray restarts it; a dead one is re-created by name),
configures it with the checkpoint's coordinator state (idempotent per restore, so the
first rank to notice does it) and replays its own log; the restored core is then exactly
the one that was lost, and every decision the same. Until a rank needs a decision it
does not hold, it keeps training (the staleness bound); then it waits, with a log line.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from morec_dist.coordinator.core import CoordinatorError, Decision

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Waits logged one per line up to this many, then every LOG_EVERY-th (s = 0 waits every step).
LOG_FIRST_WAITS = 20
LOG_EVERY = 100
RECOVERY_POLL_S = 0.5


@runtime_checkable
class RankClient(Protocol):
    """What a rank holds to talk to the coordinator, whatever the protocol: the per-rank
    ``CoordinatorClient`` (every rank calls the actor) and ``collective.GlobalCoordinatorClient``
    (rank 0 calls it with the reduced sums). The trainer's strategies, the fine-tuning job
    and its checkpoints see only this."""

    rank: int
    staleness: int
    waits: int  # decisions this rank had to wait for (``timed_wait``)

    def start(self, first_step: int = 0) -> None:
        """The decisions of the first s steps (no report of this run precedes them)."""
        ...

    def report(self, step: int, loss_sums: Sequence[float], row_counts: Sequence[int]) -> None:
        """Step ``step``'s per-block loss sums and row counts; returns at once."""
        ...

    def decision_for_step(self, step: int) -> Decision:
        """beta, w and p_k for ``step``, from the reports of steps <= step - s."""
        ...

    def submit_signals(self, step: int, signals: Mapping[str, Sequence[float]]) -> int:
        """The reduced validation signals measured after ``step``; the new p version."""
        ...

    def submit_measurement(self, step: int, hit: float) -> dict[str, Any]:
        """The budget law's held-out Hit@K measured after ``step`` (before any signals of
        that step); what the controller did (``coordinator/budget.py`` ``BudgetStep``)."""
        ...

    def flush(self) -> None:
        """Every report made so far is recorded by the coordinator (raises a refused one)."""
        ...

    def close(self) -> None:
        """End of training: nothing of this client is left pending."""
        ...

    @property
    def holds_state(self) -> bool:
        """Whether this rank reads the coordinator's state (checkpoints, the final record)."""
        ...

    def mark_checkpoint(self, state: Mapping[str, Any] | None, step: int) -> None:
        """``state`` (every step < ``step``; None on a rank that holds no state) is the new
        base of a recovery."""
        ...

    def resync(self) -> None:
        """Replay this rank's reports since the last checkpoint into the actor."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def trace(self) -> dict[str, list]: ...

    def history(self) -> list[dict[str, Any]]: ...

    def stats(self) -> dict[str, float | str]: ...


@dataclass
class Recovery:
    """How to bring a lost coordinator back: get the actor by name, configure it with
    ``state`` (the checkpoint's, or None for a fresh start at ``first_step`` 0)."""

    reopen: Callable[[], Any]  # () -> actor handle (existing, restarted or new)
    spec: Any
    run_id: str
    state: Mapping[str, Any] | None = None
    step: int = 0


def _lost(exc: BaseException) -> bool:
    """Whether a Ray error means the actor died or came back unconfigured."""
    import ray

    from morec_dist.coordinator.actor import CoordinatorNotConfigured

    if isinstance(exc, ray.exceptions.RayActorError):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(exc, CoordinatorNotConfigured) or isinstance(cause, CoordinatorNotConfigured)


def timed_wait(client: Any, step: int, wait: Callable[[], T]) -> T:
    """``wait()`` for the decision of ``step``, counted and timed in the client's ``waits``,
    ``wait_seconds`` and ``max_wait_seconds`` (both protocols' clients); the first waits and
    then every LOG_EVERY-th are logged."""
    client.waits += 1
    if client.waits <= LOG_FIRST_WAITS or client.waits % LOG_EVERY == 0:
        logger.info(
            "rank %d: waiting on the coordinator for the decision of step %d (staleness %d; wait #%d, %.3f s waited "
            "so far)",
            client.rank,
            step,
            client.staleness,
            client.waits,
            client.wait_seconds,
        )
    started = time.perf_counter()
    result = wait()
    waited = time.perf_counter() - started
    client.wait_seconds += waited
    client.max_wait_seconds = max(client.max_wait_seconds, waited)
    return result


class CoordinatorClient:
    def __init__(
        self,
        actor: Any,
        *,
        rank: int,
        staleness: int,
        max_in_flight: int = 64,
        wait_timeout_s: float = 600.0,
        recovery: Recovery | None = None,
        max_log: int = 100_000,
    ) -> None:
        if max_in_flight < staleness + 1:
            raise CoordinatorError(f"max_in_flight ({max_in_flight}) must be at least staleness + 1 ({staleness + 1})")
        self.actor = actor
        self.rank = rank
        self.staleness = staleness
        self.max_in_flight = max_in_flight
        self.wait_timeout_s = wait_timeout_s
        self._replies: OrderedDict[int, Any] = OrderedDict()  # step -> ObjectRef of decision(step)
        self._local: OrderedDict[int, Decision] = OrderedDict()
        self.waits = 0
        self.wait_seconds = 0.0
        self.max_wait_seconds = 0.0
        self.decisions_served = 0
        self.reports = 0
        self.recovery = recovery
        self.max_log = max_log
        self.recoveries = 0
        self._log: list[tuple[int, list[float], list[int]]] = []  # reports since the last checkpoint
        self._signals_log: list[tuple[int, dict[str, list[float]]]] = []
        self._measurements_log: list[tuple[int, float]] = []

    # ------------------------------------------------------------ failures
    def mark_checkpoint(self, state: Mapping[str, Any] | None, step: int) -> None:
        """A checkpoint of the coordinator (``state``, holding every step < ``step``) was
        taken after this rank's flush: it is the new base of a recovery."""
        if state is None:  # every rank of this protocol reads the state (``holds_state``)
            raise CoordinatorError(f"rank {self.rank}: mark_checkpoint of step {step} without the coordinator state")
        if self.recovery is not None:
            self.recovery.state, self.recovery.step = state, int(step)
        self._log.clear()
        self._signals_log.clear()
        self._measurements_log.clear()

    def resync(self) -> None:
        """Replay this rank's reports since the last checkpoint into the actor (a no-op for
        the ones it holds): for a coordinator another rank restored without them."""
        self._recover(None)

    def _recover(self, why: BaseException | None) -> None:
        """Bring the actor back to the state it had: checkpoint state + this rank's log."""
        import ray

        if self.recovery is None:
            raise CoordinatorError(
                f"rank {self.rank}: the coordinator actor is gone ({type(why).__name__}) and this client cannot "
                "restore it"
            ) from None
        reason = "resync requested" if why is None else f"the coordinator actor is gone ({type(why).__name__})"
        if len(self._log) > self.max_log:
            raise CoordinatorError(
                f"rank {self.rank}: coordinator lost, but {len(self._log)} reports since the last checkpoint exceed "
                f"max_log {self.max_log}"
            )
        r = self.recovery
        logger.warning(
            "rank %d: %s; restoring it from the checkpoint of step %d and replaying %d reports",
            self.rank,
            reason,
            r.step,
            len(self._log),
        )
        deadline = time.monotonic() + self.wait_timeout_s
        run_id = f"{r.run_id}:restored@{r.step}"
        while True:
            try:
                self.actor = r.reopen()
                ray.get(self.actor.configure.remote(r.spec, r.state, run_id), timeout=self.wait_timeout_s)
                ray.get(
                    self.actor.replay.remote(
                        self.rank, list(self._log), list(self._signals_log), list(self._measurements_log)
                    ),
                    timeout=self.wait_timeout_s,
                )
                break
            except Exception as exc:  # broad on purpose: the actor may still be restarting
                if not (_lost(exc) or isinstance(exc, ray.exceptions.GetTimeoutError)) or time.monotonic() > deadline:
                    raise CoordinatorError(f"rank {self.rank}: could not restore the coordinator: {exc}") from None
                time.sleep(RECOVERY_POLL_S)
        self._replies.clear()  # their replies died with the actor; decisions are asked anew
        self.recoveries += 1
        logger.warning("rank %d: coordinator restored (recovery #%d); continuing", self.rank, self.recoveries)

    def _call(self, method: str, *args: Any) -> Any:
        """``ray.get(actor.method(*args))``, restoring a lost actor and retrying."""
        import ray

        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args), timeout=self.wait_timeout_s)
            except Exception as exc:  # any error: _lost() tells a lost actor from a real one
                if not _lost(exc):
                    raise
                self._recover(exc)

    # ------------------------------------------------------------------ set-up
    def start(self, first_step: int = 0) -> None:
        """Fetch the decisions of the first s steps (no report of this run precedes them)."""
        if self.staleness == 0:
            return
        decisions = self._call("decisions", first_step, first_step + self.staleness)
        for d in decisions:
            self._keep_local(d)

    # ---------------------------------------------------------------- hot path
    def report(self, step: int, loss_sums: Sequence[float], row_counts: Sequence[int]) -> None:
        """Send step ``step``'s per-block loss sums and row counts; returns at once."""
        sums, counts = [float(x) for x in loss_sums], [int(c) for c in row_counts]
        if self.recovery is not None:
            self._log.append((int(step), sums, counts))
        ref = self.actor.report.remote(self.rank, int(step), sums, counts)
        self._replies[int(step) + self.staleness] = ref
        self.reports += 1
        while len(self._replies) > self.max_in_flight:
            oldest_step, oldest = self._replies.popitem(last=False)
            self._keep_local(self._resolve(oldest_step, oldest))

    def decision_for_step(self, step: int) -> Decision:
        """beta, w and p_k for step ``step``, from steps <= step - s; waits only if not produced yet."""
        import ray

        self.decisions_served += 1
        if step in self._local:
            return self._local.pop(step)
        ref = self._replies.pop(step, None)
        if ref is None:  # not requested by an earlier report (a gap, or s changed): ask now
            ref = self.actor.decision.remote(step)
        ready, _ = ray.wait([ref], timeout=0)
        if ready:
            return self._resolve(step, ref)
        return self._wait(step, ref)

    def _wait(self, step: int, ref: Any) -> Decision:
        return timed_wait(self, step, lambda: self._resolve(step, ref))

    def _resolve(self, step: int, ref: Any) -> Decision:
        import ray

        try:
            return ray.get(ref, timeout=self.wait_timeout_s)
        except ray.exceptions.GetTimeoutError:
            status = ray.get(self.actor.status.remote(), timeout=30)
            raise CoordinatorError(
                f"rank {self.rank}: no decision for step {step} after {self.wait_timeout_s:.0f} s; coordinator "
                f"status: {status}"
            ) from None
        except Exception as exc:  # any error: _lost() tells a lost actor from a real one
            if not _lost(exc):
                raise
            logger.warning(
                "rank %d: waiting for the coordinator to come back for the decision of step %d", self.rank, step
            )
            self._recover(exc)
            return self._call("decision", step)

    def _keep_local(self, decision: Decision) -> None:
        self._local[decision.step] = decision
        while len(self._local) > self.max_in_flight:
            self._local.popitem(last=False)

    def flush(self) -> None:
        """End of training (or before a checkpoint): every report of this rank reached the
        coordinator; raises the first actor error.

        Replies still waiting for a decision past the end of the run (e.g. one that needs a
        sampler update nobody will submit) are dropped, not awaited.
        """
        while True:
            try:
                return self._flush_once()
            except Exception as exc:  # any error: _lost() tells a lost actor from a real one
                if not _lost(exc):
                    raise
                self._recover(exc)

    def _flush_once(self) -> None:
        import ray

        steps = [t - self.staleness for t in self._replies]
        pending = {ref: t for t, ref in self._replies.items()}
        confirm = self.actor.wait_recorded.remote(self.rank, steps)
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CoordinatorError(
                    f"rank {self.rank}: reports of steps {steps} not recorded after {self.wait_timeout_s:.0f} s"
                )
            ready, _ = ray.wait([confirm, *pending], num_returns=1, timeout=left)
            if not ready:
                continue
            ref = ready[0]
            if ref is confirm:
                ray.get(confirm)
                break
            self._keep_local(ray.get(ref))  # raises the actor's error for a refused report
            self._replies.pop(pending.pop(ref), None)
        self._replies.clear()

    @property
    def holds_state(self) -> bool:
        """Every rank of the per-rank protocol reads (and checks) the coordinator's state."""
        return True

    def close(self) -> None:
        """End of training: the same as ``flush`` (nothing else is pending in this protocol)."""
        self.flush()

    # ------------------------------------------------------------ rare calls
    def submit_measurement(self, step: int, hit: float) -> dict[str, Any]:
        """Submit the budget law's held-out Hit@K measured after ``step``; what the controller did."""
        if self.recovery is not None:
            self._measurements_log.append((int(step), float(hit)))
        return dict(self._call("submit_measurement", int(step), float(hit)))

    def submit_signals(self, step: int, signals: Mapping[str, Sequence[float]]) -> int:
        """Submit the reduced validation signals measured after ``step``; returns the new p version."""
        payload = {k: [float(x) for x in v] for k, v in signals.items()}
        if self.recovery is not None:
            self._signals_log.append((int(step), payload))
        return int(self._call("submit_signals", step, payload))

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def trace(self) -> dict[str, list]:
        return self._call("trace")

    def history(self) -> list[dict[str, Any]]:
        return self._call("history")

    def stats(self) -> dict[str, float | str]:
        return {
            "rank": self.rank,
            "protocol": "per_rank",
            "reports": self.reports,
            "decisions": self.decisions_served,
            "waits": self.waits,
            "wait_seconds": self.wait_seconds,
            "max_wait_seconds": self.max_wait_seconds,
            "recoveries": self.recoveries,
        }
