"""A model is one spec: what the rest of the package may know about a model, declared in one
place (like torchtitan's model spec, over TorchRec's sparse + dense inputs).

A ``ModelSpec`` carries

- ``builder(features, config, options, device) -> nn.Module``: the unsharded model, built on
  ``device`` (the trainer passes the meta device); its ``forward(batch)`` scores each row's
  user against its items, ``[N, 1 + negatives]``;
- ``options``: the model's own options, a dataclass parsed from ``[model.options]`` and checked
  once at the edge (``parse_options``: unknown keys, types, and the dataclass's own
  ``check(where)``), so a plugin adds options without touching config.py;
- its inputs: the sparse feature set (``feature_set``, plus ``model.user_features`` /
  ``item_features``) and the dense columns each side reads (``dense_inputs(options)``: numeric
  columns of users.parquet / items.parquet, which the FeatureBuilder puts in
  ``Batch.user_dense`` / ``item_dense``);
- ``scorer``: how evaluation and the signals score a user against the catalogue: a
  ``VectorScorer`` (score = user vector . item vector; a rank's item range is one matrix
  product) or a ``PairwiseScorer`` (the model scores (user, item) pairs, e.g. a ranking MLP
  over both sides' features; evaluation feeds it the candidate items in rounds);
- ``export_user_side``: an optional slot for ``morec export``'s user side (a servable form
  of the user vectors or tower); the exporter's wiring to it is its own (not done yet).

``build_model`` (model/registry.py) tags the model it builds with its spec, and every consumer
asks that spec (``spec_of``, ``unwrap``, ``as_recommender``) instead of probing the module for
methods.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from morec_dist.config import ConfigError, ModelConfig, parse_table
from morec_dist.data.schema import FEATURE_SETS

if TYPE_CHECKING:  # torch only in annotations: the CLI reads specs (names, options) without loading torch
    import torch
    from torch import nn
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from morec_dist.data.batch import Batch
    from morec_dist.data.features import FeatureBuilder

OPTIONS_FIELD = "model.options"
# the attribute build_model sets on the model it builds (a plain attribute: not in state_dict)
SPEC_ATTRIBUTE = "model_spec"

ModelBuilder = Callable[["FeatureBuilder", ModelConfig, Any, "torch.device | None"], "nn.Module"]
# (module, a side's KJT, the side's dense features [n, D] or None) -> vectors [n, d]
SideVectors = Callable[["nn.Module", "KeyedJaggedTensor", "torch.Tensor | None"], "torch.Tensor"]
# (module, a Batch whose item_ids are [N, C]) -> scores [N, C]
PairScores = Callable[["nn.Module", "Batch"], "torch.Tensor"]


@dataclass(frozen=True)
class NoOptions:
    """The options of a model that has none: any key in [model.options] is refused."""


@dataclass(frozen=True)
class DenseInputs:
    """Numeric columns a model reads as dense features, per side (users.parquet / items.parquet)."""

    user: tuple[str, ...] = ()
    item: tuple[str, ...] = ()


def no_dense_inputs(options: Any) -> DenseInputs:
    return DenseInputs()


def _user_vectors(module: nn.Module, kjt: KeyedJaggedTensor, dense: torch.Tensor | None) -> torch.Tensor:
    return module.user_vectors(kjt)  # type: ignore[operator]  # the spec says the module has it


def _item_vectors(module: nn.Module, kjt: KeyedJaggedTensor, dense: torch.Tensor | None) -> torch.Tensor:
    return module.item_vectors(kjt)  # type: ignore[operator]


@dataclass(frozen=True)
class VectorScorer:
    """score(u, i) = user(u) . item(i). Defaults call the module's ``user_vectors(kjt)`` /
    ``item_vectors(kjt)``; a model whose vectors read dense features passes its own."""

    user: SideVectors = _user_vectors
    item: SideVectors = _item_vectors


def _forward(module: nn.Module, batch: Batch) -> torch.Tensor:
    return module(batch)


@dataclass(frozen=True)
class PairwiseScorer:
    """score(u, i) for given pairs, for a model without item vectors. The default is the
    model's own ``forward(batch)`` (a training batch is pairs too: [N, 1 + negatives])."""

    score: PairScores = _forward


Scorer = VectorScorer | PairwiseScorer


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: ModelBuilder
    # the sparse FeatureBuilder feature set it reads: "ids" (ids only) or "side" (+ declared side features)
    feature_set: str = "ids"
    options: type = NoOptions
    dense_inputs: Callable[[Any], DenseInputs] = no_dense_inputs
    scorer: Scorer = field(default_factory=VectorScorer)
    # a slot for `morec export`'s user side (export/user_side.py still dispatches by name; not wired yet)
    export_user_side: Callable[..., Any] | None = None
    # ModelConfig fields that are older spellings of options (two_tower: tower_dims)
    legacy_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not _takes_four_arguments(self.builder):
            raise ValueError(f"{where}: builder must take (features, config, options, device), got {self.builder!r}")
        if self.feature_set not in FEATURE_SETS:
            raise ValueError(f"{where}: feature_set {self.feature_set!r} is not one of {FEATURE_SETS}")
        if not (isinstance(self.options, type) and dataclasses.is_dataclass(self.options)):
            raise ValueError(f"{where}: options must be a dataclass type, got {self.options!r}")
        if not isinstance(self.scorer, (VectorScorer, PairwiseScorer)):
            raise ValueError(f"{where}: scorer must be a VectorScorer or a PairwiseScorer, got {self.scorer!r}")
        unknown = [f for f in self.legacy_options if f not in {x.name for x in dataclasses.fields(ModelConfig)}]
        if unknown:
            raise ValueError(f"{where}: legacy_options {unknown} are not fields of ModelConfig")

    def option_values(self, config: ModelConfig) -> dict[str, Any]:
        """[model.options] with the legacy fields folded in (one place per value)."""
        values = dict(config.options)
        for key in self.legacy_options:
            legacy = getattr(config, key)
            if legacy is None:
                continue
            if key in values:
                raise ConfigError(f"model.{key} and {OPTIONS_FIELD}.{key} are both set; keep {OPTIONS_FIELD}.{key}")
            values[key] = legacy
        return values

    def parse_options(self, config: ModelConfig) -> Any:
        """The typed options of this model from ``config``; a ConfigError names the field."""
        values = self.option_values(config)
        if values and not dataclasses.fields(self.options):
            raise ConfigError(f"{OPTIONS_FIELD}: model {self.name!r} takes no options, got {sorted(values)}")
        try:
            options = parse_table(self.options, values, OPTIONS_FIELD)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (options of model {self.name!r})") from None
        check = getattr(options, "check", None)
        if callable(check):
            try:
                check(OPTIONS_FIELD)
            except ValueError as exc:  # a plugin's check may raise a plain ValueError
                raise ConfigError(str(exc)) from None
        return options


def _takes_four_arguments(builder: Callable[..., Any]) -> bool:
    """Whether ``builder`` can be called with the four positional arguments (a builder of the
    older three-argument form fails here, at registration, not in every rank at build)."""
    try:
        inspect.signature(builder).bind(None, None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let the call decide
        return True
    return True


def attach_spec(module: nn.Module, spec: ModelSpec) -> nn.Module:
    object.__setattr__(module, SPEC_ATTRIBUTE, spec)  # not a submodule, not state: a plain attribute
    return module


def spec_of(module: nn.Module) -> ModelSpec | None:
    spec = module.__dict__.get(SPEC_ATTRIBUTE)
    return spec if isinstance(spec, ModelSpec) else None


class Recommender(Protocol):
    """A model as the vector consumers see it (evaluation's item ranges, export)."""

    def user_vectors(self, user_kjt: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor: ...

    def item_vectors(self, item_kjt: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class _SpecVectors:
    module: nn.Module
    scorer: VectorScorer

    def user_vectors(self, user_kjt: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        return self.scorer.user(self.module, user_kjt, dense)

    def item_vectors(self, item_kjt: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        return self.scorer.item(self.module, item_kjt, dense)


def as_recommender(module: nn.Module, scorer: Scorer | None = None) -> Recommender:
    """The user / item vectors of ``module`` as its spec's VectorScorer defines them (or
    ``scorer``'s); a pairwise model has none, and says so."""
    if scorer is None:
        spec = spec_of(module)
        if spec is None:
            raise TypeError(f"{type(module).__name__}: no model spec (build the model with build_model)")
        scorer = spec.scorer
    if not isinstance(scorer, VectorScorer):
        raise TypeError(f"{type(module).__name__}: the model scores pairs (PairwiseScorer); it has no vectors")
    return _SpecVectors(module, scorer)


def scorer_of(module: nn.Module, scorer: Scorer | None = None) -> Scorer:
    if scorer is not None:
        return scorer
    spec = spec_of(module)
    if spec is None:
        raise TypeError(f"{type(module).__name__}: no model spec (build the model with build_model)")
    return spec.scorer
