"""The accuracy-weight laws, by name: the only list of ``morec.pid.law`` values.

- ``paper``: MOREC.md's PID on the global training loss of the accuracy block, once per
  step (``coordinator/pid.py``, unchanged, for reproducing the paper);
- ``budget``: a PI controller on held-out Hit@K of a control slice of validation users,
  measured on a cadence of its own, holding it within ``morec.accuracy_budget`` of the
  pretrained model's (``coordinator/budget.py``).

An entry says whether the law is *measured*: the coordinator then waits, for the decisions
it depends on, for held-out measurements on ``morec.control.every_steps`` (as it waits for the
sampler's signals), and the trainer takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from morec_dist.registry import Registry


@dataclass(frozen=True)
class ControlLaw:
    measured: bool  # driven by held-out measurements on a cadence, not by the step losses
    summary: str


CONTROL_LAWS: Registry[ControlLaw] = Registry("control law", "morec.pid.law")
CONTROL_LAWS.register("paper", ControlLaw(False, "PID on the accuracy block's training loss (MOREC.md)"))
CONTROL_LAWS.register("budget", ControlLaw(True, "PI on held-out Hit@K within morec.accuracy_budget"))


def is_measured(law: str) -> bool:
    return CONTROL_LAWS.get(law).measured
