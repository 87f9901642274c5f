"""Stage `tokenize`: the word vocabulary of SCAN's text encoder, from the training and validation captions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.captions import CaptionsError, read_captions
from pipeline.params import TokenizeParams
from pipeline.vocab import VocabularyError, build_vocabulary
from stages._stage_params import fail, stage_section


def tokenize_command(
    captions: list[Path] = typer.Option(
        ..., "--captions", help="captions.parquet of a split; repeat for train and val."
    ),
    out: Path = typer.Option(..., "--out", help="Vocabulary JSON to write."),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `tokenize` is used."),
    min_count: int | None = typer.Option(None, "--min-count", min=1, help="Override tokenize.min_count."),
) -> None:
    """Build the word-level vocabulary (words seen at least min_count times, plus the four specials)."""
    section = stage_section(params, "tokenize", TokenizeParams)
    threshold = section.min_count if min_count is None else min_count
    missing = [str(path) for path in captions if not path.is_file()]
    if missing:
        fail(f"captions file not found: {', '.join(missing)}")
    all_captions: list[str] = []
    for path in captions:
        try:
            table = read_captions(path)
        except CaptionsError as exc:
            fail(str(exc))
        all_captions.extend(table.captions)
    if not all_captions:
        fail(f"no captions in {', '.join(str(path) for path in captions)}")
    try:
        vocabulary = build_vocabulary(all_captions, min_count=threshold)
    except VocabularyError as exc:
        fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    vocabulary.save(out)
    Console().print(
        f"vocabulary: {len(vocabulary)} tokens (min_count {threshold}, {len(all_captions)} captions) -> {out}"
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe tokenize`."""
    app.command("tokenize")(tokenize_command)
