"""Models picked by name: the config's ``model.name`` -> a builder of the unsharded model.

A builder takes the FeatureBuilder (which sparse features each side has) and the model
config. New models register themselves with ``register_model``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from morec_dist.config import ModelConfig
from morec_dist.data.features import FeatureBuilder
from morec_dist.model.mf import MatrixFactorization
from morec_dist.model.two_tower import TwoTower

ModelBuilder = Callable[[FeatureBuilder, ModelConfig, "torch.device | None"], nn.Module]


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


def default_registry() -> dict[str, ModelBuilder]:
    return {"mf": _build_mf, "two_tower": _build_two_tower}


_REGISTRY: dict[str, ModelBuilder] = default_registry()
MODEL_NAMES = tuple(_REGISTRY)


def register_model(name: str, builder: ModelBuilder) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder


def feature_set_for(name: str) -> str:
    """The FeatureBuilder feature set a registered model expects."""
    return "side" if name == "two_tower" else "ids"


def build_model(
    name: str, features: FeatureBuilder, config: ModelConfig, device: torch.device | None = None
) -> nn.Module:
    """The unsharded model ``name``; seed torch before calling for reproducible weights."""
    if name not in _REGISTRY:
        raise ValueError(f"model.name: {name!r} is not one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](features, config, device)
