"""Stage `train`: SCAN training with per-epoch validation, checkpoints and exact resume.

Several processes: `torchrun --nproc_per_node N -m stages.cli train ...` (one per GPU, or gloo on CPU); the
global batch is split across them, see `pipeline.distributed`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.models.registry import model_text_input
from pipeline.params import TrainParams
from stages._shell import SET_HELP, fail, stage_section, user_errors


def train_command(
    features: Path = typer.Option(..., "--features", help="Feature store directory (all splits' images)."),
    train_captions: Path = typer.Option(
        ..., "--train-captions", help="captions.parquet of the training split."
    ),
    val_captions: Path = typer.Option(
        ..., "--val-captions", help="captions.parquet of the validation split."
    ),
    vocab: Path | None = typer.Option(
        None, "--vocab", help="Vocabulary JSON (from `scan-pipe tokenize`); with --init: the checkpoint's."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints/{last,best}/, metrics.jsonl."),
    text_features: Path | None = typer.Option(
        None,
        "--text-features",
        help="BERT-input models (MMCA): the cached BERT outputs `scan-pipe tokenize` wrote (DIR/<split>).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `train` is used."),
    model: str | None = typer.Option(None, "--model", help="Override train.model (e.g. scan_i2t_lse)."),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Override train.init: fine-tune this checkpoint directory (e.g. from import-official); its "
        "architecture, vocabulary and tokenizer are used and Adam starts fresh.",
    ),
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
    set_values: list[str] | None = typer.Option(
        None, "--set", help=f"{SET_HELP} Model options too, e.g. --set lambda_softmax=4."
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Where the memory-mapped feature table is cached (default ~/.cache/scan-pipe).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train a model (or fine-tune one with --init); a checkpoint after every epoch, the best rsum kept."""
    settings = stage_section(
        params,
        "train",
        TrainParams,
        options={
            "model": model,
            "init": None if init is None else str(init),
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
        assignments=set_values or (),
    )
    for label, path, kind in (
        ("--features", features, "dir"),
        ("--train-captions", train_captions, "file"),
        ("--val-captions", val_captions, "file"),
        ("--vocab", vocab, "file"),
    ):
        if path is None:
            continue
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            fail(f"{path}: {label} {'directory' if kind == 'dir' else 'file'} not found")
    needs_vocab = model_text_input(settings.model) == "words" and settings.init is None
    if vocab is None and needs_vocab:
        fail("--vocab is required unless train.init (--init) names a checkpoint (it carries its vocabulary)")
    from pipeline.train import train

    console = Console()
    with user_errors():
        result = train(
            settings,
            features_dir=features,
            train_captions=train_captions,
            val_captions=val_captions,
            vocab_path=vocab,
            out_dir=out,
            text_features=text_features,
            resume=resume,
            progress=progress,
            cache_dir=cache_dir,
            console=console,
        )
    if result.best_epoch is not None:
        console.print(
            f"best validation rsum {result.best_rsum:.2f} at epoch {result.best_epoch} -> "
            f"{out / 'checkpoints' / 'best'}"
        )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe train`."""
    app.command("train")(train_command)
