"""Named SCAN variants with their published settings, in the style of timm's model registry.

A checkpoint stores (name, full config dict); `create_model(name, **config)` rebuilds the same model, and
`model_config(name, **overrides)` gives the config a name resolves to before any weights exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from pipeline.models.scan import SCAN, ScanConfig

ModelFactory = Callable[..., nn.Module]

_DEFAULTS: dict[str, dict[str, Any]] = {}
_FACTORIES: dict[str, ModelFactory] = {}


def register_model(
    name: str, defaults: Mapping[str, Any] | None = None
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register `factory(config: ScanConfig) -> nn.Module` under `name` with default settings."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is already registered")
        _FACTORIES[name] = factory
        _DEFAULTS[name] = dict(defaults or {})
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_FACTORIES)


def _require(name: str) -> None:
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")


def model_config(name: str, **overrides: Any) -> ScanConfig:
    """The validated config that `name` plus `overrides` resolves to (unknown keys are rejected by name)."""
    _require(name)
    return ScanConfig(**{**_DEFAULTS[name], **overrides})


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; `overrides` replace its defaults (e.g. `vocab_size`, `lambda_lse=20`)."""
    config = model_config(name, **overrides)  # checks the name first
    return _FACTORIES[name](config)


def _scan(config: ScanConfig) -> nn.Module:
    return SCAN(config)


# Published Flickr30K/COCO settings (reference README §1); COCO i-t LSE uses lambda_lse=20 via an override.
for _name, _settings in {
    "scan_t2i_lse": {"direction": "t2i", "agg": "LogSumExp", "lambda_softmax": 9.0, "lambda_lse": 6.0},
    "scan_t2i_avg": {"direction": "t2i", "agg": "Mean", "lambda_softmax": 9.0},
    "scan_i2t_lse": {"direction": "i2t", "agg": "LogSumExp", "lambda_softmax": 4.0, "lambda_lse": 5.0},
    "scan_i2t_avg": {"direction": "i2t", "agg": "Mean", "lambda_softmax": 4.0},
}.items():
    register_model(_name, {"raw_feature_norm": "clipped_l2norm", **_settings})(_scan)
