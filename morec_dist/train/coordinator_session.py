"""A coordinated fine-tuning's session with the coordinator: the spec, the sampled reader,
the validation-signal measure and the rank's client, opened once per job.

``open_session`` is what every method on MoRec's sampled blocks (``morec`` and the
paper's baselines in ``train/methods.py``) starts from:

1. the ``CoordinatorSpec`` from the config, the data's group statistics and l_hat
   (``coordinator/core.py``; the sampler's per-epoch cadence needs the steps per epoch);
2. under the budget law (``morec.pid.law = "budget"``), the validation users' control and
   selection slices (``train/budget_control.py``) and the pretrained model's control-slice
   Hit, the set point's reference: measured before the first step (a collective), or read
   from the checkpoint's coordinator state on a resume; the baselines on the same blocks run
   the paper's law, whose beta they never read, and measure nothing;
3. the sampler's signal measure (``eval/signals.py`` on the seeded validation sample, a
   collective), and with ``morec.sampler.update_at_start`` the first p update made from the
   pretrained model before the first step (version 0 is then that distribution);
4. this rank's reader of the K+1 blocks, whose version 0 is the coordinator's;
5. the client of ``coordinator.protocol``: ``global`` (gloo groups on every rank, rank 0
   joins Ray) or ``per_rank`` (every rank joins Ray), configured with the checkpoint's
   coordinator state on a resume.

The strategy is the method's (``CoordinatedSession.strategy``); this module never names one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morec_dist.config import Config, ConfigError, check_per_rank_fits
from morec_dist.coordinator.client import RankClient
from morec_dist.coordinator.collective import GlobalCoordinatorClient, new_groups
from morec_dist.coordinator.core import CoordinatorError, CoordinatorSpec, build_spec, reference_accuracy_of
from morec_dist.coordinator.objectives import ObjectiveError, SignalRequest
from morec_dist.coordinator.sampler import GroupStats, SamplerError, SamplerState
from morec_dist.coordinator.service import connect_ray, open_coordinator
from morec_dist.data.reader import Reader, batch_sizes
from morec_dist.distributed import DistContext
from morec_dist.eval.ranking import EvaluationInterrupted
from morec_dist.eval.signals import SignalOptions, compute_signals, signal_sample
from morec_dist.train.budget_control import BudgetControl, open_budget_control, uses_budget
from morec_dist.train.preemption import exit_interrupted, sigterm_requested
from morec_dist.train.resume import ResumePoint, coordinator_state_for
from morec_dist.train.runner import make_reader
from morec_dist.train.strategies import MorecStrategy
from morec_dist.train.trainer import Trainer

Signals = dict[str, list[float]]
# (client, reader, num_blocks, sampler_every, measure, submits=...) -> the method's strategy
StrategyFactory = Callable[..., MorecStrategy]


@dataclass
class CoordinatedSession:
    """What a coordinated method trains with, before its strategy exists."""

    spec: CoordinatorSpec
    reader: Reader
    client: RankClient
    measure: Callable[[int], Signals]  # step -> the reduced signals; a collective
    sampler_every: int  # 0: no adaptive objective, no signal updates
    submits: bool  # the one rank that submits the (identical) reduced signals
    start_update: dict[str, Any] | None = None  # the update made before the first step
    control: BudgetControl | None = None  # the budget law's measurements; None: the paper's law

    def strategy(self, make: StrategyFactory) -> MorecStrategy:
        """The method's strategy on this session; rank 0's records the start update."""
        strategy = make(
            self.client, self.reader, self.spec.objectives.num_blocks, self.sampler_every, self.measure,
            submits=self.submits, control=self.control,
        )  # fmt: skip
        if self.start_update is not None and self.submits:
            strategy.sampler_updates.append(self.start_update)
        return strategy


def steps_per_epoch(config: Config, trainer: Trainer) -> int:
    """Batches per epoch on each rank (the same on every rank), without opening a reader."""
    rows = trainer.dataset.split_rows("train")
    return len(batch_sizes(rows, config.data.batch_size, trainer.ctx.world_size, trainer.ctx.rank))


def reporters(config: Config, ctx: DistContext) -> int:
    """The core's reporters: every rank (``per_rank``), or rank 0 with the reduced sums."""
    if config.coordinator.protocol == "per_rank":
        check_per_rank_fits(ctx.world_size, config.coordinator.staleness)
        return ctx.world_size
    return 1


def coordinator_spec(
    config: Config, trainer: Trainer, target_loss: float, law: str | None = None, reference: float | None = None
) -> CoordinatorSpec:
    """The spec of this job's coordinator (a bad objective entry: ``ConfigError``); ``law``
    overrides ``morec.pid.law``, ``reference`` is the budget law's pretrained held-out Hit."""
    dataset = trainer.dataset
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    try:
        return build_spec(
            config,
            stats,
            world_size=reporters(config, trainer.ctx),
            target_loss=target_loss,
            steps_per_epoch=steps_per_epoch(config, trainer),
            reference_accuracy=reference,
            law=law,
        )
    except (ObjectiveError, SamplerError) as exc:
        raise ConfigError(f"morec.objectives: {exc}") from None


def signal_measure(config: Config, trainer: Trainer, requests: list[SignalRequest]) -> Callable[[int], Signals]:
    """step -> the signals of ``requests`` on the validation sample; a SIGTERM during it
    ends the job as interrupted (a collective: every rank calls it)."""
    options = SignalOptions(
        num_negatives=config.data.num_negatives,
        negative_alpha=config.data.negative_alpha,
        seed=config.run.seed,
        users=config.morec.sampler.validation_users,
        batch_users=config.eval.batch_users,
        loss_fn=trainer.loss_fn,
        stop=sigterm_requested,
    )

    # loaded at the first update, reused at every update (the same users and negatives)
    sample = functools.cache(lambda: signal_sample(trainer.dataset, trainer.ctx, options))

    def measure(step: int) -> Signals:
        try:
            return compute_signals(
                requests, trainer.model, trainer.dataset, trainer.features, trainer.ctx, options, sample()
            )
        except EvaluationInterrupted:
            exit_interrupted(trainer.ctx, f"the sampler's signal update after step {step}")

    return measure


def start_probabilities(spec: CoordinatorSpec, signals: Signals) -> CoordinatorSpec:
    """``spec`` with one sampler step already applied to its initial p_k: the authors' first
    p update, made from the pretrained model's validation signals before the first step
    (``morec.sampler.update_at_start``). Version 0 is then that distribution."""
    objectives = spec.objectives
    sampler = SamplerState(objectives.initial_probabilities(), {o.name: o.alpha for o in objectives.objectives})
    updated = sampler.step(objectives.signs(signals))
    moved = [
        dataclasses.replace(o, initial_probabilities=tuple(float(x) for x in updated[o.name]))
        for o in objectives.objectives
    ]
    return dataclasses.replace(spec, objectives=dataclasses.replace(objectives, objectives=moved))


def sampled_reader(config: Config, trainer: Trainer, spec: CoordinatorSpec) -> Reader:
    """This rank's reader of the K+1 blocks; its version 0 is the coordinator's (initial p_k)."""
    objectives = spec.objectives
    initial = {name: p.tolist() for name, p in objectives.initial_probabilities().items()}
    try:
        return make_reader(
            config,
            trainer,
            objectives=[(o.name, o.group_column, o.row_weight_column) for o in objectives.objectives],
            probabilities=initial,
        )
    except ValueError as exc:
        raise ConfigError(f"morec.objectives: {exc}") from None


def run_id(config: Config) -> str:
    """This attempt of the job, as the actor knows it (a torchelastic restart is a new run)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    job = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return f"{job}:{Path(config.run.out_dir).resolve()}:restart{restart}"


def open_client(config: Config, spec: CoordinatorSpec, ctx: DistContext, resume: ResumePoint | None) -> RankClient:
    """This rank's started client of ``coordinator.protocol``; a resumed job configures the
    actor with the checkpoint's coordinator state and starts at its step."""
    per_rank = config.coordinator.protocol == "per_rank"
    state, first_step = None, 0
    if resume is not None and resume.coordinator is not None:
        first_step = resume.step
        if per_rank or ctx.rank == 0:
            state = coordinator_state_for(resume.coordinator, reporters(config, ctx))
    if not per_rank:
        return open_global_coordinator(config, spec, ctx, run_id=run_id(config), state=state, first_step=first_step)
    connect_ray(config.coordinator.ray_address, config.coordinator.namespace)
    return open_coordinator(
        config.coordinator, spec, run_id=run_id(config), rank=ctx.rank, state=state, first_step=first_step
    )


def open_global_coordinator(
    config: Config,
    spec: CoordinatorSpec,
    ctx: DistContext,
    *,
    run_id: str,
    state: dict[str, Any] | None,
    first_step: int,
) -> GlobalCoordinatorClient:
    """The global protocol: gloo groups on every rank (a collective); only rank 0 joins Ray."""
    groups = new_groups()
    inner = None
    if ctx.rank == 0:
        connect_ray(config.coordinator.ray_address, config.coordinator.namespace)
        inner = open_coordinator(config.coordinator, spec, run_id=run_id, rank=0, state=state, first_step=first_step)
    client = GlobalCoordinatorClient(
        rank=ctx.rank,
        world_size=ctx.world_size,
        staleness=spec.staleness,
        num_blocks=spec.objectives.num_blocks,
        weight_names=list(spec.objectives.weights()),
        prob_sizes={name: len(p) for name, p in spec.objectives.initial_probabilities().items()},
        inner=inner,
        groups=groups,
    )
    client.start(first_step)
    return client


def budget_reference(control: BudgetControl, resume: ResumePoint | None) -> float:
    """The budget law's reference: the pretrained model's control-slice Hit, measured now on a
    fresh job (a collective), or the one a resumed job's coordinator state was built with."""
    if resume is None:
        return control.measure(-1)
    reference = reference_accuracy_of(resume.coordinator)
    if reference is None:
        raise CoordinatorError(
            f"{resume.path}: the checkpoint's coordinator ran no budget law (morec.pid.law = 'paper'); resume it "
            "with the law it was written with"
        )
    return reference


def open_session(
    config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None, law: str | None = None
) -> CoordinatedSession:
    """Spec, signals, reader and client of a coordinated method, in the order the ranks'
    collectives need (the budget's reference and the start update's signals before any
    coordinator group exists). ``law`` overrides ``morec.pid.law`` (the baselines: "paper")."""
    control, reference = None, None
    if uses_budget(config, law):
        control = open_budget_control(config, trainer)
        reference = control.reference = budget_reference(control, resume)
    spec = coordinator_spec(config, trainer, target_loss, law, reference)
    requests = spec.objectives.signal_requests()
    measure = signal_measure(config, trainer, requests)
    start_update = None
    # a resumed job's version 0 (and every later one) comes back with the coordinator state
    if config.morec.sampler.update_at_start and requests and resume is None:
        signals = measure(-1)  # a collective: every rank, the pretrained model
        spec = start_probabilities(spec, signals)
        start_update = {"after_step": -1, "version": 0, "signals": signals}
    reader = sampled_reader(config, trainer, spec)
    client = open_client(config, spec, trainer.ctx, resume)
    return CoordinatedSession(
        spec=spec,
        reader=reader,
        client=client,
        measure=measure,
        sampler_every=spec.sampler_every if requests else 0,
        submits=trainer.ctx.rank == 0,
        start_update=start_update,
        control=control,
    )
