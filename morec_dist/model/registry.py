"""Models picked by name: the config's ``model.name`` -> a ``ModelSpec`` (its builder and the
feature set it reads).

A builder takes the FeatureBuilder (which sparse features each side has) and the model
config. ``MODELS`` is the only list of model names (validation, CLI and dispatch read it); a
new model registers itself with ``register_model`` from a module named in ``run.plugins``, so
that every rank (and every evaluate / pipeline subprocess) has it (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from morec_dist.config import ModelConfig
from morec_dist.data.features import FEATURE_SETS, FeatureBuilder
from morec_dist.model.mf import MatrixFactorization
from morec_dist.model.two_tower import TwoTower
from morec_dist.registry import Registry

ModelBuilder = Callable[[FeatureBuilder, ModelConfig, "torch.device | None"], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    builder: ModelBuilder
    # the FeatureBuilder feature set it reads: "ids" (ids only) or "side" (ids + declared side features)
    feature_set: str = "ids"


MODELS: Registry[ModelSpec] = Registry("model", "model.name")


def register_model(name: str, builder: ModelBuilder, feature_set: str = "ids", *, replace: bool = False) -> None:
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"register_model({name!r}): feature_set {feature_set!r} is not one of {FEATURE_SETS}")
    MODELS.register(name, ModelSpec(builder, feature_set), replace=replace)


def _build_mf(features: FeatureBuilder, config: ModelConfig, device: torch.device | None) -> nn.Module:
    return MatrixFactorization(
        features.user_features(), features.item_features(), config.embedding_dim, config.init_std, device
    )


def _build_two_tower(features: FeatureBuilder, config: ModelConfig, device: torch.device | None) -> nn.Module:
    if features.feature_set != "side":
        raise ValueError(
            f"model.name='two_tower' needs the 'side' feature set, got {features.feature_set!r} "
            "(build the FeatureBuilder with feature_set='side', or name model.user_features / item_features)"
        )
    return TwoTower(
        features.user_features(),
        features.item_features(),
        config.embedding_dim,
        list(config.tower_dims),
        config.init_std,
        device,
    )


register_model("mf", _build_mf, "ids")
register_model("two_tower", _build_two_tower, "side")


def feature_set_for(name: str) -> str:
    """The FeatureBuilder feature set a registered model expects (from its entry)."""
    return MODELS.get(name).feature_set


def build_model(
    name: str, features: FeatureBuilder, config: ModelConfig, device: torch.device | None = None
) -> nn.Module:
    """The unsharded model ``name``; seed torch before calling for reproducible weights."""
    return MODELS.get(name).builder(features, config, device)
