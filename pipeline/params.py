"""Typed schema of `params.yaml`: one section per DVC stage, validated before any work starts.

Every section forbids unknown keys, so a typo (`train.lamda_softmax`) is an error that names the key instead of
a silently ignored setting. Stage commands load their own section with `load_section(path, "train")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Section(BaseModel):
    """Base of every params section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleParams(Section):
    """`scan-pipe sample`: the embedded synthetic dataset."""

    seed: int = 0
    num_train: int = Field(120, ge=1)
    num_val: int = Field(20, ge=1)
    num_test: int = Field(20, ge=1)
    image_size: int = Field(160, ge=32)


class PrepareParams(Section):
    """`scan-pipe prepare`: dataset description (Karpathy split JSON) to captions tables per split."""

    dataset: Literal["sample", "flickr30k", "coco"] = "sample"
    captions_per_image: int = Field(5, ge=1)
    coco_restval_to_train: bool = True


class ExtractParams(Section):
    """`scan-pipe extract`: the bottom-up-attention detector run."""

    weights: str = "random"  # a checkpoint path, or "random" for an untrained detector (sample only)
    boxes: Literal["36", "adaptive"] = "36"
    batch_size: int = Field(1, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "cpu"
    feature_dtype: Literal["float16", "float32"] = "float16"
    precision: Literal["exact", "tf32", "bf16", "fp16"] = "exact"
    test_scale: int = Field(600, ge=32)
    max_size: int = Field(1000, ge=32)
    pre_nms_top_n: int = Field(6000, ge=1)
    post_nms_top_n: int = Field(300, ge=1)


class TokenizeParams(Section):
    """`scan-pipe tokenize`: the word vocabulary of SCAN's GRU."""

    min_count: int = Field(4, ge=1)


class TrainParams(Section):
    """`scan-pipe train`: SCAN hyperparameters and the optimisation schedule (reference defaults)."""

    model: Literal["scan_t2i_lse", "scan_t2i_avg", "scan_i2t_lse", "scan_i2t_avg"] = "scan_t2i_avg"
    embed_size: int = Field(1024, ge=1)
    word_dim: int = Field(300, ge=1)
    num_layers: int = Field(1, ge=1)
    bidirectional: bool = True
    raw_feature_norm: Literal["softmax", "clipped_l2norm", "l2norm", "clipped", "no_norm", "l1norm", "clipped_l1norm"] = (
        "clipped_l2norm"
    )
    lambda_softmax: float = Field(9.0, gt=0)
    lambda_lse: float = Field(6.0, gt=0)
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    epochs: int = Field(30, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_update: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=2)
    margin: float = Field(0.2, ge=0)
    max_violation: bool = True
    grad_clip: float = Field(2.0, gt=0)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    amp: bool = True
    val_max_images: int = Field(1000, ge=1)


class EvaluateParams(Section):
    """`scan-pipe evaluate`: protocol and scoring."""

    protocol: Literal["flickr30k_1k", "coco_1k", "coco_5k", "all"] = "flickr30k_1k"
    split: str = "test"
    block_size: int = Field(256, ge=1)
    device: str = "auto"
    save_scores: bool = False


class ReportParams(Section):
    """`scan-pipe report`: how many retrieval examples to draw."""

    num_examples: int = Field(4, ge=0)
    top_k: int = Field(3, ge=1)


class Params(Section):
    """The whole `params.yaml`."""

    sample: SampleParams = SampleParams()
    prepare: PrepareParams = PrepareParams()
    extract: ExtractParams = ExtractParams()
    tokenize: TokenizeParams = TokenizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()


class ParamsError(ValueError):
    """`params.yaml` is missing, unreadable or fails validation; the message names the file and key."""


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        lines.append(f"  {key}: {item['msg']}" + (f" (got {item['input']!r})" if "input" in item else ""))
    return "\n".join(lines)


def load_params(path: str | Path) -> Params:
    """Read and validate a whole params file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_validation_error(path, exc)) from None


def load_section(path: str | Path, name: str) -> Section:
    """Validate the whole file (a wrong key anywhere is an error) and return one stage's section."""
    params = load_params(path)
    if name not in Params.model_fields:
        raise ParamsError(f"{path}: unknown stage section {name!r}")
    return getattr(params, name)
