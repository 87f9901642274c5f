"""Matching models (SCAN variants) built from typed configs, selected by name through a registry."""

from pipeline.models.ensemble import average_scores, encode_and_score, ensemble_scores
from pipeline.models.losses import hardest_negative_triplet_loss
from pipeline.models.registry import create_model, list_models, model_config, register_model
from pipeline.models.scan import SCAN, ScanConfig, xattn_relevance, xattn_scores

__all__ = [
    "SCAN",
    "ScanConfig",
    "average_scores",
    "create_model",
    "encode_and_score",
    "ensemble_scores",
    "hardest_negative_triplet_loss",
    "list_models",
    "model_config",
    "register_model",
    "xattn_relevance",
    "xattn_scores",
]
