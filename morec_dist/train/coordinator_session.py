"""A coordinated fine-tuning's session with the coordinator: the spec, the sampled reader,
the validation-signal measure and the rank's client, opened once per job.

``open_session`` is what every method on MoRec's sampled blocks (``morec`` and the
paper's baselines in ``train/methods.py``) starts from:

1. the ``CoordinatorSpec`` from the config, the data's group statistics and l_hat
   (``coordinator/core.py``; the sampler's per-epoch cadence needs the steps per epoch);
2. the sampler's signal measure (``eval/signals.py`` on the seeded validation sample, a
   collective), and with ``morec.sampler.update_at_start`` the first p update made from the
   pretrained model before the first step (version 0 is then that distribution);
3. this rank's reader of the K+1 blocks, whose version 0 is the coordinator's;
4. the client of ``coordinator.protocol``: ``global`` (gloo groups on every rank, rank 0
   joins Ray) or ``per_rank`` (every rank joins Ray), configured with the checkpoint's
   coordinator state on a resume.

The strategy is the method's (``CoordinatedSession.strategy``); this module never names one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morec_dist.config import Config, ConfigError, check_per_rank_fits
from morec_dist.coordinator.client import RankClient
from morec_dist.coordinator.collective import GlobalCoordinatorClient, new_groups
from morec_dist.coordinator.core import CoordinatorSpec, build_spec
from morec_dist.coordinator.objectives import ObjectiveError, SignalRequest
from morec_dist.coordinator.sampler import GroupStats, SamplerError, SamplerState
from morec_dist.coordinator.service import connect_ray, open_coordinator
from morec_dist.data.reader import Reader, batch_sizes
from morec_dist.distributed import DistContext
from morec_dist.eval.ranking import EvaluationInterrupted
from morec_dist.eval.signals import SignalOptions, compute_signals
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

    def strategy(self, make: StrategyFactory) -> MorecStrategy:
        """The method's strategy on this session; rank 0's records the start update."""
        strategy = make(
            self.client, self.reader, self.spec.objectives.num_blocks, self.sampler_every, self.measure,
            submits=self.submits,
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


def coordinator_spec(config: Config, trainer: Trainer, target_loss: float) -> CoordinatorSpec:
    """The spec of this job's coordinator (a bad objective entry: ``ConfigError``)."""
    dataset = trainer.dataset
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    try:
        return build_spec(
            config,
            stats,
            world_size=reporters(config, trainer.ctx),
            target_loss=target_loss,
            steps_per_epoch=steps_per_epoch(config, trainer),
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

    def measure(step: int) -> Signals:
        try:
            return compute_signals(requests, trainer.model, trainer.dataset, trainer.features, trainer.ctx, options)
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


def open_session(
    config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None
) -> CoordinatedSession:
    """Spec, signals, reader and client of a coordinated method, in the order the ranks'
    collectives need (the start update's signals before any coordinator group exists)."""
    spec = coordinator_spec(config, trainer, target_loss)
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
    )
