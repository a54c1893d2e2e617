"""Models picked by name: the config's ``model.name`` -> its ``ModelSpec`` (model/spec.py: the
builder, the options, the inputs, the scorer, the export hook).

``MODELS`` is the only list of model names (validation, CLI and dispatch read it); a new model
registers itself with ``register_model`` from a module named in ``run.plugins``, so that every
rank (and every evaluate / pipeline subprocess) has it (docs/extending.md). ``build_model``
parses the model's options, builds it and tags it with its spec; ``feature_builder`` makes the
FeatureBuilder of the inputs the spec declares. Torch and the model classes are imported
inside the builders (as ``train/methods.py`` does), so the CLI's launcher checks a config's
names and options without loading the training stack (1-3 s per job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morec_dist.config import ConfigError, ModelConfig
from morec_dist.data.storage import Location
from morec_dist.model.spec import (
    DenseInputs,
    ModelBuilder,
    ModelSpec,
    NoOptions,
    Scorer,
    VectorScorer,
    attach_spec,
    no_dense_inputs,
)
from morec_dist.registry import Registry

if TYPE_CHECKING:  # torch and the models are imported by the builders: the CLI checks names without them
    import torch
    from torch import nn

    from morec_dist.data.features import FeatureBuilder

MODELS: Registry[ModelSpec] = Registry("model", "model.name")


def register_model(
    name: str,
    builder: ModelBuilder,
    feature_set: str = "ids",
    *,
    options: type = NoOptions,
    dense_inputs: Callable[[Any], DenseInputs] = no_dense_inputs,
    scorer: Scorer | None = None,
    export_user_side: Callable[..., Any] | None = None,
    legacy_options: tuple[str, ...] = (),
    replace: bool = False,
) -> ModelSpec:
    """Register ``name``'s spec (checked here: a bad feature set, options type or scorer
    fails at import, naming the model)."""
    spec = ModelSpec(
        name, builder, feature_set, options, dense_inputs, scorer or VectorScorer(), export_user_side, legacy_options
    )
    return MODELS.register(name, spec, replace=replace)


# ------------------------------------------------------------------ built-in models


def _build_mf(
    features: FeatureBuilder, config: ModelConfig, options: NoOptions, device: torch.device | None
) -> nn.Module:
    from morec_dist.model.mf import MatrixFactorization

    return MatrixFactorization(
        features.user_features(), features.item_features(), config.embedding_dim, config.init_std, device
    )


@dataclass(frozen=True)
class TwoTowerOptions:
    # MLP widths of each tower, the last one the output (score) dimension
    tower_dims: list[int] = field(default_factory=lambda: [128, 64])

    def check(self, where: str) -> None:
        if not self.tower_dims or any(d < 1 for d in self.tower_dims):
            raise ConfigError(f"{where}.tower_dims: expected positive layer widths, got {self.tower_dims}")


def _build_two_tower(
    features: FeatureBuilder, config: ModelConfig, options: TwoTowerOptions, device: torch.device | None
) -> nn.Module:
    if features.feature_set != "side":
        raise ValueError(
            f"model.name='two_tower' needs the 'side' feature set, got {features.feature_set!r} "
            "(build the FeatureBuilder with feature_set='side', or name model.user_features / item_features)"
        )
    from morec_dist.model.two_tower import TwoTower

    return TwoTower(
        features.user_features(),
        features.item_features(),
        config.embedding_dim,
        list(options.tower_dims),
        config.init_std,
        device,
    )


register_model("mf", _build_mf, "ids")
register_model("two_tower", _build_two_tower, "side", options=TwoTowerOptions, legacy_options=("tower_dims",))


# ------------------------------------------------------------------------ lookups


def feature_set_for(name: str) -> str:
    """The FeatureBuilder feature set a registered model expects (from its entry)."""
    return MODELS.get(name).feature_set


def feature_builder(
    config: ModelConfig, data_dir: str | Path | Location, num_users: int, num_items: int
) -> FeatureBuilder:
    """The FeatureBuilder of the inputs model ``config.name`` declares: its sparse feature set
    (or the config's explicit selections) and its dense columns."""
    from morec_dist.data.features import FeatureBuilder

    spec = MODELS.get(config.name)
    dense = spec.dense_inputs(spec.parse_options(config))
    return FeatureBuilder(
        data_dir, num_users, num_items, spec.feature_set,
        user_features=config.user_features, item_features=config.item_features,
        user_dense=dense.user, item_dense=dense.item,
    )  # fmt: skip


def build_model(
    name: str, features: FeatureBuilder, config: ModelConfig, device: torch.device | None = None
) -> nn.Module:
    """The unsharded model ``name``, tagged with its spec; seed torch before calling for
    reproducible weights (the trainer builds on the meta device and initialises by rule)."""
    spec = MODELS.get(name)
    return attach_spec(spec.builder(features, config, spec.parse_options(config), device), spec)
