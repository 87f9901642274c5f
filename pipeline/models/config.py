"""Typed configs of the models and the choices of their options: each option's one default and validation.

Kept free of torch so that the params schema and the model registry can validate without loading it.
`l1norm` and `clipped_l1norm` are our extension (the official code crashes on them).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

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
