"""Recommender models on TorchRec EmbeddingBagCollections, their loss, and their sharding.

``build_model`` makes the unsharded model by registry name; ``shard`` turns it into a
DistributedModelParallel module with its optimizer; ``bpr_loss`` is the per-row training loss.
"""

from morec_dist.model.loss import bpr_loss
from morec_dist.model.registry import MODEL_NAMES, build_model, register_model

__all__ = ["MODEL_NAMES", "bpr_loss", "build_model", "register_model"]
