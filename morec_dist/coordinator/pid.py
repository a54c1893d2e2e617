"""The outer level of MoRec: the PID controller that sets beta, the weight of the accuracy loss.

Exactly the law of MOREC.md, one call per training step with that step's *global* accuracy
loss ``l_t``::

    e_t    = l_hat - l_t
    P_t    = Kp / (1 + exp(e_t))                 sigmoid proportional term, in (0, Kp)
    I_t    = I_{t-1} - Ki * e_t                  only while beta_{t-1} is inside its bounds
    D_t    = Kd * (e_t - e_{t-1})                (Kd = 0: the reference is PI only)
    beta_t = clip(P_t + I_t + D_t + beta_min, beta_min, beta_max)

"beta_{t-1} inside its bounds" is read on the *unclipped* output of the previous step (the
clipped one is always inside, which would make anti-windup a no-op): while the controller
is saturated the integral is frozen, so it cannot wind up past a bound. Before the first
step the previous output is the controller at rest (e = 0, I = 0): ``beta_min + Kp / 2``,
which is inside the bounds, and the first D term is 0 (no derivative kick).

That literal rule can stick: if one step's integral moves past the whole range
(Ki * |e| larger than the P term can offset), the output stays saturated and the integral
stays frozen for good. It never happens with the reference gains (Ki = Kp / 50 and losses
near l_hat), but it does in aggressive PID sweeps, so ``anti_windup = "unwind"`` is offered:
while saturated, the integral still moves when the move points back into the range
(conditional integration). The default, ``"freeze"``, is MOREC.md's rule.

The state is five numbers; ``state_dict`` / ``load_state_dict`` round-trip it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from morec_dist.config import PIDConfig

ANTI_WINDUP_MODES = ("freeze", "unwind")


@dataclass(frozen=True)
class PIDGains:
    kp: float = 0.05
    ki: float = 0.001
    kd: float = 0.0
    beta_min: float = 0.1
    beta_max: float = 1.5
    anti_windup: str = "freeze"  # "freeze" (MOREC.md) or "unwind"

    def __post_init__(self) -> None:
        if self.anti_windup not in ANTI_WINDUP_MODES:
            raise ValueError(f"pid.anti_windup: {self.anti_windup!r} is not one of {ANTI_WINDUP_MODES}")
        for name in ("kp", "ki", "kd"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"pid.{name}: gains must be finite and >= 0, got {value}")
        if not (0 <= self.beta_min <= self.beta_max and math.isfinite(self.beta_max)):
            raise ValueError(
                f"pid: need 0 <= beta_min <= beta_max, got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )

    @classmethod
    def from_config(cls, pid: PIDConfig) -> PIDGains:
        """From ``config.morec.pid``."""
        return cls(
            kp=pid.kp,
            ki=pid.ki,
            kd=pid.kd,
            beta_min=pid.beta_min,
            beta_max=pid.beta_max,
            anti_windup=getattr(pid, "anti_windup", "freeze"),
        )

    @property
    def resting_beta(self) -> float:
        """The output at e = 0 with an empty integral: the beta used before any step was seen."""
        return min(max(self.beta_min + self.kp / 2.0, self.beta_min), self.beta_max)


@dataclass(frozen=True)
class PIDStep:
    """What one update saw and produced (for traces and tests)."""

    loss: float
    target: float
    error: float
    p: float
    i: float
    d: float
    raw_beta: float
    beta: float
    integrated: bool


def sigmoid_p(kp: float, error: float) -> float:
    """Kp / (1 + exp(e)) without overflow for large |e|."""
    if error >= 0:
        z = math.exp(-error)
        return kp * z / (1.0 + z)
    return kp / (1.0 + math.exp(error))


class PIDController:
    """beta_t from the accuracy loss of step t; deterministic, pure Python floats."""

    def __init__(self, gains: PIDGains) -> None:
        self.gains = gains
        self.integral = 0.0
        self.prev_error: float | None = None
        self.prev_raw_beta = gains.resting_beta
        self.beta = gains.resting_beta
        self.steps = 0

    def _integrates(self, error: float) -> bool:
        g, raw = self.gains, self.prev_raw_beta
        if g.beta_min <= raw <= g.beta_max:
            return True
        if g.anti_windup == "freeze":
            return False
        move = -g.ki * error  # what integrating would add to the output
        return (raw > g.beta_max and move < 0) or (raw < g.beta_min and move > 0)

    def update(self, loss: float, target: float) -> PIDStep:
        """One control step: the new beta for accuracy loss ``loss`` against target ``l_hat``."""
        if not math.isfinite(loss):
            raise ValueError(f"PID: accuracy loss must be finite, got {loss}")
        if not (math.isfinite(target) and target >= 0):
            raise ValueError(f"PID: target loss l_hat must be finite and >= 0, got {target}")
        g = self.gains
        error = target - loss
        p = sigmoid_p(g.kp, error)
        integrated = self._integrates(error)
        if integrated:
            self.integral -= g.ki * error
        d = 0.0 if self.prev_error is None else g.kd * (error - self.prev_error)
        raw = p + self.integral + d + g.beta_min
        beta = min(max(raw, g.beta_min), g.beta_max)
        self.prev_error = error
        self.prev_raw_beta = raw
        self.beta = beta
        self.steps += 1
        return PIDStep(loss, target, error, p, self.integral, d, raw, beta, integrated)

    def state_dict(self) -> dict[str, Any]:
        return {
            "integral": self.integral,
            "prev_error": self.prev_error,
            "prev_raw_beta": self.prev_raw_beta,
            "beta": self.beta,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"integral", "prev_error", "prev_raw_beta", "beta", "steps"}
        if set(state) != expected:
            raise ValueError(f"PID state: expected keys {sorted(expected)}, got {sorted(state)}")
        self.integral = float(state["integral"])
        self.prev_error = None if state["prev_error"] is None else float(state["prev_error"])
        self.prev_raw_beta = float(state["prev_raw_beta"])
        self.beta = float(state["beta"])
        self.steps = int(state["steps"])
