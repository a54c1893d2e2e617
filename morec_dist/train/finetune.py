"""``morec finetune``: continue a pretrained model with MoRec, or with a baseline.

Methods (``--method``, the registry ``morec_dist.train.methods.METHODS``):
- ``morec``: MoRec batches (a uniform accuracy block + one block per auxiliary objective,
  drawn from the coordinator's p_k), the combined loss with the coordinator's beta,
  per-block loss sums reduced over the ranks and reported by rank 0 to the central Ray
  actor (``coordinator.protocol = "global"``; ``"per_rank"``: every rank reports, the
  benchmark baseline), sampler updates from validation signals on the configured cadence;
- ``static``, ``mgda``, ``pareto_mtl``, ``epo``: the paper's baselines, MoRec's sampled blocks
  and sampler with only the combination of the K+1 block losses swapped (``CombinerStrategy``);
- ``static_uniform``, ``mgda_uniform``: uniform batches, the objective losses importance-weighted
  toward their targets, fixed or MGDA's min-norm weights.
Every method evaluates on valid after each epoch and on test at the end, writing
``metrics.json`` (for MoRec with the beta / loss trace and the coordinator's history). Under
the budget law (``morec.pid.law = "budget"``) it also records ``budget``: the set point and
the selection slice's Hit before and after, and whether the budget held there
(``train/budget_control.py``).

The skeleton (setup, resume, the epoch loop with its step checkpoints, the final record)
is ``morec_dist.train.runner``'s; this module is the ``FinetuneJob``'s hooks. For MoRec the
step checkpoints include the coordinator's state, which a resumed job configures the actor
with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.distributed as dist

from morec_dist.config import Config
from morec_dist.coordinator.client import RankClient
from morec_dist.coordinator.core import CoordinatorError
from morec_dist.coordinator.objectives import headline_metrics
from morec_dist.data import storage
from morec_dist.distributed import all_reduce_sum
from morec_dist.eval.metrics import metric_key
from morec_dist.train.budget_control import BudgetControl, budget_record, selection_key
from morec_dist.train.checkpoint import checkpoint_root, save_checkpoint
from morec_dist.train.loop import progress
from morec_dist.train.methods import METHODS
from morec_dist.train.run_dir import provenance
from morec_dist.train.runner import JobParts, JobRun, evaluation, load_pretrained, report_k, run_job
from morec_dist.train.trainer import EpochStats, Trainer

COORDINATOR_CHECKPOINT_TRIES = 3


def coordinator_checkpoint(client: RankClient, trainer: Trainer) -> dict[str, Any] | None:
    """Every rank's reports recorded (flush + barrier), then the coordinator's state: it
    holds every step < trainer.step. Each client keeps it as the base of a recovery.

    A coordinator that died and was restored by one rank inside this window may lack
    another rank's reports; the ranks check that the state is complete (every step < N
    aggregated, nothing pending), and otherwise each replays its log and they retry."""
    ctx = trainer.ctx
    fetches = client.holds_state
    for _ in range(COORDINATOR_CHECKPOINT_TRIES):
        client.flush()
        if dist.is_initialized():
            dist.barrier(group=ctx.pg)
        state = client.state_dict() if fetches else None
        complete = state is None or (state["aggregated_through"] == trainer.step - 1 and not state["pending"])
        if all_reduce_sum([0.0 if complete else 1.0], ctx)[0] == 0:  # also the barrier before step N
            client.mark_checkpoint(state, trainer.step)
            return state
        client.resync()
    raise CoordinatorError(
        f"step {trainer.step}: the coordinator state stayed incomplete after {COORDINATOR_CHECKPOINT_TRIES} tries"
    )


def coordinator_record(client: RankClient, strategy: Any) -> dict[str, Any]:
    """The coordinator's trace (beta, global losses per step), history, and this rank's waits."""
    return {
        "trace": client.trace(),
        "history": client.history(),
        "state": client.state_dict(),
        "client": client.stats(),
        "sampler_updates": strategy.sampler_updates,
    }


class FinetuneJob:
    def __init__(self, config: Config, from_checkpoint: str | Path, method: str):
        self.method = METHODS.get(method)
        self.name = method
        self.kind = f"finetune:{method}"
        self.tag = f"[{method}]"
        self.from_checkpoint = storage.location(from_checkpoint)
        self.from_arg = str(from_checkpoint)  # recorded as given
        self.k = report_k(config)
        self.headline = headline_metrics([o.kind for o in config.morec.objectives])
        self.target_loss = 0.0

    def epochs(self, config: Config) -> int:
        return config.morec.epochs

    def build(self, run: JobRun) -> JobParts:
        meta = load_pretrained(run.trainer, self.from_checkpoint)
        self.target_loss = run.config.morec.pid.target_loss or float(meta["train_loss"])
        reader, strategy, client = self.method.build(run.config, run.trainer, self.target_loss, run.point)
        run.checkpoints.preemption.install()  # ray.init (a coordinated method) replaces the SIGTERM handler
        coordinator = (lambda: coordinator_checkpoint(client, run.trainer)) if client is not None else None
        return JobParts(reader, strategy, client=client, coordinator=coordinator)

    def before_training(self, run: JobRun) -> None:
        run.state.before = evaluation(run.trainer, "valid")
        control = self._budget_control(run)
        if control is not None:  # the selection slice's Hit of the pretrained model (a collective)
            run.state.before[selection_key(control)] = control.selection_hit("before fine-tuning")

    def _budget_control(self, run: JobRun) -> BudgetControl | None:
        """The budget law's slices (``train/budget_control.py``), when the method runs it."""
        return getattr(run.parts.strategy, "control", None) if run.parts is not None else None

    def end_epoch(self, run: JobRun, epoch: int, stats: EpochStats, valid: dict[str, float]) -> None:
        run.state.history.append(
            {
                "epoch": epoch,
                "train_loss": stats.mean_loss,
                "rows_per_s": stats.rows_per_s,
                "valid": valid,
                **stats.extra,
            }
        )
        progress(run.ctx.rank, f"{self.tag} epoch {epoch} loss {stats.mean_loss:.4f} valid {self._line(valid)}")

    def _line(self, m: dict[str, Any]) -> str:
        """Each objective's headline metric at K (accuracy's first), as its kind names it."""
        return " ".join(f"{key} {m[key]:.4f}" for key in (metric_key(name, self.k) for name in self.headline))

    def finish(self, run: JobRun) -> dict[str, Any]:
        c, ctx, trainer, parts = run.config, run.ctx, run.trainer, run.parts
        assert parts is not None
        coordinator_out: dict[str, Any] = {}
        client = parts.client
        if client is not None:
            client.close()
            coordinator_out = (
                coordinator_record(client, parts.strategy) if client.holds_state else {"client": client.stats()}
            )
        final = checkpoint_root(c.run.out_dir, c.checkpoint.dir) / "final"
        save_checkpoint(
            final,
            trainer.model_state(),
            {
                "model": trainer.model_identity(),
                "step": trainer.step,
                "method": self.name,
                "from": self.from_arg,
                **provenance(c, ctx.world_size),
            },
        )
        test = evaluation(trainer, "test")
        budget = {}
        control = self._budget_control(run)
        before = (run.state.before or {}).get(selection_key(control)) if control is not None else None
        if control is not None and before is not None:
            after = control.selection_hit("after fine-tuning")  # a collective, every rank alike
            budget = {"budget": budget_record(c, control, before, after)}
        return {
            **test,
            **budget,
            "split": "test",
            "job": self.kind,
            "from_checkpoint": self.from_arg,
            "target_loss": self.target_loss,
            "valid_before": run.state.before,
            "history": run.state.history,
            "coordinator": coordinator_out,
        }

    def final_line(self, result: dict[str, Any]) -> str:
        return f"{self.tag} test {self._line(result)}"


def run_finetune(
    config: Config, from_checkpoint: str | Path, method: str = "morec", resume: bool | None = None
) -> dict[str, Any]:
    job = FinetuneJob(config, from_checkpoint, method)  # an unknown method fails before any collective
    if config.morec.embedding_lr:
        config = dataclasses.replace(
            config, optim=dataclasses.replace(config.optim, embedding_lr=config.morec.embedding_lr)
        )
    return run_job(config, job, resume)
