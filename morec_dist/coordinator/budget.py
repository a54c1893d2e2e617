"""The budget law: a PI controller that holds held-out accuracy within a budget the user states.

The user asks for "Hit@K on held-out data at most ``budget`` (relative) below the pretrained
model's". The coordinator turns that into a set point from the pretrained model's Hit@K on
the *control slice* of validation users (``reference``, measured before the first step)::

    r = (1 - budget) * reference

and measures the current model's Hit@K on the same slice on a cadence of its own. Per
measurement k (``update``):

    y_k   = ema * m_k + (1 - ema) * y_{k-1}     y_0 = reference (smoothing)
    e_k   = (y_k - r) / r                          dimensionless (relative to the set point)
    u_k   = clamp(u_{k-1} - kp (e_k - e_{k-1}) - ki e_k, u_min, u_max)     PI, velocity form
    a_k   = sigmoid(u_k)                           the accuracy share of the combined loss

The actuator is the *accuracy share* ``a = beta / (beta + lam * sum_k w_k)`` of MoRec's loss
``lam * sum_k w_k L_k + beta * L_acc``; its logit ``u`` is what the PI moves, so a gain means
the same thing at any lambda or w. ``beta = a / (1 - a) * lam * sum_k w_k`` (``beta_of``) is
computed from the share with the weights in force at each step, so a live change of w keeps
the share the controller chose.

Why velocity form: the controller's only state is u (and the last error), so clamping u to
``[logit(share_min), logit(share_max)]`` *is* the anti-windup: there is no integral that can
grow while the output is saturated, and leaving a bound starts from the bound (bumpless).

Safety rule: when the smoothed accuracy is below the pretrained model's by more than
``safety_factor * budget`` (the budget broken by far), u goes to its upper bound (full
accuracy weight) and the controller reports ``safety`` (the coordinator pauses the sampler)
until the smoothed accuracy is back at the set point (e >= 0); the PI then continues from the
upper bound.

A new budget (``set_budget``) moves the set point; the last error is recomputed against it,
so the change acts through the integral term, without a proportional kick.

Gains are dimensionless: kp is the logit change per unit change of the relative error, ki
the logit change per measurement per unit relative error. How they were tuned:
docs/coordinator.md ("The budget law") and ``benchmarks/tune_budget.py``.

State is a handful of floats; ``state_dict`` / ``load_state_dict`` round-trip it exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

STATE_KEYS = ("budget", "smoothed", "prev_error", "u", "safety", "measurements")


class BudgetError(ValueError):
    """A budget, gain or measurement the controller cannot accept (names the config field)."""


def logit(share: float) -> float:
    return math.log(share / (1.0 - share))


def sigmoid(u: float) -> float:
    if u >= 0:
        return 1.0 / (1.0 + math.exp(-u))
    z = math.exp(u)
    return z / (1.0 + z)


def beta_of(share: float, auxiliary_weight: float) -> float:
    """beta such that beta / (beta + auxiliary_weight) = share (auxiliary_weight = lam * sum w)."""
    return share / (1.0 - share) * auxiliary_weight


def share_of(beta: float, auxiliary_weight: float) -> float:
    return beta / (beta + auxiliary_weight)


def check_budget(budget: float, where: str = "morec.accuracy_budget") -> float:
    budget = float(budget)
    if not (math.isfinite(budget) and 0.0 < budget < 1.0):
        raise BudgetError(
            f"{where}: expected a relative budget in (0, 1) (0.02 = 2% below the pretrained), got {budget}"
        )
    return budget


@dataclass(frozen=True)
class BudgetGains:
    """The budget law's constants (``config.morec.control``), all dimensionless."""

    kp: float
    ki: float
    share_min: float
    share_max: float
    share_start: float
    ema: float
    safety_factor: float

    def __post_init__(self) -> None:
        for name in ("kp", "ki"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise BudgetError(f"morec.control.{name}: gains must be finite and >= 0, got {value}")
        if not (0.0 < self.share_min <= self.share_start <= self.share_max < 1.0):
            raise BudgetError(
                "morec.control: need 0 < share_min <= share_start <= share_max < 1, got "
                f"{self.share_min}, {self.share_start}, {self.share_max}"
            )
        if not 0.0 < self.ema <= 1.0:
            raise BudgetError(f"morec.control.ema: expected the newest measurement's weight in (0, 1], got {self.ema}")
        if not self.safety_factor > 1.0:
            raise BudgetError(
                f"morec.control.safety_factor: expected > 1 (a multiple of the budget), got {self.safety_factor}"
            )

    @classmethod
    def from_config(cls, control: Any) -> BudgetGains:
        return cls(
            kp=control.kp,
            ki=control.ki,
            share_min=control.share_min,
            share_max=control.share_max,
            share_start=control.share_start,
            ema=control.ema,
            safety_factor=control.safety_factor,
        )

    @property
    def u_min(self) -> float:
        return logit(self.share_min)

    @property
    def u_max(self) -> float:
        return logit(self.share_max)


@dataclass(frozen=True)
class BudgetStep:
    """What one measurement did (for the trace, the metrics and tests)."""

    step: int  # the training step after which the measurement was taken
    measured: float
    smoothed: float
    setpoint: float
    budget: float
    error: float
    u: float
    share: float
    safety: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BudgetController:
    """u (the logit of the accuracy share) from held-out accuracy measurements; pure floats."""

    def __init__(self, gains: BudgetGains, budget: float, reference: float) -> None:
        if not (math.isfinite(reference) and reference > 0):
            raise BudgetError(
                f"budget law: the pretrained model's held-out Hit on the control slice must be > 0, got {reference} "
                "(a control slice without a single hit: use more validation users, morec.control.control_fraction)"
            )
        self.gains = gains
        self.reference = float(reference)
        self.budget = check_budget(budget)
        self.smoothed = self.reference
        self.prev_error = self.error_of(self.smoothed)
        self.u = min(max(logit(gains.share_start), gains.u_min), gains.u_max)
        self.safety = False
        self.measurements = 0

    @property
    def setpoint(self) -> float:
        return (1.0 - self.budget) * self.reference

    @property
    def share(self) -> float:
        return sigmoid(self.u)

    @property
    def safety_error(self) -> float:
        """e at which the budget counts as broken by far: smoothed = (1 - f * budget) * reference."""
        f, b = self.gains.safety_factor, self.budget
        return -(f - 1.0) * b / (1.0 - b)

    def error_of(self, smoothed: float) -> float:
        return (smoothed - self.setpoint) / self.setpoint

    def set_budget(self, budget: float) -> None:
        """A new budget from the next measurement on: the set point moves, the last error is
        re-read against it (no proportional kick; the integral term walks u to the new level)."""
        self.budget = check_budget(budget)
        self.prev_error = self.error_of(self.smoothed)

    def update(self, step: int, measured: float) -> BudgetStep:
        """One measurement of held-out Hit@K (after training step ``step``) -> the new share."""
        if not (math.isfinite(measured) and 0.0 <= measured <= 1.0):
            raise BudgetError(f"budget law: a held-out Hit must be a finite rate in [0, 1], got {measured}")
        g = self.gains
        self.smoothed = g.ema * measured + (1.0 - g.ema) * self.smoothed
        error = self.error_of(self.smoothed)
        if self.safety and error >= 0.0:
            self.safety = False  # recovered: the PI continues from the upper bound
        elif error <= self.safety_error:
            self.safety = True
        if self.safety:
            self.u = g.u_max
        else:
            move = -g.kp * (error - self.prev_error) - g.ki * error
            self.u = min(max(self.u + move, g.u_min), g.u_max)
        self.prev_error = error
        self.measurements += 1
        return BudgetStep(
            step, float(measured), self.smoothed, self.setpoint, self.budget, error, self.u, self.share, self.safety
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "smoothed": self.smoothed,
            "prev_error": self.prev_error,
            "u": self.u,
            "safety": self.safety,
            "measurements": self.measurements,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(STATE_KEYS):
            raise BudgetError(f"budget law state: expected keys {sorted(STATE_KEYS)}, got {sorted(state)}")
        self.budget = check_budget(state["budget"])
        self.smoothed = float(state["smoothed"])
        self.prev_error = float(state["prev_error"])
        self.u = float(state["u"])
        self.safety = bool(state["safety"])
        self.measurements = int(state["measurements"])
