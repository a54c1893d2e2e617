"""Recommender models on TorchRec EmbeddingBagCollections, their loss, and their sharding.

``build_model`` makes the unsharded model by registry name (``MODELS``); ``shard`` turns it
into a DistributedModelParallel module with its optimizer; ``LOSSES`` holds the per-row
training losses by name (``bpr_loss`` the default).
"""

from morec_dist.model.loss import LOSSES, bpr_loss, register_loss
from morec_dist.model.registry import MODELS, ModelSpec, build_model, feature_set_for, register_model

__all__ = [
    "LOSSES",
    "MODELS",
    "ModelSpec",
    "bpr_loss",
    "build_model",
    "feature_set_for",
    "register_loss",
    "register_model",
]
