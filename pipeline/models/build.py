"""Build a model module from a registered name: the one place that maps config classes to module classes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from torch import nn

from pipeline.models.config import MMCAConfig, ScanConfig
from pipeline.models.mmca import MMCA
from pipeline.models.registry import model_config
from pipeline.models.scan import SCAN

_MODEL_CLASSES: dict[type[BaseModel], type[nn.Module]] = {ScanConfig: SCAN, MMCAConfig: MMCA}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; `overrides` replace its defaults (e.g. `vocab_size`, `lambda_lse=20`)."""
    config = model_config(name, **overrides)  # checks the name and every option first
    return _MODEL_CLASSES[type(config)](config)
