"""The rank side of the coordinator: fire-and-forget reports, bounded-staleness decisions.

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
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from morec_dist.coordinator.core import CoordinatorError, Decision

logger = logging.getLogger(__name__)

# Waits logged one per line up to this many, then every LOG_EVERY-th (s = 0 waits every step).
LOG_FIRST_WAITS = 20
LOG_EVERY = 100


class CoordinatorClient:
    def __init__(
        self,
        actor: Any,
        *,
        rank: int,
        staleness: int,
        max_in_flight: int = 64,
        wait_timeout_s: float = 600.0,
    ) -> None:
        if staleness < 0:
            raise CoordinatorError(f"staleness: expected >= 0, got {staleness}")
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

    # ------------------------------------------------------------------ set-up
    def start(self, first_step: int = 0) -> None:
        """Fetch the decisions of the first s steps (no report of this run precedes them)."""
        import ray

        if self.staleness == 0:
            return
        decisions = ray.get(self.actor.decisions.remote(first_step, first_step + self.staleness), timeout=self.wait_timeout_s)
        for d in decisions:
            self._keep_local(d)

    # ---------------------------------------------------------------- hot path
    def report(self, step: int, loss_sums: Sequence[float], row_counts: Sequence[int]) -> None:
        """Send step ``step``'s per-block loss sums and row counts; returns at once."""
        ref = self.actor.report.remote(self.rank, int(step), [float(x) for x in loss_sums], [int(c) for c in row_counts])
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
            return ray.get(ref)
        return self._wait(step, ref)

    def _wait(self, step: int, ref: Any) -> Decision:
        self.waits += 1
        if self.waits <= LOG_FIRST_WAITS or self.waits % LOG_EVERY == 0:
            logger.info(
                "rank %d: waiting on the coordinator for the decision of step %d (staleness %d; wait #%d, %.3f s waited so far)",
                self.rank, step, self.staleness, self.waits, self.wait_seconds,
            )
        started = time.perf_counter()
        decision = self._resolve(step, ref)
        waited = time.perf_counter() - started
        self.wait_seconds += waited
        self.max_wait_seconds = max(self.max_wait_seconds, waited)
        return decision

    def _resolve(self, step: int, ref: Any) -> Decision:
        import ray

        try:
            return ray.get(ref, timeout=self.wait_timeout_s)
        except ray.exceptions.GetTimeoutError:
            status = ray.get(self.actor.status.remote(), timeout=30)
            raise CoordinatorError(
                f"rank {self.rank}: no decision for step {step} after {self.wait_timeout_s:.0f} s; coordinator status: {status}"
            ) from None

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
        import ray

        steps = [t - self.staleness for t in self._replies]
        pending = {ref: t for t, ref in self._replies.items()}
        confirm = self.actor.wait_recorded.remote(self.rank, steps)
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CoordinatorError(f"rank {self.rank}: reports of steps {steps} not recorded after {self.wait_timeout_s:.0f} s")
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

    # ------------------------------------------------------------ rare calls
    def sampler_update_due(self, step: int) -> bool:
        import ray

        return bool(ray.get(self.actor.sampler_update_due.remote(step), timeout=self.wait_timeout_s))

    def submit_signals(self, step: int, signals: Mapping[str, Sequence[float]]) -> int:
        """Submit the reduced validation signals measured after ``step``; returns the new p version."""
        import ray

        payload = {k: [float(x) for x in v] for k, v in signals.items()}
        return int(ray.get(self.actor.submit_signals.remote(step, payload), timeout=self.wait_timeout_s))

    def stats(self) -> dict[str, float]:
        return {
            "rank": self.rank,
            "reports": self.reports,
            "decisions": self.decisions_served,
            "waits": self.waits,
            "wait_seconds": self.wait_seconds,
            "max_wait_seconds": self.max_wait_seconds,
        }
