"""The fine-tuning methods, by name: the one list ``--method``, ``run.methods`` and the
fine-tuning job's dispatch read.

An entry (``Method``) builds what a method trains with: the reader, the strategy, and the
coordinator client (or None). ``morec`` is MoRec with the Ray coordinator; the coordinated
methods open their session (spec, sampled reader, signals, client) with
``train/coordinator_session.py`` and add only their strategy. ``static``,
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

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from morec_dist.config import Config, ConfigError
from morec_dist.registry import Registry

if TYPE_CHECKING:
    from morec_dist.coordinator.client import RankClient
    from morec_dist.train.loop import Strategy
    from morec_dist.train.resume import ResumePoint
    from morec_dist.train.strategies import MorecStrategy
    from morec_dist.train.trainer import Trainer

# (config, trainer, target_loss, resume point or None) -> (reader, strategy, coordinator client or None)
MethodBuilder = Callable[[Config, "Trainer", float, "ResumePoint | None"], tuple[Any, "Strategy", "RankClient | None"]]


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


def build_morec(config: Config, trainer: Trainer, target_loss: float, resume: ResumePoint | None = None):
    from morec_dist.train.coordinator_session import open_session
    from morec_dist.train.strategies import MorecStrategy

    session = open_session(config, trainer, target_loss, resume)
    return session.reader, session.strategy(MorecStrategy), session.client


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
        from morec_dist.train.coordinator_session import open_session
        from morec_dist.train.strategies import CombinerStrategy

        num_blocks = len(config.morec.objectives) + 1
        try:
            combiner = build_combiner(name, num_blocks, combiner_options(name, config))
        except CombinerError as exc:
            raise ConfigError(f"--method {name}: {exc}") from None

        def make(*args: Any, **kwargs: Any) -> MorecStrategy:
            return CombinerStrategy(combiner, *args, **kwargs)

        # the paper's law: its beta is recorded, unused, and it takes no held-out measurement
        session = open_session(config, trainer, target_loss, resume, law="paper")
        return session.reader, session.strategy(make), session.client

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
