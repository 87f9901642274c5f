"""Stage `train`: SCAN training with per-epoch validation, checkpoints and exact resume.

Several processes: `torchrun --nproc_per_node N -m stages.cli train ...` (one per GPU, or gloo on CPU); the
global batch is split across them, see `pipeline.distributed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from pipeline.captions import CaptionsError
from pipeline.checkpoint import CheckpointError
from pipeline.loaders import DataError
from pipeline.distributed import DeviceError
from pipeline.params import TrainParams
from pipeline.store import FeatureStoreError
from pipeline.train import TrainingError, train
from pipeline.vocab import VocabularyError
from stages._stage_params import fail, stage_section

USER_ERRORS = (
    TrainingError,
    DataError,
    CheckpointError,
    FeatureStoreError,
    CaptionsError,
    VocabularyError,
    DeviceError,
)


def apply_overrides(section: TrainParams, overrides: dict[str, Any]) -> TrainParams:
    """`section` with the explicitly given CLI options replaced, validated like the file itself."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return TrainParams.model_validate({**section.model_dump(), **given})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(map(str, e['loc']))}: {e['msg']}".replace("_", "-") for e in exc.errors()
        )
        fail(f"invalid option: {problems}", code=2)


def train_command(
    features: Path = typer.Option(..., "--features", help="Feature store directory (all splits' images)."),
    train_captions: Path = typer.Option(
        ..., "--train-captions", help="captions.parquet of the training split."
    ),
    val_captions: Path = typer.Option(
        ..., "--val-captions", help="captions.parquet of the validation split."
    ),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary JSON (from `scan-pipe tokenize`)."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints/{last,best}/, metrics.jsonl."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `train` is used."),
    model: str | None = typer.Option(None, "--model", help="Override train.model (e.g. scan_i2t_lse)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override train.epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override train.batch_size (global)."),
    lr: float | None = typer.Option(None, "--lr", help="Override train.lr."),
    lr_update: int | None = typer.Option(None, "--lr-update", help="Override train.lr_update."),
    embed_size: int | None = typer.Option(None, "--embed-size", help="Override train.embed_size."),
    word_dim: int | None = typer.Option(None, "--word-dim", help="Override train.word_dim."),
    seed: int | None = typer.Option(None, "--seed", help="Override train.seed."),
    device: str | None = typer.Option(
        None, "--device", help="Override train.device (auto, cpu, cuda, cuda:1)."
    ),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Override train.num_workers."),
    val_max_images: int | None = typer.Option(
        None, "--val-max-images", help="Override train.val_max_images."
    ),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="Override train.amp (CUDA only)."),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Where the memory-mapped feature table is cached (default ~/.cache/scan-pipe).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train a SCAN model; a checkpoint after every epoch, the best validation rsum kept."""
    section = stage_section(params, "train", TrainParams)
    settings = apply_overrides(
        section,
        {
            "model": model,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "lr_update": lr_update,
            "embed_size": embed_size,
            "word_dim": word_dim,
            "seed": seed,
            "device": device,
            "num_workers": num_workers,
            "val_max_images": val_max_images,
            "amp": amp,
        },
    )
    for label, path, kind in (
        ("--features", features, "dir"),
        ("--train-captions", train_captions, "file"),
        ("--val-captions", val_captions, "file"),
        ("--vocab", vocab, "file"),
    ):
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            fail(f"{path}: {label} {'directory' if kind == 'dir' else 'file'} not found")
    console = Console()
    try:
        result = train(
            settings,
            features_dir=features,
            train_captions=train_captions,
            val_captions=val_captions,
            vocab_path=vocab,
            out_dir=out,
            resume=resume,
            progress=progress,
            cache_dir=cache_dir,
            console=console,
        )
    except USER_ERRORS as exc:
        fail(str(exc))
    if result.best_epoch is not None:
        console.print(
            f"best validation rsum {result.best_rsum:.2f} at epoch {result.best_epoch} -> "
            f"{out / 'checkpoints' / 'best'}"
        )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe train`."""
    app.command("train")(train_command)
