"""Stage `tokenize`: the word vocabulary of SCAN's text encoder, from the training and validation captions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.params import TokenizeParams
from stages._shell import SET_HELP, stage_section, user_errors


def tokenize_command(
    captions: list[Path] = typer.Option(
        ..., "--captions", help="captions.parquet of a split; repeat for train and val."
    ),
    out: Path = typer.Option(..., "--out", help="Vocabulary JSON to write."),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `tokenize` is used."),
    min_count: int | None = typer.Option(None, "--min-count", help="Override tokenize.min_count."),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Build the word-level vocabulary (words seen at least min_count times, plus the four specials)."""
    settings = stage_section(
        params, "tokenize", TokenizeParams, options={"min_count": min_count}, assignments=set_values or ()
    )
    from pipeline.vocab import vocabulary_from_files

    with user_errors():
        vocabulary, num_captions = vocabulary_from_files(captions, min_count=settings.min_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocabulary.save(out)
    Console().print(
        f"vocabulary: {len(vocabulary)} tokens "
        f"(min_count {settings.min_count}, {num_captions} captions) -> {out}"
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe tokenize`."""
    app.command("tokenize")(tokenize_command)
