"""Command `explain`: why a checkpoint scored an image-caption pair as it did (relevances, attention PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.params import TokenizeParams
from stages._shell import stage_section, user_errors

if TYPE_CHECKING:
    from pipeline.explain import ExplainRun


def relevance_table(run: ExplainRun) -> Table:
    """One row per query item (word or region): its relevance and what it attends to most."""
    explanation = run.explanation
    words = explanation.queries == "words"
    mmca = explanation.family == "mmca"
    table = Table(title=f"{explanation.queries} of the pair ({explanation.num_regions} regions)")
    table.add_column("#", justify="right")
    table.add_column("word" if words else "region (box x1 y1 x2 y2)")
    table.add_column("mass on regions" if mmca else "relevance", justify="right")
    table.add_column("most attended " + ("region" if words else "word"))
    for index, relevance in enumerate(explanation.relevance):
        row = explanation.attention[index]
        top = int(row.argmax())
        if words:
            item, target = explanation.tokens[index], f"{top} {run.region_names[top]}"
        else:
            box = " ".join(f"{value:.0f}" for value in explanation.boxes[index])
            item, target = f"{run.region_names[index]} ({box})", explanation.tokens[top]
        # Text cells: a token or region name is shown as written, never read as rich markup
        table.add_row(str(index), Text(item), f"{relevance:.4f}", Text(f"{target} ({row[top]:.3f})"))
    return table


def explain_command(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Checkpoint directory, e.g. results/train/checkpoints/best."
    ),
    features: Path = typer.Option(..., "--features", help="Feature store holding the image's regions."),
    images: Path = typer.Option(..., "--images", help="Images root (image ids are relative to it)."),
    image_id: str = typer.Option(..., "--image-id", help="The image's id in the feature store."),
    caption: str = typer.Option(..., "--caption", help="The caption to explain against the image."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG figures."),
    params: Path | None = typer.Option(
        None,
        "--params",
        help="params.yaml; section `tokenize` names MMCA's BERT (default: the one the checkpoint records).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Show why a pair matched: the pair's score, each word's or region's relevance, attention PNGs."""
    settings = stage_section(params, "tokenize", TokenizeParams)
    from pipeline.explain import explain_to_files

    with user_errors():
        run = explain_to_files(
            checkpoint,
            features,
            images,
            image_id,
            caption,
            out,
            bert=settings.bert if params is not None else None,
            max_words=settings.max_words,
            text_dtype=settings.text_feature_dtype,
            device=device,
        )
    explanation = run.explanation
    console = Console()
    console.print(
        f"{explanation.model_name} (epoch {run.checkpoint.epoch}) on image {run.image_id!r}: "
        f"score {explanation.score:.6f}",
        markup=False,
        highlight=False,
        soft_wrap=True,  # one line to grep, whatever the terminal width
    )
    console.print(f"how: {explanation.note}", markup=False, highlight=False)
    if explanation.unknown_words:
        console.print(
            f"read as unknown (not in the vocabulary): {', '.join(explanation.unknown_words)}",
            markup=False,
            highlight=False,
        )
    console.print(relevance_table(run))
    for path in run.figures:
        console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `scan-pipe explain`."""
    app.command("explain")(explain_command)
