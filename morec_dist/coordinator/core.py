"""The coordinator state machine, with no Ray in it: aggregation, PID, sampler, preferences.

One instance serves a whole job (the Ray actor in ``actor.py`` wraps exactly one).

**Aggregation.** Every rank reports, for every step t, its per-block loss *sums* and row
counts (block 0 = accuracy, block k = k-th auxiliary objective). Reports may arrive in any
order, from any rank. Step t is aggregated once all ``world_size`` ranks reported it and
every earlier step was aggregated; the global loss of block k is
``fsum(sums over ranks) / sum(counts over ranks)``, and the PID runs once on the global
accuracy loss, strictly in step order. Nothing depends on arrival order or timing.

**Decisions (bounded staleness s).** ``decision(t)`` is what every rank uses at step t:

- beta = the PID output after steps <= t - s were aggregated; for t - s < 0 it is the
  controller at rest, ``beta_min + Kp / 2`` (the pretrained model starts at its target
  loss, e = 0);
- the sampler version in force = the newest version decided after a step u <= t - max(s, 1)
  (a distribution decided after step u can affect at most step u + 1's batches);
- the preferences (w, l_hat) in force at step t.

``decision(t)`` is ready only when all of that is known, so its value is a pure function
of the reports, the signals and the preference history: same inputs, same decisions.
s = 0 is fully synchronous (each step waits for every rank's loss of that step): allowed,
slow.

**Sampler cadence.** With ``sampler_every = N > 0`` a sampler update is due after every
step u with (u + 1) % N == 0 (the lead passes N = steps per epoch for "per epoch"). The
signals for a due step (one vector per adaptive objective, see ``SignalRequest``) are
submitted once (by rank 0, after the data-parallel evaluation); a decision that needs a
due update waits for it.

**Live preferences.** ``set_preferences(weights, target_loss, effective_step)`` records a
change of w and/or l_hat effective from a stated step. It must not rewrite a decision that
may already have been handed out, so the earliest allowed step is
``aggregated_through + s + 1``; w applies to decisions of steps >= the stated step, l_hat to
the PID update of steps >= the stated step. Every change is kept in ``history``.

**The law** (``spec.law``, registry ``coordinator/laws.py``). ``paper``: beta is the PID's
output on the global accuracy loss, as above. ``budget`` (``coordinator/budget.py``): beta
comes from held-out Hit@K measurements on a control slice, submitted by rank 0 after every
due step u with (u + 1) % control_every == 0 (``submit_measurement``), like the sampler's
signals; a decision of step t takes the accuracy share decided after the newest
measurement u <= t - max(s, 1) and waits for a due one, so it stays a pure function of the
inputs. beta = share / (1 - share) * lam * sum_k w_k(t). While the controller's safety rule
is on (the budget broken by far), a due sampler update keeps p_k as they are (a new version
with the same distributions; recorded in ``sampler_paused``); whether it is on at step u is
read from the newest measurement <= u, which must have been submitted first.
``set_budget(budget, effective_step)`` changes the budget for the measurements after steps
>= the stated step (kept in ``budget_history``).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from morec_dist.config import Config
from morec_dist.coordinator.budget import BudgetController, BudgetError, BudgetGains, BudgetStep, beta_of, check_budget
from morec_dist.coordinator.laws import CONTROL_LAWS
from morec_dist.coordinator.objectives import ObjectiveError, ObjectiveSet
from morec_dist.coordinator.pid import PIDController, PIDGains, PIDStep
from morec_dist.coordinator.sampler import GroupStats, SamplerState

STATE_FORMAT = 1


class CoordinatorError(ValueError):
    """A report, a signal or a preference change the coordinator cannot accept."""


class DecisionNotReady(LookupError):
    """``decision(t)`` asked before the steps / signals it depends on arrived."""


@dataclass(frozen=True)
class Decision:
    step: int
    beta: float
    lam: float
    weights: dict[str, float]  # w_k of the auxiliary objectives, in block order
    target_loss: float  # l_hat in force at this step
    p_version: int
    probabilities: dict[str, list[float]]  # p_k of version p_version, in block order
    pid_through: int  # the last aggregated step behind beta (-1: controller at rest)

    def block_weights(self) -> list[float]:
        """w_k in block order 1..K (for ``combined_loss``)."""
        return list(self.weights.values())


@dataclass(frozen=True)
class PreferenceChange:
    seq: int
    effective_step: int
    weights: dict[str, float] | None
    target_loss: float | None
    received_after_step: int  # aggregated_through when it arrived
    source: str


@dataclass(frozen=True)
class BudgetChange:
    """A new accuracy budget for the held-out measurements after steps >= ``effective_step``."""

    seq: int
    effective_step: int
    budget: float
    received_after_step: int  # the last measured step when it arrived
    source: str


@dataclass(frozen=True)
class CoordinatorSpec:
    """Everything that fixes a coordinator's behaviour (picklable, travels to the actor)."""

    objectives: ObjectiveSet
    gains: PIDGains
    lam: float
    target_loss: float
    world_size: int
    staleness: int
    sampler_every: int  # steps between sampler updates; 0 = never
    max_steps_ahead: int = 4096  # reports further ahead than this are refused (a rank ran away)
    metrics_endpoint: tuple[str, int] | None = None  # (host, port) the actor exports Prometheus metrics on
    # aggregated steps kept in ``trace`` (the newest ones); 0 = all. Bounds the actor's
    # memory and its checkpoint state for long runs (beta needs only the newest record).
    trace_window: int = 0
    law: str = "paper"  # coordinator/laws.py CONTROL_LAWS
    # the budget law (law "budget"): its gains, the budget, the pretrained model's held-out
    # Hit@K on the control slice (the set point's reference) and the measurement cadence
    budget_gains: BudgetGains | None = None
    accuracy_budget: float = 0.0
    reference_accuracy: float = 0.0
    control_every: int = 0

    def __post_init__(self) -> None:
        # staleness and lam are validated once, in config.py (a spec comes from build_spec(config))
        if self.world_size < 1:
            raise CoordinatorError(f"world_size: expected >= 1, got {self.world_size}")
        if self.trace_window < 0:
            raise CoordinatorError(f"coordinator.trace_window: expected >= 0 (0 = keep all), got {self.trace_window}")
        if self.sampler_every < 0:
            raise CoordinatorError(f"sampler_every: expected >= 0 (0 = never), got {self.sampler_every}")
        if not (math.isfinite(self.target_loss) and self.target_loss > 0):
            raise CoordinatorError(
                "target loss l_hat: expected > 0 (resolve morec.pid.target_loss = 0 from the pretrained model "
                f"first), got {self.target_loss}"
            )
        if CONTROL_LAWS.get(self.law).measured:
            if self.budget_gains is None or self.control_every < 1:
                raise CoordinatorError(
                    f"morec.pid.law = {self.law!r}: needs the budget gains and morec.control.every_steps >= 1"
                )
            if not (math.isfinite(self.reference_accuracy) and self.reference_accuracy > 0):
                raise CoordinatorError(
                    f"morec.pid.law = {self.law!r}: the pretrained model's held-out Hit on the control slice must be "
                    f"> 0, got {self.reference_accuracy}"
                )


@dataclass
class StepRecord:
    step: int
    losses: list[float]  # global mean loss per block (NaN where a block had no rows)
    counts: list[int]
    beta: float
    target_loss: float
    integrated: bool


@dataclass
class _Pending:
    sums: dict[int, list[float]] = field(default_factory=dict)
    counts: dict[int, list[int]] = field(default_factory=dict)


class CoordinatorCore:
    def __init__(self, spec: CoordinatorSpec) -> None:
        self.spec = spec
        self.names = spec.objectives.names
        self.pid = PIDController(spec.gains)
        self.last_pid: PIDStep | None = None
        self.sampler = SamplerState(
            spec.objectives.initial_probabilities(), {o.name: o.alpha for o in spec.objectives.objectives}
        )
        self.sampler_every = spec.sampler_every if spec.objectives.adaptive() else 0
        self.next_due = self.sampler_every - 1 if self.sampler_every else -1
        # version v: (decided after step, probabilities); version 0 is the initial one
        self.versions: list[tuple[int, dict[str, list[float]]]] = [(-1, _as_lists(self.sampler.snapshot()))]
        self.signals_seen: dict[int, dict[str, list[float]]] = {}
        self.pending: dict[int, _Pending] = {}
        self.trace: deque[StepRecord] = deque(maxlen=spec.trace_window or None)
        self._aggregated_through = -1
        self.history: list[PreferenceChange] = []
        # the history ordered by (effective step, seq), kept sorted on insert (bisect), so
        # a decision reads a prefix instead of re-sorting the whole history
        self._ordered: list[tuple[int, int, PreferenceChange]] = []
        self.base_weights = spec.objectives.weights()
        self.base_target = spec.target_loss
        self.law = CONTROL_LAWS.get(spec.law)
        self.budget: BudgetController | None = None
        self.control_every = 0
        if self.law.measured:
            assert spec.budget_gains is not None  # checked by the spec
            self.budget = BudgetController(spec.budget_gains, spec.accuracy_budget, spec.reference_accuracy)
            self.control_every = spec.control_every
        self.next_control_due = self.control_every - 1 if self.control_every else -1
        # (decided after step, accuracy share, safety on); entry 0 is the controller at rest
        self.shares: list[tuple[int, float, bool]] = []
        if self.budget is not None:
            self.shares.append((-1, self.budget.share, False))
        self.control_trace: list[BudgetStep] = []
        self.measured_seen: dict[int, float] = {}
        self.budget_history: list[BudgetChange] = []
        self.sampler_paused: list[int] = []

    # ------------------------------------------------------------------ reports
    @property
    def aggregated_through(self) -> int:
        return self._aggregated_through

    @property
    def trace_start(self) -> int:
        """The step of ``trace[0]`` (> 0 once a bounded trace dropped old records)."""
        return self._aggregated_through + 1 - len(self.trace)

    @property
    def p_lag(self) -> int:
        return max(self.spec.staleness, 1)

    def report(self, rank: int, step: int, loss_sums: Sequence[float], row_counts: Sequence[int]) -> int:
        """Record one rank's step; aggregate every step that became complete. Returns how many."""
        sums, counts = self._validated_report(rank, step, loss_sums, row_counts)
        entry = self.pending.setdefault(step, _Pending())
        if rank in entry.sums:
            raise CoordinatorError(f"rank {rank} reported step {step} twice")
        entry.sums[rank] = sums
        entry.counts[rank] = counts
        return self._aggregate_ready_steps()

    def has_report(self, rank: int, step: int) -> bool:
        """Whether ``rank``'s report of ``step`` is in (aggregated, or pending)."""
        return step <= self.aggregated_through or (step in self.pending and rank in self.pending[step].sums)

    def _validated_report(
        self, rank: int, step: int, loss_sums: Sequence[float], row_counts: Sequence[int]
    ) -> tuple[list[float], list[int]]:
        ws = self.spec.world_size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < ws:
            raise CoordinatorError(f"report: rank must be an integer in 0..{ws - 1}, got {rank!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CoordinatorError(f"report from rank {rank}: step must be an integer >= 0, got {step!r}")
        if step <= self.aggregated_through:
            raise CoordinatorError(
                f"report from rank {rank}: step {step} was already aggregated (through {self.aggregated_through})"
            )
        if step > self.aggregated_through + self.spec.max_steps_ahead:
            raise CoordinatorError(
                f"report from rank {rank}: step {step} is more than {self.spec.max_steps_ahead} steps ahead of the "
                f"aggregated step {self.aggregated_through} (another rank stopped reporting?)"
            )
        k = len(self.names)
        if len(loss_sums) != k or len(row_counts) != k:
            raise CoordinatorError(
                f"report from rank {rank}, step {step}: expected {k} loss sums and row counts (blocks {self.names}), "
                f"got {len(loss_sums)} and {len(row_counts)}"
            )
        sums = [float(x) for x in loss_sums]
        if not all(math.isfinite(x) for x in sums):
            raise CoordinatorError(f"report from rank {rank}, step {step}: loss sums must be finite, got {sums}")
        try:
            counts = [int(c) for c in row_counts]
            exact = all(c == float(r) for c, r in zip(counts, row_counts, strict=True))
        except (TypeError, ValueError):
            exact = False
        if not exact or any(c < 0 for c in counts):
            raise CoordinatorError(
                f"report from rank {rank}, step {step}: row counts must be integers >= 0, got {list(row_counts)}"
            )
        if counts[0] < 1:
            raise CoordinatorError(f"report from rank {rank}, step {step}: the accuracy block (0) has no rows")
        return sums, counts

    def _aggregate_ready_steps(self) -> int:
        done = 0
        while True:
            step = self.aggregated_through + 1
            entry = self.pending.get(step)
            if entry is None or len(entry.sums) < self.spec.world_size:
                return done
            del self.pending[step]
            self._aggregate(step, entry)
            done += 1

    def _aggregate(self, step: int, entry: _Pending) -> None:
        ranks = sorted(entry.sums)
        losses, counts = [], []
        for block in range(len(self.names)):
            total = math.fsum(entry.sums[r][block] for r in ranks)
            rows = sum(entry.counts[r][block] for r in ranks)
            losses.append(total / rows if rows else float("nan"))
            counts.append(rows)
        target = self.target_at(step)
        if self.budget is not None:
            # the budget law's beta comes from measurements; the record holds the beta in force
            self._aggregated_through = step
            self.trace.append(StepRecord(step, losses, counts, self._budget_beta_or_nan(step), target, False))
            return
        result = self.pid.update(losses[0], target)
        self.last_pid = result  # the PID terms of the newest step, for metrics (not state)
        self.trace.append(StepRecord(step, losses, counts, result.beta, target, result.integrated))
        self._aggregated_through = step

    # ---------------------------------------------------------------- decisions
    def beta_for(self, step: int) -> tuple[float, int]:
        through = step - self.spec.staleness
        if through > self.aggregated_through:
            raise DecisionNotReady(
                f"beta of step {step} needs step {through} aggregated; aggregated through {self.aggregated_through}"
            )
        if self.budget is not None:
            return self._budget_beta(step), max(through, -1)
        if through < 0:
            return self.spec.gains.resting_beta, -1
        return self.trace[through - self.trace_start].beta, through

    # ---------------------------------------------------------- the budget law
    def _share_entry(self, horizon: int) -> tuple[int, float, bool]:
        """The newest (after, share, safety) decided after a step <= horizon."""
        at = bisect.bisect_right([after for after, _, _ in self.shares], horizon) - 1
        return self.shares[max(at, 0)]

    def _budget_beta(self, step: int) -> float:
        horizon = step - self.p_lag
        if self.next_control_due <= horizon:
            raise DecisionNotReady(
                f"beta of step {step} needs the held-out measurement due after step {self.next_control_due}"
            )
        share = self._share_entry(horizon)[1]
        return beta_of(share, self.spec.lam * math.fsum(self.weights_at(step).values()))

    def _budget_beta_or_nan(self, step: int) -> float:
        try:
            return self._budget_beta(step)
        except DecisionNotReady:
            return float("nan")

    def _require_budget(self, what: str) -> BudgetController:
        if self.budget is None:
            raise CoordinatorError(f"{what}: morec.pid.law = {self.spec.law!r} takes no held-out measurement or budget")
        return self.budget

    def submit_measurement(self, step: int, hit: float) -> dict[str, Any]:
        """Held-out Hit@K of the control slice measured after step ``step`` (a due step);
        returns what the controller did. A resubmission of the same value is a no-op."""
        budget = self._require_budget("submit_measurement")
        value = float(hit)
        if step in self.measured_seen:
            if self.measured_seen[step] == value:
                return next(r for r in self.control_trace if r.step == step).as_dict()
            raise CoordinatorError(f"the held-out measurement after step {step} was already applied with another value")
        if step != self.next_control_due:
            raise CoordinatorError(
                f"submit_measurement: the next held-out measurement is due after step {self.next_control_due}, "
                f"got step {step}"
            )
        wanted = self.budget_at(step)
        if wanted != budget.budget:
            budget.set_budget(wanted)
        try:
            record = budget.update(step, value)
        except BudgetError as exc:
            raise CoordinatorError(f"measurement after step {step}: {exc}") from None
        self.shares.append((step, record.share, record.safety))
        self.control_trace.append(record)
        self.measured_seen[step] = value
        self.next_control_due += self.control_every
        return record.as_dict()

    @property
    def last_control(self) -> BudgetStep | None:
        return self.control_trace[-1] if self.control_trace else None

    def sampler_paused_at(self, step: int) -> bool:
        """Whether the safety rule holds the sampler after ``step`` (the newest measurement <= step)."""
        if self.budget is None:
            return False
        if self.next_control_due <= step:
            raise CoordinatorError(
                f"the sampler update after step {step} needs the held-out measurement due after step "
                f"{self.next_control_due} first"
            )
        return self._share_entry(step)[2]

    @property
    def earliest_budget_step(self) -> int:
        last_measured = self.next_control_due - self.control_every
        return max(self.earliest_preference_step, last_measured + 1)

    def set_budget(self, budget: float, effective_step: int | None = None, source: str = "") -> BudgetChange:
        """A new accuracy budget for the held-out measurements after steps >= ``effective_step``
        (default: the earliest step that no decision handed out depends on)."""
        self._require_budget("set_budget")
        try:
            value = check_budget(budget, "set_budget: budget")
        except BudgetError as exc:
            raise CoordinatorError(str(exc)) from None
        earliest = self.earliest_budget_step
        step = earliest if effective_step is None else int(effective_step)
        if step < earliest:
            raise CoordinatorError(
                f"set_budget: step {step} may already be decided (measured through step "
                f"{self.next_control_due - self.control_every}, aggregated through {self.aggregated_through}); the "
                f"earliest step that can still change is {earliest}"
            )
        change = BudgetChange(len(self.budget_history), step, value, self.next_control_due - self.control_every, source)
        self.budget_history.append(change)
        return change

    def budget_at(self, step: int) -> float:
        """The budget in force for the measurement after ``step``."""
        budget = self.spec.accuracy_budget
        for change in sorted(self.budget_history, key=lambda c: (c.effective_step, c.seq)):
            if change.effective_step <= step:
                budget = change.budget
        return budget

    def version_for(self, step: int) -> int:
        horizon = step - self.p_lag
        if self.sampler_every and self.next_due <= horizon:
            raise DecisionNotReady(f"sampler version of step {step} needs the signals due after step {self.next_due}")
        version = 0
        for v, (decided_after, _) in enumerate(self.versions):
            if decided_after <= horizon:
                version = v
        return version

    def ready(self, step: int) -> bool:
        try:
            self.beta_for(step)
            self.version_for(step)
        except DecisionNotReady:
            return False
        return True

    def decision(self, step: int) -> Decision:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CoordinatorError(f"decision: step must be an integer >= 0, got {step!r}")
        beta, through = self.beta_for(step)
        version = self.version_for(step)
        return Decision(
            step=step,
            beta=beta,
            lam=self.spec.lam,
            weights=self.weights_at(step),
            target_loss=self.target_at(step),
            p_version=version,
            probabilities={k: list(v) for k, v in self.versions[version][1].items()},
            pid_through=through,
        )

    # ------------------------------------------------------------------ sampler
    def submit_signals(self, step: int, signals: Mapping[str, Sequence[float]]) -> int:
        """Signals measured after step ``step`` (a due step); returns the new version.

        A resubmission of the same step with identical signals is a no-op (any rank may
        send the reduced signals); different values for a step already applied are refused.
        """
        clean = {k: [float(x) for x in v] for k, v in signals.items()}
        if step in self.signals_seen:
            if _same_signals(self.signals_seen[step], clean):
                return self._version_decided_after(step)
            raise CoordinatorError(f"signals for step {step} were already applied with different values")
        if not self.sampler_every:
            raise CoordinatorError(
                "submit_signals: no sampler update is ever due (sampler_every = 0 or no adaptive objective)"
            )
        if step != self.next_due:
            raise CoordinatorError(
                f"submit_signals: the next sampler update is due after step {self.next_due}, got step {step}"
            )
        if self.sampler_paused_at(step):
            signs = {}  # the safety rule: a new version with the same p_k
            self.sampler_paused.append(step)
        else:
            try:
                signs = self.spec.objectives.signs(clean)
            except ObjectiveError as exc:
                raise CoordinatorError(f"signals after step {step}: {exc}") from None
        self.sampler.step(signs)
        self.versions.append((step, _as_lists(self.sampler.snapshot())))
        self.signals_seen[step] = clean
        self.next_due += self.sampler_every
        return self.sampler.version

    def _version_decided_after(self, step: int) -> int:
        return next(v for v, (after, _) in enumerate(self.versions) if after == step)

    # -------------------------------------------------------------- preferences
    @property
    def earliest_preference_step(self) -> int:
        return self.aggregated_through + self.spec.staleness + 1

    def set_preferences(
        self,
        weights: Mapping[str, float] | None = None,
        target_loss: float | None = None,
        effective_step: int | None = None,
        source: str = "",
    ) -> PreferenceChange:
        if weights is None and target_loss is None:
            raise CoordinatorError("set_preferences: give new weights, a new target loss, or both")
        earliest = self.earliest_preference_step
        step = earliest if effective_step is None else int(effective_step)
        if step < earliest:
            raise CoordinatorError(
                f"set_preferences: step {step} may already be decided (aggregated through {self.aggregated_through}, "
                f"staleness {self.spec.staleness}); the earliest step that can still change is {earliest}"
            )
        new_weights = None
        if weights is not None:
            new_weights = self._checked_weights(weights, step)
        if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
            raise CoordinatorError(f"set_preferences: target loss must be > 0, got {target_loss}")
        change = PreferenceChange(
            len(self.history),
            step,
            new_weights,
            None if target_loss is None else float(target_loss),
            self.aggregated_through,
            source,
        )
        self.history.append(change)
        bisect.insort(self._ordered, (change.effective_step, change.seq, change))
        return change

    def _checked_weights(self, weights: Mapping[str, float], step: int) -> dict[str, float]:
        unknown = sorted(set(weights) - set(self.base_weights))
        if unknown:
            raise CoordinatorError(f"set_preferences: unknown objectives {unknown}; have {list(self.base_weights)}")
        merged = {**self.weights_at(step), **{k: float(v) for k, v in weights.items()}}
        bad = {k: v for k, v in merged.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise CoordinatorError(f"set_preferences: weights must be finite and >= 0, got {bad}")
        if sum(merged.values()) <= 0:
            raise CoordinatorError("set_preferences: weights sum to 0; at least one objective needs a positive weight")
        return {k: float(weights[k]) for k in self.base_weights if k in weights}

    def _changes_until(self, step: int) -> list[PreferenceChange]:
        end = bisect.bisect_right(self._ordered, (step, len(self.history)))
        return [c for _, _, c in self._ordered[:end]]

    def weights_at(self, step: int) -> dict[str, float]:
        weights = dict(self.base_weights)
        for change in self._changes_until(step):
            if change.weights:
                weights.update(change.weights)
        return weights

    def target_at(self, step: int) -> float:
        target = self.base_target
        for change in self._changes_until(step):
            if change.target_loss is not None:
                target = change.target_loss
        return target

    # ---------------------------------------------------------------- reporting
    def status(self) -> dict[str, Any]:
        return {
            "world_size": self.spec.world_size,
            "staleness": self.spec.staleness,
            "aggregated_through": self.aggregated_through,
            "trace_start": self.trace_start,
            "pending": {step: sorted(e.sums) for step, e in sorted(self.pending.items())},
            "beta": self.pid.beta,
            "p_version": self.sampler.version,
            "next_sampler_update_after_step": self.next_due if self.sampler_every else None,
            "earliest_preference_step": self.earliest_preference_step,
            "preference_changes": len(self.history),
            "law": self.spec.law,
            **self._control_status(),
        }

    def _control_status(self) -> dict[str, Any]:
        if self.budget is None:
            return {}
        b = self.budget
        return {
            "accuracy_budget": b.budget,
            "setpoint": b.setpoint,
            "reference_accuracy": b.reference,
            "heldout_accuracy": b.smoothed,
            "accuracy_share": b.share,
            "safety": b.safety,
            "next_measurement_after_step": self.next_control_due,
            "earliest_budget_step": self.earliest_budget_step,
        }

    def trace_dict(self) -> dict[str, list]:
        return {
            "step": [r.step for r in self.trace],
            "beta": [r.beta for r in self.trace],
            "accuracy_loss": [r.losses[0] for r in self.trace],
            "target_loss": [r.target_loss for r in self.trace],
            "losses": [list(r.losses) for r in self.trace],
            "counts": [list(r.counts) for r in self.trace],
            "control": [r.as_dict() for r in self.control_trace],  # the budget law's measurements
            "sampler_paused": list(self.sampler_paused),
        }

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "blocks": list(self.names),
            "world_size": self.spec.world_size,
            "staleness": self.spec.staleness,
            "sampler_every": self.sampler_every,
            "pid": self.pid.state_dict(),
            "sampler": self.sampler.state_dict(),
            "next_due": self.next_due,
            "versions": [[after, probs] for after, probs in self.versions],
            "signals_seen": {str(k): v for k, v in self.signals_seen.items()},
            "pending": {
                str(s): {
                    "sums": {str(r): v for r, v in e.sums.items()},
                    "counts": {str(r): v for r, v in e.counts.items()},
                }
                for s, e in self.pending.items()
            },
            "trace": [asdict(r) for r in self.trace],
            "aggregated_through": self.aggregated_through,
            "history": [asdict(c) for c in self.history],
            "law": self.spec.law,
            **({"control": self._control_state()} if self.budget is not None else {}),
        }

    def _control_state(self) -> dict[str, Any]:
        assert self.budget is not None
        return {
            # the pretrained model's held-out Hit: a resumed job's set point comes from here
            "reference": self.budget.reference,
            "controller": self.budget.state_dict(),
            "next_due": self.next_control_due,
            "shares": [list(entry) for entry in self.shares],
            "trace": [r.as_dict() for r in self.control_trace],
            "measured": {str(k): v for k, v in self.measured_seen.items()},
            "budget_history": [asdict(c) for c in self.budget_history],
            "sampler_paused": list(self.sampler_paused),
        }

    def _load_control_state(self, state: Mapping[str, Any]) -> None:
        assert self.budget is not None
        if float(state["reference"]) != self.budget.reference:
            raise CoordinatorError(
                f"coordinator state: the pretrained model's held-out Hit is {state['reference']} in the checkpoint but "
                f"{self.budget.reference} in this job (take it from the checkpoint: reference_accuracy_of)"
            )
        self.budget.load_state_dict(dict(state["controller"]))
        self.next_control_due = int(state["next_due"])
        self.shares = [(int(a), float(s), bool(f)) for a, s, f in state["shares"]]
        self.control_trace = [BudgetStep(**r) for r in state["trace"]]
        self.measured_seen = {int(k): float(v) for k, v in state["measured"].items()}
        self.budget_history = [BudgetChange(**c) for c in state["budget_history"]]
        self.sampler_paused = [int(s) for s in state["sampler_paused"]]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CoordinatorError(f"coordinator state: format {state.get('format')!r}, expected {STATE_FORMAT}")
        for key, mine in (
            ("law", self.spec.law),
            ("blocks", list(self.names)),
            ("world_size", self.spec.world_size),
            ("staleness", self.spec.staleness),
            ("sampler_every", self.sampler_every),
        ):
            if state.get(key, "paper" if key == "law" else None) != mine:  # states before laws: the paper's
                raise CoordinatorError(
                    f"coordinator state: {key} is {state[key]!r} in the checkpoint but {mine!r} in this job"
                )
        self.pid.load_state_dict(state["pid"])
        self.sampler.load_state_dict(state["sampler"])
        self.next_due = int(state["next_due"])
        self.versions = [(int(after), {k: list(v) for k, v in probs.items()}) for after, probs in state["versions"]]
        self.signals_seen = {int(k): v for k, v in state["signals_seen"].items()}
        self.pending = {
            int(s): _Pending(
                {int(r): list(v) for r, v in e["sums"].items()}, {int(r): list(v) for r, v in e["counts"].items()}
            )
            for s, e in state["pending"].items()
        }
        self.trace = deque((StepRecord(**r) for r in state["trace"]), maxlen=self.spec.trace_window or None)
        saved = state["trace"]
        self._aggregated_through = int(state.get("aggregated_through", saved[-1]["step"] if saved else -1))
        self.history = [PreferenceChange(**c) for c in state["history"]]
        self._ordered = sorted((c.effective_step, c.seq, c) for c in self.history)
        if self.budget is not None:
            self._load_control_state(state["control"])


def reference_accuracy_of(state: Mapping[str, Any] | None) -> float | None:
    """The pretrained model's held-out Hit a saved coordinator state was built with (None:
    no state, or the paper's law): a resumed job's budget law takes its set point from it."""
    if state is None or "control" not in state:
        return None
    return float(state["control"]["reference"])


def _as_lists(probs: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in probs.items()}


def _same_signals(a: Mapping[str, list[float]], b: Mapping[str, list[float]]) -> bool:
    if set(a) != set(b):
        return False
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True) for k in a)


def build_spec(
    config: Config,
    stats: GroupStats,
    *,
    world_size: int,
    target_loss: float | None = None,
    steps_per_epoch: int | None = None,
    reference_accuracy: float | None = None,
    law: str | None = None,
) -> CoordinatorSpec:
    """A ``CoordinatorSpec`` from the job ``Config`` and the dataset's ``GroupStats``.

    ``target_loss`` overrides ``config.morec.pid.target_loss`` (which is 0 when l_hat must
    come from the pretrained model). ``steps_per_epoch`` is required when
    ``config.morec.sampler.update_every_steps`` is 0 (update once per epoch).
    ``reference_accuracy`` is the pretrained model's held-out Hit@K on the control slice,
    required by a measured law (``budget``); ``law`` overrides ``config.morec.pid.law`` (the
    baselines on MoRec's blocks use the paper's, whose beta they never read).
    """
    from morec_dist.coordinator.objectives import build_objectives

    morec = config.morec
    objectives = build_objectives(morec.objectives, stats, default_alpha=morec.sampler.alpha)
    l_hat = target_loss if target_loss is not None else morec.pid.target_loss
    every = morec.sampler.update_every_steps
    if every == 0:
        if not steps_per_epoch or steps_per_epoch < 1:
            raise CoordinatorError("morec.sampler.update_every_steps = 0 (per epoch) needs steps_per_epoch >= 1")
        every = steps_per_epoch
    metrics = config.metrics
    law = law or morec.pid.law
    measured = CONTROL_LAWS.get(law, "morec.pid.law").measured
    if measured and reference_accuracy is None:
        raise CoordinatorError(
            f"morec.pid.law = {law!r} needs the pretrained model's held-out Hit@K on the control slice (measured "
            "at the start of fine-tuning)"
        )
    try:
        gains = BudgetGains.from_config(morec.control) if measured else None
    except BudgetError as exc:
        raise CoordinatorError(str(exc)) from None
    return CoordinatorSpec(
        metrics_endpoint=(metrics.host, metrics.base_port) if metrics.enabled else None,
        objectives=objectives,
        gains=PIDGains.from_config(morec.pid),
        lam=morec.lam,
        target_loss=float(l_hat),
        world_size=world_size,
        staleness=config.coordinator.staleness,
        sampler_every=every,
        trace_window=getattr(config.coordinator, "trace_window", 0),
        law=law,
        budget_gains=gains,
        accuracy_budget=morec.accuracy_budget if measured else 0.0,
        reference_accuracy=float(reference_accuracy) if measured and reference_accuracy is not None else 0.0,
        control_every=morec.control.every_steps if measured else 0,
    )
