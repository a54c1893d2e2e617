"""What one training step optimises: the strategies the trainer can be run with.

Every strategy is a ``Stateful``: ``state_dict()`` is exactly what it exports into the
per-rank part of a step checkpoint (its bookkeeping lists and running sums; nothing else in
it is state), ``load_state_dict`` takes exactly those keys back (a missing or unknown key is
an error, so a renamed field can never silently drop out of checkpoints), and
``rank_local`` names the keys that only mean something for the rank layout that wrote them
(running sums), which a resharded resume starts afresh.

- ``AccuracyOnly``: pretraining, the mean per-row loss of a uniform batch.
- ``MorecStrategy``: MoRec. Before each step it takes the coordinator's decision for that
  step (beta, w, lambda, p_k version; bounded staleness) and hands new p_k to the reader;
  the step's loss is ``lambda * sum_k w_k L_k + beta * L_acc`` over the batch's blocks; after
  the step it reports the per-block loss sums and row counts (non-blocking). Under the budget
  law it measures held-out Hit of the control slice after every due step (a collective) and
  rank 0 submits it, before that step's sampler signals (``train/budget_control.py``).
- ``CombinerStrategy``: the paper's baselines as the authors run them (methods ``static``,
  ``mgda``, ``pareto_mtl``, ``epo``): everything of ``MorecStrategy`` (the coordinator's p_k
  version, the reports, the sampler updates: the data sampler keeps adapting), except that
  the step's loss combines the K+1 block means with a ``coordinator.baselines`` combiner
  instead of the PID's beta; the combiner's state is part of the strategy's.
- ``StaticWeighting`` and ``MGDAStrategy`` (methods ``static_uniform``, ``mgda_uniform``):
  loss weighting on *uniform* data, this project's earlier baselines. Each
  auxiliary objective's loss is the batch's per-row loss importance-weighted toward that
  objective's target distribution over its groups (its kind's ``baseline_target``; revenue:
  proportional to each price band's mean price; fairness, alignment and the default:
  uniform over non-empty groups),
  so every method optimises the same per-objective loss vector. Static weighting combines
  them with fixed weights; MGDA with the min-norm weights of their gradients with respect
  to the batch's scores (the shared representation, MGDA-UB of Sener & Koltun 2018),
  recomputed every step.

Under TorchRec's ``TrainPipelineSparseDist`` (``train/pipelined.py``) batch t is drawn during
step t - 2 and the step's loss gets one backward: a strategy says ``pipeline_exact = True`` when
that changes nothing it computes (its draws do not depend on its own steps); the others give
their ``pipeline_refusal`` and run the plain loop.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from morec_dist.coordinator.baselines import Combiner
from morec_dist.coordinator.client import RankClient
from morec_dist.coordinator.combined_loss import block_means, block_sums, combined_loss
from morec_dist.coordinator.core import Decision
from morec_dist.coordinator.mgda import min_norm_weights
from morec_dist.coordinator.objectives import kind_of
from morec_dist.coordinator.sampler import GroupStats
from morec_dist.data.batch import Batch
from morec_dist.data.dataset import PreparedDataset
from morec_dist.train.budget_control import BudgetControl
from morec_dist.train.job_state import check_state_keys


class AccuracyOnly:
    """Pretraining: the mean per-row loss of a uniform batch."""

    name = "accuracy"
    rank_local: tuple[str, ...] = ()
    pipeline_exact = True  # uniform draws, no hooks

    def before_step(self, step: int) -> None:
        pass

    def step_loss(self, scores: torch.Tensor, per_row: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        return per_row.mean()

    def after_step(self, per_row: torch.Tensor, batch: Batch, step: int) -> None:
        pass

    def epoch_summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, ())


class MorecStrategy:
    name = "morec"
    rank_local: tuple[str, ...] = ()  # rank 0's lists are the job's, whatever the world size
    pipeline_exact = False
    pipeline_refusal = (
        "batch t is drawn with MoRec's p_k of coordinator decision t (taken in before_step(t): the version "
        "decided after step t - max(staleness, 1), beta from reports through t - staleness), but the "
        "pipeline draws batch t during step t - 2, before that step's report; and the sampler signals and "
        "budget measurements of after_step evaluate the model while the pipeline holds its sharded forwards"
    )

    def __init__(
        self,
        client: RankClient,
        reader: Any,
        num_blocks: int,
        sampler_every: int,
        measure_signals: Any,
        submits: bool,
        control: BudgetControl | None = None,
    ):
        self.client = client
        # the budget law's held-out measurements (train/budget_control.py); None: the paper's law
        self.control = control
        self.reader = reader
        self.num_blocks = num_blocks
        self.sampler_every = sampler_every
        self.measure_signals = measure_signals  # step -> {objective: signal}; a collective
        self.submits = submits  # one rank submits the (identical) reduced signals
        self.sampler_updates: list[dict[str, Any]] = []
        self.block_names = ["accuracy"] + [name for name, _ in reader.objectives]
        self.staleness_steps = 0
        self.last_report_s = 0.0
        self.last_waited = False
        self.decision: Decision | None = None  # this step's, taken in before_step
        self.trace: list[tuple[int, float, int]] = []  # (step, beta used, p version used)

    def before_step(self, step: int) -> None:
        waits = self.client.waits
        decision = self.client.decision_for_step(step)
        self.last_waited = self.client.waits > waits
        self.staleness_steps = step - decision.pid_through if decision.pid_through >= 0 else step + 1
        if decision.p_version != self.reader.version:
            self.reader.set_probabilities(decision.p_version, decision.probabilities)
        self.decision = decision

    def step_loss(self, scores: torch.Tensor, per_row: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        d = self.decision
        assert d is not None, "step_loss before before_step"
        if batch.version != d.p_version:
            raise RuntimeError(f"step {step}: batch drawn with p version {batch.version}, decision says {d.p_version}")
        loss = self.combine(scores, per_row, batch, d)
        self.trace.append((step, d.beta, d.p_version))
        return loss

    def combine(self, scores: torch.Tensor, per_row: torch.Tensor, batch: Batch, d: Decision) -> torch.Tensor:
        """The step's loss from its rows: MoRec's ``lam * sum w_k L_k + beta * L_acc``."""
        return combined_loss(per_row, batch.block_ids, d.beta, d.block_weights(), d.lam)[0]

    def after_step(self, per_row: torch.Tensor, batch: Batch, step: int) -> None:
        sums, counts = block_sums(per_row, batch.block_ids, self.num_blocks)
        started = time.perf_counter()
        self.client.report(step, sums.tolist(), counts.tolist())
        self.last_report_s = time.perf_counter() - started
        if self.control is not None and self.control.due(step):
            hit = self.control.measure(step)  # a collective; before the sampler's (it reads the safety rule)
            if self.submits:
                self.client.submit_measurement(step, hit)
        if self.sampler_every and (step + 1) % self.sampler_every == 0:
            signals = self.measure_signals(step)
            if self.submits:
                version = self.client.submit_signals(step, signals)
                self.sampler_updates.append({"after_step": step, "version": version, "signals": signals})

    def epoch_summary(self) -> dict[str, Any]:
        return {"coordinator": self.client.stats()}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler_updates": list(self.sampler_updates), "trace": [list(t) for t in self.trace]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, ("sampler_updates", "trace"))
        self.sampler_updates = list(state["sampler_updates"])
        self.trace = [(int(s), float(b), int(v)) for s, b, v in state["trace"]]


class CombinerStrategy(MorecStrategy):
    """MoRec's sampled blocks and sampler updates, the K+1 block losses combined by ``combiner``.

    The coordinator still aggregates the reports and runs its PID (its beta is recorded in
    the trace, unused); only the combination of the block losses is swapped, as in the
    authors' ``Trainer._objective_control``. Gradient-based combiners differentiate the block
    losses with respect to the batch's scores (``coordinator/baselines.py`` says what that
    implies); their Gram matrices are summed over the default process group, so every rank
    uses the same weights.
    """

    def __init__(self, combiner: Combiner, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.combiner = combiner
        self.name = combiner.name

    def combine(self, scores: torch.Tensor, per_row: torch.Tensor, batch: Batch, d: Decision) -> torch.Tensor:
        return self.combiner.combine(block_means(per_row, batch.block_ids, self.num_blocks), scores)[0]

    def epoch_summary(self) -> dict[str, Any]:
        return {**super().epoch_summary(), **self.combiner.epoch_summary()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "combiner": self.combiner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, ("sampler_updates", "trace", "combiner"))
        super().load_state_dict({k: state[k] for k in ("sampler_updates", "trace")})
        self.combiner.load_state_dict(state["combiner"])


def objective_row_weights(dataset: PreparedDataset, objectives: list[Any]) -> list[np.ndarray]:
    """Per objective, a weight per item_id turning uniform rows into that objective's target.

    The target over groups is the objective kind's ``baseline_target`` (registry
    ``OBJECTIVE_KINDS``). weight(item) = target[g] / share[g] for the item's group g, where
    share is the group's share of training rows; the mean weight over training rows is then 1.
    """
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    weights = []
    for i, objective in enumerate(objectives):
        where = f"morec.objectives[{i}] ({objective.name})"
        column = objective.group_column
        kind = kind_of(objective.kind, where)
        options = kind.resolve_options({k: v for k, v in objective.options.items() if k != "alpha"}, where)
        counts = dataset.train_counts(column).astype(np.float64)
        share = counts / counts.sum()
        target = np.asarray(kind.baseline_target(column, stats, options, where), dtype=np.float64)
        target = target / target.sum()
        per_group = np.where(share > 0, target / np.where(share > 0, share, 1.0), 0.0)
        by_item = np.zeros(dataset.num_items + 1)
        by_item[1:] = per_group[dataset.item_column(column)[1:] - 1]
        weights.append(by_item)
    return weights


class _ObjectiveLosses:
    """The per-objective loss vector [L_acc, L_1..L_K] of a uniform batch."""

    def __init__(self, dataset: PreparedDataset, objectives: list[Any]):
        self.names = ["accuracy"] + [o.name for o in objectives]
        self.tables = [torch.from_numpy(w).to(torch.float32) for w in objective_row_weights(dataset, objectives)]

    def losses(self, per_row: torch.Tensor, batch: Batch) -> torch.Tensor:
        positives = batch.item_ids[:, 0].cpu()
        rows = [per_row.mean()]
        for table in self.tables:
            rows.append((per_row * table[positives].to(per_row.device)).mean())
        return torch.stack(rows)


def _load_sums(owner: str, state: dict[str, Any], sums: str) -> tuple[torch.Tensor, int]:
    check_state_keys(owner, state, (sums, "steps"))
    return torch.tensor(state[sums], dtype=torch.float64), int(state["steps"])


class StaticWeighting:
    name = "static"
    rank_local: tuple[str, ...] = ("sums", "steps")  # this rank's running sums of the epoch
    pipeline_exact = True  # uniform draws; the loss is a fixed function of the batch's rows

    def __init__(self, dataset: PreparedDataset, objectives: list[Any], weights: list[float]):
        self.objective_losses = _ObjectiveLosses(dataset, objectives)
        if len(weights) != len(self.objective_losses.names):
            raise ValueError(
                f"static weights: expected {len(self.objective_losses.names)} (accuracy first), got {len(weights)}"
            )
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.sums = torch.zeros(len(weights), dtype=torch.float64)
        self.steps = 0

    def before_step(self, step: int) -> None:
        pass

    def step_loss(self, scores, per_row, batch, step):
        losses = self.objective_losses.losses(per_row, batch)
        self.sums += losses.detach().to(torch.float64).cpu()
        self.steps += 1
        return (self.weights.to(losses.device) * losses).sum()

    def after_step(self, per_row, batch, step):
        pass

    def epoch_summary(self):
        means = (self.sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        return {"objective_losses": dict(zip(self.objective_losses.names, means, strict=True))}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.steps = _load_sums(self.name, state, "sums")


class MGDAStrategy:
    name = "mgda"
    rank_local: tuple[str, ...] = ("alpha_sums", "steps")  # this rank's running sums of the epoch
    # uniform draws; the per-objective gradients are taken with respect to the batch's scores
    # inside step_loss (the pipeline's forward), so the parameters still get one backward
    pipeline_exact = True

    def __init__(self, dataset: PreparedDataset, objectives: list[Any]):
        self.objective_losses = _ObjectiveLosses(dataset, objectives)
        self.alpha_sums = torch.zeros(len(self.objective_losses.names), dtype=torch.float64)
        self.steps = 0
        self.step_weights: list[list[float]] = []  # each step's weights this epoch (the same on every rank)

    def before_step(self, step: int) -> None:
        pass

    def step_loss(self, scores, per_row, batch, step):
        losses = self.objective_losses.losses(per_row, batch)
        grads = torch.stack(
            [torch.autograd.grad(loss, scores, retain_graph=True)[0].reshape(-1) for loss in losses]
        ).to(torch.float64)
        # Ranks hold disjoint rows, so the global Gram matrix is the sum of the local ones:
        # every rank then solves the same min-norm problem and uses the same weights.
        gram = grads @ grads.T
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(gram)
        alpha = torch.as_tensor(min_norm_weights(gram.cpu().numpy()), dtype=losses.dtype, device=losses.device)
        self.alpha_sums += alpha.detach().to(torch.float64).cpu()
        self.steps += 1
        self.step_weights.append([float(a) for a in alpha.detach().cpu()])
        return (alpha.detach() * losses).sum()

    def after_step(self, per_row, batch, step):
        pass

    def epoch_summary(self):
        means = (self.alpha_sums / max(self.steps, 1)).tolist()
        per_step, self.step_weights = self.step_weights, []
        self.alpha_sums.zero_()
        self.steps = 0
        return {
            "mgda_mean_weights": dict(zip(self.objective_losses.names, means, strict=True)),
            "mgda_step_weights": per_step,  # accuracy first, then morec.objectives in order
        }

    def state_dict(self) -> dict[str, Any]:
        return {"alpha_sums": self.alpha_sums.tolist(), "steps": self.steps, "step_weights": self.step_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, ("alpha_sums", "steps", "step_weights"))
        self.alpha_sums = torch.tensor(state["alpha_sums"], dtype=torch.float64)
        self.steps = int(state["steps"])
        self.step_weights = [[float(a) for a in w] for w in state["step_weights"]]
