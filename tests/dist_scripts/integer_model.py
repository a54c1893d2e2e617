"""An MF model whose weights are small integers, shared by the evaluation tests and their
torchrun worker: its scores are exact in float32 whatever the summation order (so a numpy
brute force can match them bit for bit) and full of ties (so the tie rule is exercised)."""

from __future__ import annotations

import torch
from torch import nn

from morec_dist.config import ModelConfig
from morec_dist.data.features import FeatureBuilder
from morec_dist.model import build_model


def integer_mf(features: FeatureBuilder, dim: int = 4, seed: int = 7, device: torch.device | None = None) -> nn.Module:
    """With ``device=META``: the same model, unallocated, for ``shard`` to load these weights into."""
    config = ModelConfig(name="mf", embedding_dim=dim)
    model = build_model("mf", features, config, device)
    if device is not None and device.type == "meta":
        return model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randint(-2, 3, param.shape, generator=generator).float())
    return model
