"""Recommender models on TorchRec EmbeddingBagCollections, their loss, and their sharding.

A model is one ``ModelSpec`` (model/spec.py: builder, options, inputs, scorer, export hook),
registered by name in ``MODELS``; ``build_model`` makes the unsharded model tagged with its
spec; ``shard`` turns it into a DistributedModelParallel module with its optimizer;
``LOSSES`` holds the per-row training losses by name (``bpr_loss`` the default).
"""

from morec_dist.lazy import lazy_exports

_EXPORTS = {
    "DenseInputs": "morec_dist.model.spec",
    "LOSSES": "morec_dist.model.loss",
    "MODELS": "morec_dist.model.registry",
    "ModelSpec": "morec_dist.model.spec",
    "PairwiseScorer": "morec_dist.model.spec",
    "VectorScorer": "morec_dist.model.spec",
    "bpr_loss": "morec_dist.model.loss",
    "build_model": "morec_dist.model.registry",
    "feature_builder": "morec_dist.model.registry",
    "feature_set_for": "morec_dist.model.registry",
    "register_loss": "morec_dist.model.loss",
    "register_model": "morec_dist.model.registry",
    "spec_of": "morec_dist.model.spec",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)  # loaded on first use: see morec_dist/lazy.py
