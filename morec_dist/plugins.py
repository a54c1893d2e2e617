"""User plugins and the names of registered parts, checked at the edge.

``run.plugins`` lists importable modules that register parts (a model, a loss, an objective
kind and its signal, ...) on the package's registries at import. ``load_plugins`` imports
them; the CLI calls it in the launcher, in every torchrun rank and in every evaluate /
pipeline subprocess (each one parses the same config), before ``validate_names`` and before
anything is built, so a plugin's names are valid, listed and dispatched in every process.
The coordinator actor (a Ray worker) gets a plugin's objective kinds inside the pickled
objective set, which imports the kind's module there by its class.

``validate_names`` checks every name a config picks from a registry against that registry,
and the model's options (``model.options``) against the options its ModelSpec declares.
config.py cannot do it: the registries live in model/, coordinator/ and eval/, which import
config.py. This module sits above all of them and only the CLI (and tests) import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from morec_dist.config import Config, ConfigError
from morec_dist.registry import Registry, RegistryError

if TYPE_CHECKING:
    from morec_dist.coordinator.objectives import ObjectiveSet


def load_plugins(modules: Iterable[str]) -> list[str]:
    """Import each module of ``run.plugins`` (once per process; a module is cached)."""
    loaded = []
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"run.plugins[{i}]: cannot import plugin module {name!r}: {exc}") from None
        loaded.append(name)
    return loaded


def _check(registry: Registry[Any], name: str, where: str) -> None:
    try:
        registry.get(name, where)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None


def validate_names(config: Config) -> None:
    """Every registry name the config uses is registered (after ``load_plugins``)."""
    from morec_dist.coordinator.laws import CONTROL_LAWS
    from morec_dist.coordinator.objectives import ObjectiveError, configurable_kinds, kind_of
    from morec_dist.eval.metrics import TEST_METRICS
    from morec_dist.model.choices import AUTO, DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS, SHARDING_TYPES
    from morec_dist.model.loss import LOSSES
    from morec_dist.model.registry import MODELS

    _check(MODELS, config.model.name, "model.name")
    MODELS.get(config.model.name).parse_options(config.model)  # model.options: the spec's, typed and checked
    _check(LOSSES, config.model.loss, "model.loss")
    for where, sharding in [("model.default_sharding", config.model.default_sharding)] + [
        (f"model.sharding.{table}", kind) for table, kind in config.model.sharding.items()
    ]:
        if sharding != AUTO:
            _check(SHARDING_TYPES, sharding, where)
    _check(EMBEDDING_OPTIMIZERS, config.optim.embedding_optimizer, "optim.embedding_optimizer")
    _check(DENSE_OPTIMIZERS, config.optim.dense_optimizer, "optim.dense_optimizer")
    _check(CONTROL_LAWS, config.morec.pid.law, "morec.pid.law")
    for i, o in enumerate(config.morec.objectives):
        where = f"morec.objectives[{i}] ({o.name})"
        try:
            kind = kind_of(o.kind, where)
        except ObjectiveError as exc:
            raise ConfigError(str(exc)) from None
        if kind.implicit:
            raise ConfigError(f"{where}.kind: {o.kind!r} is implicit (block 0); expected one of {configurable_kinds()}")
        for metric in kind.test_metrics:  # evaluation reports them: registered before any job starts
            _check(TEST_METRICS, metric, f"{where}: kind {o.kind!r} test_metrics")


def prepare(config: Config) -> Config:
    """The edge of every process: import the config's plugins, then check its names."""
    load_plugins(config.run.plugins)
    validate_names(config)
    return config


def validate_signals(objectives: ObjectiveSet) -> None:
    """Every signal the resolved objectives ask for is registered (``eval.signal_kinds.SIGNALS``)."""
    from morec_dist.eval.signal_kinds import SIGNALS

    for request in objectives.signal_requests():
        _check(SIGNALS, request.kind, f"morec.objectives ({request.objective}): signal")
