"""Typed configs of the models and the choices of their options: each option's one default and validation.

Kept free of torch so that the params schema and the model registry can validate without loading it.
`l1norm` and `clipped_l1norm` are our extension (the official code crashes on them).
`MMCAConfig` holds the six options of reference/mmca.md §0 with the paper's settings as defaults.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Direction = Literal["t2i", "i2t"]
RawFeatureNorm = Literal[
    "softmax", "clipped_l2norm", "l2norm", "clipped", "no_norm", "l1norm", "clipped_l1norm"
]
Aggregation = Literal["LogSumExp", "Mean", "Max", "Sum"]

DIRECTIONS: tuple[str, ...] = get_args(Direction)
RAW_FEATURE_NORMS: tuple[str, ...] = get_args(RawFeatureNorm)
EXTENSION_RAW_FEATURE_NORMS: tuple[str, ...] = ("l1norm", "clipped_l1norm")
OFFICIAL_RAW_FEATURE_NORMS: tuple[str, ...] = tuple(
    norm for norm in RAW_FEATURE_NORMS if norm not in EXTENSION_RAW_FEATURE_NORMS
)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


class ScanConfig(BaseModel):
    """Everything that defines a SCAN model; stored in checkpoints to rebuild it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(ge=1)
    img_dim: int = Field(2048, ge=1)
    embed_size: int = Field(1024, ge=1)
    word_dim: int = Field(300, ge=1)
    num_layers: int = Field(1, ge=1)
    bidirectional: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    direction: Direction = "t2i"
    raw_feature_norm: RawFeatureNorm = "clipped_l2norm"
    agg: Aggregation = "Mean"
    lambda_softmax: float = Field(9.0, gt=0)
    lambda_lse: float = Field(6.0, gt=0)


class MMCAConfig(BaseModel):
    """Everything that defines an MMCA model (reference/mmca.md §0); the defaults are the paper's settings.

    BERT is not part of the model (mmca.md §2.3): `bert_dim` is only the width of its cached outputs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    img_dim: int = Field(2048, ge=1)
    bert_dim: int = Field(768, ge=1)
    embed_size: int = Field(256, ge=1)
    num_heads: int = Field(16, ge=1)
    cnn_filters: int = Field(256, ge=1)
    alpha: float = Field(0.2, ge=0, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: object, info: ValidationInfo) -> object:
        """pydantic would read True as 1: a boolean given for a size or for alpha is a mistake."""
        if isinstance(value, bool):
            raise ValueError(f"{info.field_name} must be a number, got the boolean {value}")
        return value

    @field_validator("num_heads")
    @classmethod
    def _heads_split_embedding(cls, num_heads: int, info: ValidationInfo) -> int:
        """Every head takes an equal slice of width embed_size / num_heads (mmca.md §2.1, A10)."""
        embed_size = info.data.get("embed_size")
        if embed_size is not None and embed_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_size={embed_size}")
        return num_heads
