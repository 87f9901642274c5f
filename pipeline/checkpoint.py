"""Training checkpoints without pickle: weights in safetensors, everything else in JSON.

A checkpoint is a directory:

    model.safetensors       the model's state dict (float tensors as trained)
    optimizer.safetensors   the optimizer's per-parameter state tensors, flattened to `state.<index>.<name>`
    checkpoint.json         model name + config (enough to rebuild the model through the registry), epoch,
                            learning rate, metrics, optimizer hyperparameters, RNG states, training params,
                            package version
    vocab.json              the vocabulary the model was trained with, so evaluation needs only this folder;
                            `checkpoint.json["tokenizer"]` names the tokenizer that maps captions onto it
                            (`scan_pipe_words`, or `official_nltk` for runs imported from the official code)

The directory is written under a temporary name beside its destination and renamed into place, so a reader
never sees a half-written checkpoint. Nothing is ever unpickled: a checkpoint from an untrusted source can at
worst hold wrong numbers.
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import __version__
from pipeline.atomic import replace_directory
from pipeline.errors import UserError
from pipeline.vocab import SCAN_PIPE_TOKENIZER, TOKENIZERS

CHECKPOINT_FORMAT = "scan-pipe-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
VOCAB_FILE = "vocab.json"


class CheckpointError(UserError):
    """A checkpoint is missing, malformed, or not the one the caller expected; the message names the path."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything in `checkpoint.json`, parsed; tensors are loaded separately and only on request."""

    path: Path
    model_name: str
    model_config: dict[str, Any]
    epoch: int
    lr: float | None
    metrics: dict[str, Any]
    rng_state: dict[str, Any]
    train_params: dict[str, Any] | None
    package_version: str
    has_optimizer: bool
    vocab_path: Path | None
    extra: dict[str, Any] = field(default_factory=dict)
    optimizer_meta: dict[str, Any] | None = None
    tokenizer: str = SCAN_PIPE_TOKENIZER  # how captions become ids of `vocab_path` (pipeline.vocab)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel wrappers (keys without `module.`)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def bytes_to_json(data: bytes | torch.Tensor) -> str:
    """Base64 text of raw bytes (e.g. a torch RNG state ByteTensor) for a JSON field."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().numpy().tobytes()
    return base64.b64encode(data).decode("ascii")


def json_to_byte_tensor(text: str) -> torch.Tensor:
    """Inverse of `bytes_to_json` for torch RNG states (a uint8 tensor)."""
    raw = base64.b64decode(text.encode("ascii"))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _config_to_dict(model_config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(model_config, BaseModel):
        return model_config.model_dump(mode="json")
    return json.loads(json.dumps(dict(model_config)))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (hyperparameters, scalars)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(param_index), {})[name] = value
    meta = {
        "class": type(optimizer).__name__,
        "param_groups": json.loads(json.dumps(state_dict["param_groups"])),
        "state_scalars": scalars,
    }
    return tensors, meta


def _staging_dir(destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    *,
    model_name: str,
    model_config: BaseModel | Mapping[str, Any],
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    train_params: BaseModel | Mapping[str, Any] | None = None,
    vocab_path: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
    tokenizer: str = SCAN_PIPE_TOKENIZER,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    `epoch` counts completed epochs. `rng_state` must be JSON-serialisable (use `bytes_to_json` for torch
    states). `vocab_path` is copied in, so the checkpoint is self-contained for evaluation.
    """
    destination = Path(directory)
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    plain_model = unwrap_model(model)
    staging = _staging_dir(destination)
    try:
        state = {
            name: tensor.detach().cpu().contiguous() for name, tensor in plain_model.state_dict().items()
        }
        save_file(state, str(staging / MODEL_FILE), metadata={"format": CHECKPOINT_FORMAT})
        optimizer_meta = None
        if optimizer is not None:
            optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
            save_file(
                optimizer_tensors, str(staging / OPTIMIZER_FILE), metadata={"format": CHECKPOINT_FORMAT}
            )
        if vocab_path is not None:
            shutil.copyfile(vocab_path, staging / VOCAB_FILE)
        document = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "package_version": __version__,
            "model_name": model_name,
            "model_config": _config_to_dict(model_config),
            "epoch": int(epoch),
            "lr": None if lr is None else float(lr),
            "metrics": dict(metrics or {}),
            "optimizer": optimizer_meta,
            "rng_state": dict(rng_state or {}),
            "train_params": None if train_params is None else _config_to_dict(train_params),
            "vocab_file": VOCAB_FILE if vocab_path is not None else None,
            "tokenizer": tokenizer,
            "extra": dict(extra or {}),
        }
        (staging / CHECKPOINT_JSON).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def copy_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copy a checkpoint directory atomically (used to keep the best epoch beside the last one)."""
    source, destination = Path(source), Path(destination)
    read_checkpoint_info(source)
    staging = _staging_dir(destination)
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copyfile(item, staging / item.name)
        replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` looks like a checkpoint directory (has `checkpoint.json`)."""
    return (Path(path) / CHECKPOINT_JSON).is_file()


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Parse `checkpoint.json`; clear errors for a missing folder, a non-checkpoint or a malformed file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_file():
        if path.name in (CHECKPOINT_JSON, MODEL_FILE):
            path = path.parent
        else:
            raise CheckpointError(
                f"{path}: not a checkpoint (expected a directory with {CHECKPOINT_JSON} and {MODEL_FILE})"
            )
    json_path = path / CHECKPOINT_JSON
    if not json_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no {CHECKPOINT_JSON})")
    try:
        document = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path}: unreadable checkpoint metadata: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{json_path}: not a scan-pipe checkpoint (missing format {CHECKPOINT_FORMAT!r})"
        )
    version = document.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format version {version!r}, this code reads {CHECKPOINT_FORMAT_VERSION}"
        )
    for key, kind in (("model_name", str), ("model_config", dict), ("epoch", int)):
        if not isinstance(document.get(key), kind):
            raise CheckpointError(f"{json_path}: key {key!r} missing or not a {kind.__name__}")
    vocab_file = document.get("vocab_file")
    tokenizer = document.get("tokenizer", SCAN_PIPE_TOKENIZER)  # absent: written before official imports
    if tokenizer not in TOKENIZERS:
        raise CheckpointError(
            f"{json_path}: key 'tokenizer' is {tokenizer!r}; this code knows {', '.join(TOKENIZERS)}"
        )
    return CheckpointInfo(
        path=path,
        model_name=document["model_name"],
        model_config=document["model_config"],
        epoch=document["epoch"],
        lr=document.get("lr"),
        metrics=document.get("metrics") or {},
        rng_state=document.get("rng_state") or {},
        train_params=document.get("train_params"),
        package_version=str(document.get("package_version", "")),
        has_optimizer=(path / OPTIMIZER_FILE).is_file() and document.get("optimizer") is not None,
        vocab_path=(path / vocab_file) if vocab_file else None,
        extra=document.get("extra") or {},
        optimizer_meta=document.get("optimizer"),
        tokenizer=tokenizer,
    )


def _read_tensors(file: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from the checkpoint")
    try:
        return load_file(str(file), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file: {exc}") from exc


def build_model(info: CheckpointInfo) -> nn.Module:
    """Rebuild an untrained model of the checkpoint's variant and config through the registry."""
    from pipeline.models.build import create_model

    try:
        return create_model(info.model_name, **info.model_config)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{info.path / CHECKPOINT_JSON}: cannot rebuild model {info.model_name!r} from its config: {exc}"
        ) from exc


def load_checkpoint(
    path: str | Path,
    *,
    expect_model: str | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model with its trained weights; `expect_model` guards against loading another variant."""
    info = read_checkpoint_info(path)
    if expect_model is not None and info.model_name != expect_model:
        raise CheckpointError(
            f"{info.path}: checkpoint holds model variant {info.model_name!r}, expected {expect_model!r}"
        )
    model = build_model(info)
    state = _read_tensors(info.path / MODEL_FILE, "cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{info.path / MODEL_FILE}: weights do not fit model {info.model_name!r} built from "
            f"{CHECKPOINT_JSON}: {exc}"
        ) from exc
    return model.to(map_location), info


def load_model(
    path: str | Path, expect_model: str | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """The trained model of a checkpoint directory (see `load_checkpoint`)."""
    model, _ = load_checkpoint(path, expect_model=expect_model, map_location=map_location)
    return model


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Restore an optimizer's state (moments, step counts, hyperparameters) saved by `save_checkpoint`."""
    info = read_checkpoint_info(path)
    if not info.has_optimizer or info.optimizer_meta is None:
        raise CheckpointError(f"{info.path}: checkpoint has no optimizer state")
    meta = info.optimizer_meta
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(
            f"{info.path}: optimizer state is for {meta.get('class')!r}, not {type(optimizer).__name__!r}"
        )
    tensors = _read_tensors(info.path / OPTIMIZER_FILE, "cpu")
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        prefix, index, name = key.split(".", 2)
        if prefix != "state":
            raise CheckpointError(f"{info.path / OPTIMIZER_FILE}: unexpected tensor {key!r}")
        state.setdefault(int(index), {})[name] = tensor
    for index, scalars in meta.get("state_scalars", {}).items():
        state.setdefault(int(index), {}).update(scalars)
    ordered = {index: state[index] for index in sorted(state)}
    try:
        optimizer.load_state_dict({"state": ordered, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{info.path}: optimizer state does not fit this model: {exc}") from exc
