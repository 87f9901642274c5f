"""Import a run of the official SCAN code (`model_best.pth.tar` + `<data_name>_vocab.json`) as a checkpoint.

The result is an ordinary scan-pipe checkpoint directory (`pipeline.checkpoint`): `evaluate`, `report` and
`train --init` read it like one of ours. What makes it the official model:

* every `opt` field that shapes the model is mapped onto `ScanConfig`; a value scan-pipe cannot represent
  (`precomp_enc_type weight_norm`), a field this importer does not know, or a missing one is an error naming
  it, never a silent default;
* the official vocabulary file is kept byte for byte (ids from its `word2idx`, never recomputed), and the
  checkpoint says `tokenizer: official_nltk`, so its captions are tokenized the official way;
* the official training options (margin, learning rate, ...) and the file's provenance are recorded.

Official checkpoints carry no optimizer state (the official resume restarts Adam too), so a fine-tune from
one starts Adam fresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import CheckpointError, is_checkpoint, save_checkpoint
from pipeline.errors import UserError
from pipeline.models.build import create_model
from pipeline.models.config import AGGREGATIONS, DIRECTIONS, OFFICIAL_RAW_FEATURE_NORMS, ScanConfig
from pipeline.official_checkpoint import OfficialCheckpoint, read_official_checkpoint
from pipeline.official_vocab import OfficialVocabulary
from pipeline.vocab import OFFICIAL_TOKENIZER

# Every argument of the official train.py (commit 8063557), plus `vocab_size`, which train.main() adds.
OPTION_TYPES: dict[str, type] = {
    "data_path": str,
    "data_name": str,
    "vocab_path": str,
    "margin": float,
    "num_epochs": int,
    "batch_size": int,
    "word_dim": int,
    "embed_size": int,
    "grad_clip": float,
    "num_layers": int,
    "learning_rate": float,
    "lr_update": int,
    "workers": int,
    "log_step": int,
    "val_step": int,
    "logger_name": str,
    "model_name": str,
    "resume": str,
    "max_violation": bool,
    "img_dim": int,
    "no_imgnorm": bool,
    "no_txtnorm": bool,
    "raw_feature_norm": str,
    "agg_func": str,
    "cross_attn": str,
    "precomp_enc_type": str,
    "bi_gru": bool,
    "lambda_lse": float,
    "lambda_softmax": float,
    "vocab_size": int,
}
MODEL_OPTIONS = (
    "cross_attn",
    "raw_feature_norm",
    "agg_func",
    "lambda_softmax",
    "lambda_lse",
    "bi_gru",
    "num_layers",
    "embed_size",
    "word_dim",
    "img_dim",
    "precomp_enc_type",
    "no_imgnorm",
    "no_txtnorm",
    "vocab_size",
)
TRAINING_OPTIONS = (
    "margin",
    "max_violation",
    "grad_clip",
    "learning_rate",
    "lr_update",
    "batch_size",
    "num_epochs",
)
SUPPORTED_PRECOMP_ENC_TYPES = ("basic",)
AGG_NAMES = {"Mean": "avg", "LogSumExp": "lse"}  # registry names: scan_<direction>_<avg|lse>


class OfficialImportError(UserError):
    """An official run cannot be imported; the message names the file and the option or key at fault."""


@dataclass(frozen=True)
class ImportedRun:
    """What `import_official` wrote."""

    out_dir: Path
    model_name: str
    config: ScanConfig
    training_options: dict[str, Any]
    checkpoint: OfficialCheckpoint
    vocab_size: int
    ignored_options: tuple[str, ...]


def _typed_options(opt: dict[str, Any], source: Path, ignore: frozenset[str]) -> dict[str, Any]:
    unknown = sorted(set(opt) - set(OPTION_TYPES) - ignore)
    if unknown:
        raise OfficialImportError(
            f"{source}: unknown option {unknown[0]!r} in opt (not an argument of the official train.py); "
            "if it does not change the model, pass --ignore-option " + unknown[0]
        )
    for name in MODEL_OPTIONS:
        if name not in opt:
            raise OfficialImportError(f"{source}: opt has no {name!r}; cannot rebuild the model without it")
    checked: dict[str, Any] = {}
    for name, kind in OPTION_TYPES.items():
        if name not in opt:
            continue
        value = opt[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            shown = str(value)[:40]
            raise OfficialImportError(
                f"{source}: opt.{name} is {type(value).__name__} {shown!r}, expected {kind.__name__}"
            )
        checked[name] = value
    return checked


def official_model_config(opt: dict[str, Any], source: Path) -> tuple[str, ScanConfig]:
    """The registered model name and `ScanConfig` that reproduce the official model of `opt`."""
    choices = {
        "cross_attn": DIRECTIONS,
        "raw_feature_norm": OFFICIAL_RAW_FEATURE_NORMS,
        "agg_func": AGGREGATIONS,
        "precomp_enc_type": SUPPORTED_PRECOMP_ENC_TYPES,
    }
    for name, allowed in choices.items():
        if opt[name] not in allowed:
            raise OfficialImportError(
                f"{source}: opt.{name} = {opt[name]!r} is not supported by scan-pipe (supported: "
                f"{', '.join(allowed)})"
            )
    fields = {
        "vocab_size": opt["vocab_size"],
        "img_dim": opt["img_dim"],
        "embed_size": opt["embed_size"],
        "word_dim": opt["word_dim"],
        "num_layers": opt["num_layers"],
        "bidirectional": opt["bi_gru"],
        "no_imgnorm": opt["no_imgnorm"],
        "no_txtnorm": opt["no_txtnorm"],
        "direction": opt["cross_attn"],
        "raw_feature_norm": opt["raw_feature_norm"],
        "agg": opt["agg_func"],
        "lambda_softmax": opt["lambda_softmax"],
        "lambda_lse": opt["lambda_lse"],
    }
    try:
        config = ScanConfig(**fields)
    except ValueError as exc:
        first = " ".join(str(exc).split())[:200]
        raise OfficialImportError(f"{source}: opt does not describe a valid SCAN model: {first}") from None
    name = f"scan_{config.direction}_{AGG_NAMES.get(config.agg, 'avg')}"  # Max/Sum: the config carries agg
    return name, config


def official_state_dict(checkpoint: OfficialCheckpoint) -> dict[str, torch.Tensor]:
    """The official encoders' weights under scan-pipe's names (`image_encoder.` / `text_encoder.` + name)."""
    state = {f"image_encoder.{name}": tensor for name, tensor in checkpoint.image_state.items()}
    state.update({f"text_encoder.{name}": tensor for name, tensor in checkpoint.text_state.items()})
    return state


def _check_shapes(state: dict[str, torch.Tensor], name: str, config: ScanConfig, source: Path) -> None:
    """Compare with the model `config` builds, on the meta device (no memory), before anything is built."""
    with torch.device("meta"):
        expected = create_model(name, **config.model_dump()).state_dict()
    for key in expected:
        if key not in state:
            raise OfficialImportError(
                f"{source}: weights lack {key.split('.', 1)[1]!r} of the "
                f"{key.split('_', 1)[0]} encoder that opt describes"
            )
    for key, tensor in state.items():
        if key not in expected:
            raise OfficialImportError(
                f"{source}: unexpected weight {key.split('.', 1)[1]!r} for the model opt describes"
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise OfficialImportError(
                f"{source}: weight {key.split('.', 1)[1]!r} has shape {tuple(tensor.shape)}, opt implies "
                f"{tuple(expected[key].shape)}"
            )


def import_official(
    checkpoint_path: str | Path,
    vocab_path: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    ignore_options: tuple[str, ...] = (),
) -> ImportedRun:
    """Convert an official checkpoint and its vocabulary into a scan-pipe checkpoint directory `out_dir`.

    Everything is checked before anything is written, and the directory appears whole or not at all.
    """
    checkpoint_path, vocab_path, out = Path(checkpoint_path), Path(vocab_path), Path(out_dir)
    if out.exists() and not overwrite:
        kind = "a checkpoint" if is_checkpoint(out) else "files"
        raise OfficialImportError(f"{out}: already holds {kind}; choose another --out or pass --overwrite")
    if out.exists() and not is_checkpoint(out) and any(out.iterdir()):
        raise OfficialImportError(f"{out}: exists and is not a checkpoint directory; refusing to replace it")
    official = read_official_checkpoint(checkpoint_path)
    opt = _typed_options(official.opt, checkpoint_path, frozenset(ignore_options))
    name, config = official_model_config(opt, checkpoint_path)
    state = official_state_dict(official)
    _check_shapes(state, name, config, checkpoint_path)
    vocab = OfficialVocabulary.load(vocab_path)
    if len(vocab) != config.vocab_size:
        raise OfficialImportError(
            f"{vocab_path}: vocabulary has {len(vocab)} words but {checkpoint_path} was trained with "
            f"vocab_size {config.vocab_size} (opt.data_name {opt.get('data_name', '?')!r}: use "
            f"{opt.get('data_name', '<data_name>')}_vocab.json of the same run)"
        )
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG untouched
        model = create_model(name, **config.model_dump())
    model.load_state_dict({key: tensor.to(torch.float32) for key, tensor in state.items()}, strict=True)
    training_options = {key: opt[key] for key in TRAINING_OPTIONS if key in opt}
    provenance = {
        "source": str(checkpoint_path),
        "sha256": official.sha256,
        "format": official.layout,
        "epoch": official.epoch,
        "best_rsum": official.best_rsum,
        "iterations": official.iterations,
        "vocab_file": str(vocab_path),
        "options": opt,
        "ignored_options": sorted(ignore_options),
        "optimizer_state": "none (official checkpoints carry none; a fine-tune starts Adam fresh)",
    }
    try:
        save_checkpoint(
            out,
            model,
            model_name=name,
            model_config=config,
            epoch=official.epoch + 1,  # scan-pipe counts completed epochs; the official file the 0-based one
            metrics={} if official.best_rsum is None else {"official_best_rsum": official.best_rsum},
            vocab_path=vocab_path,
            tokenizer=OFFICIAL_TOKENIZER,
            extra={"official": provenance, "official_training_options": training_options},
        )
    except CheckpointError as exc:
        raise OfficialImportError(str(exc)) from exc
    return ImportedRun(
        out_dir=out,
        model_name=name,
        config=config,
        training_options=training_options,
        checkpoint=official,
        vocab_size=len(vocab),
        ignored_options=tuple(sorted(ignore_options)),
    )
