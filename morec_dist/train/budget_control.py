"""The fine-tuning side of the accuracy budget (``morec.pid.law = "budget"``).

Owns what the trainer measures for the budget law (coordinator/budget.py) and what a
fine-tuning job records about it:

- the validation users' two slices (``eval/slices.py``): the **control** slice, whose held-out
  Hit@K the controller steers by, and the **selection** slice, which it never sees and on
  which the job reports whether the budget held;
- the pretrained model's control-slice Hit (the set point's reference), measured before the
  first step of a fresh job, or read back from the checkpoint's coordinator state on a resume
  (the model is no longer the pretrained one then);
- the measurement after every ``morec.control.every_steps``-th step (a collective on every
  rank; rank 0 submits it to the coordinator before any sampler update of the same step);
- the job's record: the budget, K, the set point, selection-slice Hit before and after, and
  whether the budget held there.

K is ``morec.control.k``, or ``eval.ks[0]`` when that is 0. The slices are split with
``run.seed`` (``morec.control.control_fraction`` of the users in the control slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from morec_dist.config import Config
from morec_dist.coordinator.laws import is_measured
from morec_dist.eval.ranking import EvaluationInterrupted
from morec_dist.eval.slices import HeldoutSlice
from morec_dist.train.preemption import exit_interrupted, sigterm_requested
from morec_dist.train.trainer import Trainer


def budget_k(config: Config) -> int:
    """The K of the budget's Hit@K: ``morec.control.k``, else ``eval.ks[0]``."""
    return config.morec.control.k or config.eval.ks[0]


@dataclass
class BudgetControl:
    """The two slices of this job, loaded once (every rank, its own item range)."""

    trainer: Trainer
    k: int
    every: int  # steps between control measurements
    control: HeldoutSlice
    selection: HeldoutSlice
    batch_users: int
    reference: float = 0.0  # the pretrained model's control-slice Hit (set by the session)

    def hit(self, part: HeldoutSlice, when: str) -> float:
        """Hit@K of the trainer's model on ``part`` (a collective); SIGTERM ends the job."""
        t = self.trainer
        try:
            return part.hit(t.model, t.features, t.ctx, self.k, self.batch_users, stop=sigterm_requested)
        except EvaluationInterrupted:
            exit_interrupted(t.ctx, f"the held-out accuracy measurement {when}")

    def measure(self, step: int) -> float:
        """The control slice's Hit@K after ``step`` (what the coordinator's law gets).

        Not interrupted by SIGTERM: a stop that arrives during it is taken at the next step
        boundary, which checkpoints this step. Leaving here instead would lose every step since
        the last step checkpoint, on a cadence of a few steps (the control slice is a fraction
        of the validation users, a short pass against the stop's grace period)."""
        t = self.trainer
        return self.control.hit(t.model, t.features, t.ctx, self.k, self.batch_users)

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def selection_hit(self, when: str) -> float:
        return self.hit(self.selection, when)


def open_budget_control(config: Config, trainer: Trainer) -> BudgetControl:
    """The slices of this job (every rank loads its share of their history)."""
    seed, fraction = config.run.seed, config.morec.control.control_fraction
    dataset, ctx = trainer.dataset, trainer.ctx
    return BudgetControl(
        trainer=trainer,
        k=budget_k(config),
        every=config.morec.control.every_steps,
        control=HeldoutSlice.load(dataset, ctx, "control", seed, fraction),
        selection=HeldoutSlice.load(dataset, ctx, "selection", seed, fraction),
        batch_users=config.eval.batch_users,
    )


def uses_budget(config: Config, law: str | None = None) -> bool:
    """Whether this fine-tuning's coordinator runs a measured law (``law`` overrides the config's)."""
    return is_measured(law or config.morec.pid.law)


def selection_key(control: BudgetControl) -> str:
    """The key of the selection slice's Hit in a job's ``valid_before`` record."""
    return f"selection_hit@{control.k}"


def budget_record(
    config: Config, control: BudgetControl, selection_before: float, selection_after: float
) -> dict[str, Any]:
    """What metrics.json says about the budget (the one it started with; live changes are in
    the coordinator's budget history): the set point on the control slice, and whether the
    selection slice (which the controller never saw) ended within the budget."""
    budget = config.morec.accuracy_budget
    reference = control.reference
    change = (selection_after - selection_before) / selection_before if selection_before else float("nan")
    return {
        "law": config.morec.pid.law,
        "accuracy_budget": budget,
        "k": control.k,
        "control_users": len(control.control),
        "selection_users": len(control.selection),
        "control_reference": reference,
        "setpoint": (1.0 - budget) * reference,
        "selection_before": selection_before,
        "selection_after": selection_after,
        "selection_change": change,
        "held_on_selection": bool(change >= -budget),
    }
