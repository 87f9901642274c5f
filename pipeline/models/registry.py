"""The single list of model names, each with its typed config class and published defaults (as in timm).

Torch-free on purpose: the params schema validates `train.model` and the model options against this list
before any work starts, and every stage validates the whole params file. Building a module from a name is
`pipeline.models.build.create_model`. A checkpoint stores (name, full config dict), so the same name and
config rebuild the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from pipeline.models.config import MMCAConfig, ScanConfig

TextInput = Literal["words", "bert"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered name: the config class that validates its options and the name's own defaults."""

    name: str
    config_class: type[BaseModel]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    text_input: TextInput = "words"  # "words": token ids of a word vocabulary; "bert": cached BERT outputs
    family: str = "scan"  # variants of one family share their options (params.yaml `train.per_model`)
    training: Mapping[str, Any] = field(default_factory=dict)  # the paper's schedule for this variant


_ENTRIES: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    config_class: type[BaseModel],
    defaults: Mapping[str, Any] | None = None,
    *,
    text_input: TextInput = "words",
    family: str = "scan",
    training: Mapping[str, Any] | None = None,
) -> None:
    """Add `name`; its `defaults` override the config class's own defaults, `training` the trainer's."""
    if name in _ENTRIES:
        raise ValueError(f"model {name!r} is already registered")
    unknown = sorted(set(defaults or {}) - set(config_class.model_fields))
    if unknown:
        raise ValueError(f"model {name!r}: {config_class.__name__} has no option(s) {', '.join(unknown)}")
    _ENTRIES[name] = ModelEntry(
        name, config_class, dict(defaults or {}), text_input, family, dict(training or {})
    )


def model_text_input(name: str) -> TextInput:
    """What the text side of `name` consumes: word token ids, or cached BERT outputs (WordPiece)."""
    return model_entry(name).text_input


def model_family(name: str) -> str:
    """The family of `name` (`scan`, `mmca`): variants of a family share their options."""
    return model_entry(name).family


def family_models(family: str) -> list[str]:
    """The registered names of a family; an unknown family is an error listing the known ones."""
    names = [name for name in list_models() if _ENTRIES[name].family == family]
    if not names:
        families = sorted({entry.family for entry in _ENTRIES.values()})
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(families)}")
    return names


def model_training_defaults(name: str) -> dict[str, Any]:
    """The paper's training schedule for `name` (epochs, lr, ...), where it differs from the trainer's."""
    return dict(model_entry(name).training)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_ENTRIES)


def model_entry(name: str) -> ModelEntry:
    """The entry of `name`; an unknown name is an error listing the known ones."""
    if name not in _ENTRIES:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _ENTRIES[name]


def model_config(name: str, **overrides: Any) -> BaseModel:
    """The validated config that `name` plus `overrides` resolves to (unknown keys are rejected by name)."""
    entry = model_entry(name)
    return entry.config_class(**{**entry.defaults, **overrides})


def check_model_options(name: str, options: Mapping[str, Any]) -> None:
    """Validate options given before the data exists (params.yaml, CLI): every error except a missing
    field that only the data supplies (e.g. `vocab_size`) is raised, naming the option."""
    entry = model_entry(name)
    try:
        entry.config_class(**{**entry.defaults, **options})
    except ValidationError as exc:
        errors = [error for error in exc.errors() if error["type"] != "missing"]
        if errors:
            details = "; ".join(
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']} (got {error['input']!r})"
                for error in errors
            )
            raise ValueError(f"model {name!r}: {details}") from None


def model_option_names(name: str) -> list[str]:
    """The options a config of `name` accepts."""
    return list(model_entry(name).config_class.model_fields)


# Published Flickr30K/COCO settings (SCAN paper); COCO i-t LSE uses lambda_lse=20 via an override.
for _name, _settings in {
    "scan_t2i_lse": {"direction": "t2i", "agg": "LogSumExp", "lambda_softmax": 9.0, "lambda_lse": 6.0},
    "scan_t2i_avg": {"direction": "t2i", "agg": "Mean", "lambda_softmax": 9.0},
    "scan_i2t_lse": {"direction": "i2t", "agg": "LogSumExp", "lambda_softmax": 4.0, "lambda_lse": 5.0},
    "scan_i2t_avg": {"direction": "i2t", "agg": "Mean", "lambda_softmax": 4.0},
}.items():
    register_model(_name, ScanConfig, _settings)

# MMCA (Wei et al. 2020), mmca.md §6.1: the config's defaults are the paper's, and so is its schedule.
register_model(
    "mmca",
    MMCAConfig,
    text_input="bert",
    family="mmca",
    training={"epochs": 20, "lr": 2e-4, "lr_update": 10, "batch_size": 64},
)
