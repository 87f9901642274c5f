"""Stage `import-official`: a run of the official SCAN code as a scan-pipe checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from stages._shell import user_errors


def import_official_command(
    checkpoint: Path = typer.Argument(..., help="The official run's model_best.pth.tar (zip or legacy)."),
    vocab: Path = typer.Option(
        ..., "--vocab", help="The run's vocabulary, vocab/<data_name>_vocab.json from the official vocab.py."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Checkpoint directory to write (for evaluate, report, train --init)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint already in --out."),
    ignore_option: list[str] | None = typer.Option(
        None,
        "--ignore-option",
        help="An opt field of a SCAN fork that does not change the model (repeatable); recorded, not used.",
    ),
) -> None:
    """Import an official SCAN checkpoint and vocabulary; nothing in the file is executed."""
    from pipeline.official_import import import_official

    console = Console()
    with user_errors():
        run = import_official(
            checkpoint, vocab, out, overwrite=overwrite, ignore_options=tuple(ignore_option or ())
        )
    official = run.checkpoint
    console.print(
        f"imported {checkpoint} ({official.layout} format, epoch {official.epoch}, "
        f"best rsum {official.best_rsum}) as {run.model_name} -> {run.out_dir}"
    )
    console.print(f"  model: {run.config.model_dump()}")
    console.print(f"  vocabulary: {run.vocab_size} words, captions tokenized the official way (NLTK)")
    console.print(f"  official training options: {run.training_options}")
    console.print("  no optimizer state in official checkpoints: `train --init` starts Adam fresh")
    if run.ignored_options:
        console.print(f"  ignored options: {', '.join(run.ignored_options)}")


def register(app: typer.Typer) -> None:
    """Add `scan-pipe import-official`."""
    app.command("import-official")(import_official_command)
