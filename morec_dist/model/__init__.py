"""Recommender models on TorchRec EmbeddingBagCollections, their loss, and their sharding.

A model is one ``ModelSpec`` (model/spec.py: builder, options, inputs, scorer, export hook),
registered by name in ``MODELS``; ``build_model`` makes the unsharded model tagged with its
spec; ``shard`` turns it into a DistributedModelParallel module with its optimizer;
``LOSSES`` holds the per-row training losses by name (``bpr_loss`` the default).
"""

from morec_dist.model.loss import LOSSES, bpr_loss, register_loss
from morec_dist.model.registry import MODELS, build_model, feature_builder, feature_set_for, register_model
from morec_dist.model.spec import DenseInputs, ModelSpec, PairwiseScorer, VectorScorer, spec_of

__all__ = [
    "LOSSES",
    "MODELS",
    "DenseInputs",
    "ModelSpec",
    "PairwiseScorer",
    "VectorScorer",
    "bpr_loss",
    "build_model",
    "feature_builder",
    "feature_set_for",
    "register_loss",
    "register_model",
    "spec_of",
]
