"""Stage `prepare`: a Karpathy split file + images folder to per-split captions tables and the image list."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.params import PrepareParams
from stages._shell import SET_HELP, fail, stage_section, user_errors


def prepare_command(
    dataset_json: Path = typer.Option(
        ..., "--dataset-json", help="Karpathy split file (dataset_flickr30k.json, dataset_coco.json, sample)."
    ),
    images: Path = typer.Option(..., "--images", help="Images root; image ids are paths relative to it."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder: OUT/{train,val,test}/captions.parquet, images.txt."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `prepare` is used."),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Cut the dataset into train/val/test captions tables (5 per image) and list the images to extract."""
    section = stage_section(params, "prepare", PrepareParams, assignments=set_values or ())
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder")
    from pipeline.splits import check_images_present, prepare_karpathy, write_prepared

    with user_errors():
        prepared = prepare_karpathy(
            dataset_json,
            dataset=section.dataset,
            captions_per_image=section.captions_per_image,
            restval_to_train=section.coco_restval_to_train,
        )
        check_images_present(images, prepared.all_image_ids())
    write_prepared(prepared, out)
    console = Console()
    table = Table(title=f"prepared {prepared.name} -> {out}")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("captions", justify="right")
    for split, split_images in prepared.splits.items():
        table.add_row(split, str(len(split_images)), str(len(split_images) * prepared.captions_per_image))
    console.print(table)
    if prepared.truncated_images:
        console.print(
            f"{prepared.truncated_images} images had more than {prepared.captions_per_image} captions; "
            "the first ones were kept"
        )
    if prepared.dropped_restval:
        console.print(
            f"{prepared.dropped_restval} restval images left out (prepare.coco_restval_to_train: false)"
        )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe prepare`."""
    app.command("prepare")(prepare_command)
