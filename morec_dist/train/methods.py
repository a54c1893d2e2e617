"""The fine-tuning methods, by name: the one list ``--method``, ``run.methods`` and the
fine-tuning job's dispatch read.

An entry (``Method``) builds what a method trains with: the reader, the strategy, and the
coordinator client (or None). ``morec`` is MoRec with the Ray coordinator. ``static``,
``mgda``, ``pareto_mtl`` and ``epo`` are the paper's baselines as the authors run them: the
same reader, sampler, signals and coordinator as MoRec (p_k keeps adapting), with only the
combination of the K+1 block losses swapped for a ``coordinator.baselines.COMBINERS`` entry.
``static_uniform`` and ``mgda_uniform`` are this project's earlier baselines: loss weighting
on uniform batches (importance weights toward each objective's target), no coordinator.
A new method is one
``METHODS.register(name, Method(build))`` (a plugin module may do it too): validation, CLI
choices and dispatch all read this registry.

Heavy imports (torch, Ray, the coordinator) happen inside the builders, so the CLI can list
the names without loading them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morec_dist.config import Config, ConfigError
from morec_dist.registry import Registry

if TYPE_CHECKING:
    from morec_dist.coordinator.client import CoordinatorClient
    from morec_dist.coordinator.collective import GlobalCoordinatorClient
    from morec_dist.coordinator.core import CoordinatorSpec
    from morec_dist.distributed import DistContext
    from morec_dist.train.loop import Strategy
    from morec_dist.train.resume import ResumePoint
    from morec_dist.train.strategies import MorecStrategy
    from morec_dist.train.trainer import Trainer

# (config, trainer, target_loss, resume point or None) -> (reader, strategy, coordinator client or None)
MethodBuilder = Callable[[Config, "Trainer", float, "ResumePoint | None"], tuple[Any, "Strategy", Any]]


@dataclass(frozen=True)
class Method:
    build: MethodBuilder
    # trains against the Ray coordinator: the CLI checks the objectives first and starts a
    # local Ray head when no coordinator.ray_address is given
    coordinated: bool = False


METHODS: Registry[Method] = Registry("method", "--method")


def check_methods(names: list[str], where: str = "run.methods") -> None:
    """Every name is a registered method (``ConfigError`` naming ``where`` otherwise)."""
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"{where}: {name!r} is not one of {METHODS.names()}")


# --------------------------------------------------------------------------- morec


def steps_per_epoch(config: Config, trainer: Trainer) -> int:
    """Batches per epoch on each rank (the same on every rank), without opening a reader."""
    from morec_dist.data.reader import batch_sizes

    rows = trainer.dataset.split_rows("train")
    return len(batch_sizes(rows, config.data.batch_size, trainer.ctx.world_size, trainer.ctx.rank))


def start_probabilities(spec: CoordinatorSpec, signals: dict[str, list[float]]) -> CoordinatorSpec:
    """``spec`` with one sampler step already applied to its initial p_k: the authors' first
    p update, made from the pretrained model's validation signals before the first step
    (``morec.sampler.update_at_start``). Version 0 is then that distribution."""
    import dataclasses

    from morec_dist.coordinator.sampler import SamplerState

    objectives = spec.objectives
    sampler = SamplerState(objectives.initial_probabilities(), {o.name: o.alpha for o in objectives.objectives})
    updated = sampler.step(objectives.signs(signals))
    moved = [
        dataclasses.replace(o, initial_probabilities=tuple(float(x) for x in updated[o.name]))
        for o in objectives.objectives
    ]
    return dataclasses.replace(spec, objectives=dataclasses.replace(objectives, objectives=moved))


def build_sampled(
    config: Config,
    trainer: Trainer,
    target_loss: float,
    resume: ResumePoint | None,
    make_strategy: Callable[..., MorecStrategy],
):
    """Reader, coordinator client and strategy of a method that trains on MoRec's sampled
    blocks; ``make_strategy(client, reader, num_blocks, sampler_every, measure, submits=...)``."""
    from morec_dist.config import check_per_rank_fits
    from morec_dist.coordinator.core import build_spec
    from morec_dist.coordinator.objectives import ObjectiveError
    from morec_dist.coordinator.sampler import GroupStats, SamplerError
    from morec_dist.coordinator.service import connect_ray, open_coordinator
    from morec_dist.eval.ranking import EvaluationInterrupted
    from morec_dist.eval.signals import SignalOptions, compute_signals
    from morec_dist.train.preemption import exit_interrupted, sigterm_requested
    from morec_dist.train.resume import coordinator_state_for
    from morec_dist.train.runner import make_reader

    ctx, dataset = trainer.ctx, trainer.dataset
    stats = GroupStats.from_manifest(dataset.manifest, dataset.path)
    per_rank = config.coordinator.protocol == "per_rank"
    if per_rank:
        check_per_rank_fits(ctx.world_size, config.coordinator.staleness)
    # the global protocol's core has one reporter (rank 0, with the reduced sums)
    reporters = ctx.world_size if per_rank else 1
    try:
        spec = build_spec(
            config,
            stats,
            world_size=reporters,
            target_loss=target_loss,
            steps_per_epoch=steps_per_epoch(config, trainer),
        )
    except (ObjectiveError, SamplerError) as exc:
        raise ConfigError(f"morec.objectives: {exc}") from None
    requests = spec.objectives.signal_requests()
    signal_options = SignalOptions(
        num_negatives=config.data.num_negatives,
        negative_alpha=config.data.negative_alpha,
        seed=config.run.seed,
        users=config.morec.sampler.validation_users,
        batch_users=config.eval.batch_users,
        loss_fn=trainer.loss_fn,
        stop=sigterm_requested,
    )

    def measure(step: int) -> dict[str, list[float]]:
        try:
            return compute_signals(requests, trainer.model, dataset, trainer.features, ctx, signal_options)
        except EvaluationInterrupted:
            exit_interrupted(ctx, f"the sampler's signal update after step {step}")

    start_update = None
    # a resumed job's version 0 (and every later one) comes back with the coordinator state
    if config.morec.sampler.update_at_start and requests and resume is None:
        signals = measure(-1)  # a collective: every rank, the pretrained model
        spec = start_probabilities(spec, signals)
        start_update = {"after_step": -1, "version": 0, "signals": signals}
    # the reader's version 0 is the coordinator's version 0 (its initial p_k)
    initial = {name: p.tolist() for name, p in spec.objectives.initial_probabilities().items()}
    try:
        reader = make_reader(
            config,
            trainer,
            objectives=[(o.name, o.group_column, o.row_weight_column) for o in spec.objectives.objectives],
            probabilities=initial,
        )
    except ValueError as exc:
        raise ConfigError(f"morec.objectives: {exc}") from None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}:{Path(config.run.out_dir).resolve()}:restart{restart}"
    state, first_step = None, 0
    if resume is not None and resume.coordinator is not None:
        first_step = resume.step
        if per_rank or ctx.rank == 0:
            state = coordinator_state_for(resume.coordinator, reporters)
    client: CoordinatorClient | GlobalCoordinatorClient
    if per_rank:
        connect_ray(config.coordinator.ray_address, config.coordinator.namespace)
        client = open_coordinator(
            config.coordinator, spec, run_id=run_id, rank=ctx.rank, state=state, first_step=first_step
        )
    else:
        client = open_global_coordinator(config, spec, ctx, run_id=run_id, state=state, first_step=first_step)

    strategy = make_strategy(
        client,
        reader,
        spec.objectives.num_blocks,
        spec.sampler_every if requests else 0,
        measure,
        submits=ctx.rank == 0,
    )
    if start_update is not None and ctx.rank == 0:
        strategy.sampler_updates.append(start_update)
    return reader, strategy, client


def build_morec(config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None = None):
    from morec_dist.train.strategies import MorecStrategy

    return build_sampled(config, trainer, target_loss, resume, MorecStrategy)


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
    from morec_dist.coordinator.collective import GlobalCoordinatorClient, new_groups
    from morec_dist.coordinator.service import connect_ray, open_coordinator

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


# ----------------------------------------------------------------------- baselines


def static_weights(config: Config) -> list[float]:
    """The fixed weights over [L_acc, L_1..L_K]: accuracy 1, objective k lambda * w_k.

    MoRec's loss ``lam * sum w_k L_k + beta * L_acc`` with beta frozen at 1, so static and
    MoRec at the same w and lambda differ only by the PID (beta's nominal value: it starts
    near beta_min and the controller raises it toward 1 and above when accuracy drifts)."""
    return [1.0] + [config.morec.lam * o.weight for o in config.morec.objectives]


def combiner_options(name: str, config: Config) -> dict[str, Any]:
    """Each baseline's preference from the same weights as ``static`` (``static_weights``)."""
    v = static_weights(config)
    if name == "static":
        return {"weights": v}
    if name == "pareto_mtl":
        # v's direction as the chosen sub-region, bounded by the default preference set
        from morec_dist.coordinator.pareto_solvers import preference_vectors

        return {"preferences": [v, *preference_vectors(len(v)).tolist()], "preference_id": 0}
    if name == "epo":
        # EPO's ray r * l = const: a larger r_k asks for a smaller L_k (r > 0: an objective
        # with weight 0 gets a small positive preference)
        return {"preference": [max(x, 1e-3) for x in v]}
    return {}


def combined_method(name: str) -> MethodBuilder:
    """A baseline on MoRec's sampled blocks: the combiner ``name`` instead of the PID's beta."""

    def build(config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None = None):
        from morec_dist.coordinator.baselines import CombinerError, build_combiner
        from morec_dist.train.strategies import CombinerStrategy

        num_blocks = len(config.morec.objectives) + 1
        try:
            combiner = build_combiner(name, num_blocks, combiner_options(name, config))
        except CombinerError as exc:
            raise ConfigError(f"--method {name}: {exc}") from None

        def make(*args: Any, **kwargs: Any) -> MorecStrategy:
            return CombinerStrategy(combiner, *args, **kwargs)

        return build_sampled(config, trainer, target_loss, resume, make)

    return build


def build_static_uniform(config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None = None):
    from morec_dist.train.runner import make_reader
    from morec_dist.train.strategies import StaticWeighting

    reader = make_reader(config, trainer)
    return reader, StaticWeighting(trainer.dataset, config.morec.objectives, static_weights(config)), None


def build_mgda_uniform(config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None = None):
    from morec_dist.train.runner import make_reader
    from morec_dist.train.strategies import MGDAStrategy

    reader = make_reader(config, trainer)
    return reader, MGDAStrategy(trainer.dataset, config.morec.objectives), None


METHODS.register("morec", Method(build_morec, coordinated=True))
for _name in ("static", "mgda", "pareto_mtl", "epo"):
    METHODS.register(_name, Method(combined_method(_name), coordinated=True))
METHODS.register("static_uniform", Method(build_static_uniform))
METHODS.register("mgda_uniform", Method(build_mgda_uniform))
