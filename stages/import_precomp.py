"""Stage `import-precomp`: SCAN's precomputed `{split}_ims.npy` + `{split}_caps.txt` into a feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from stages._shell import fail, user_errors


def import_precomp_command(
    data: Path = typer.Option(..., "--data", help="Folder holding {split}_ims.npy and {split}_caps.txt."),
    split: str = typer.Option(..., "--split", help="Split name, e.g. train, dev, test, testall."),
    out: Path = typer.Option(..., "--out", help="Feature store directory to write (plus captions.parquet)."),
    feature_dtype: str = typer.Option("float16", "--feature-dtype", help="float16 or float32."),
    captions_per_image: int = typer.Option(
        5, "--captions-per-image", min=1, help="Consecutive captions per image."
    ),
    rows_per_part: int = typer.Option(512, "--rows-per-part", min=1, help="Images per Parquet part file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a feature store already in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Import precomputed SCAN features and captions (one .npy row per image, or one per caption)."""
    if feature_dtype not in ("float16", "float32"):
        raise typer.BadParameter(
            f"must be float16 or float32, got {feature_dtype!r}", param_hint="--feature-dtype"
        )
    if not data.is_dir():
        fail(f"{data}: data directory not found")
    dtype: Literal["float16", "float32"] = "float16" if feature_dtype == "float16" else "float32"
    from pipeline.precomp import import_precomp

    with user_errors():
        result = import_precomp(
            data,
            split,
            out,
            feature_dtype=dtype,
            captions_per_image=captions_per_image,
            rows_per_part=rows_per_part,
            overwrite=overwrite,
            progress=progress,
        )
    layout = (
        f"one row per caption: every {captions_per_image}th row kept"
        if result.rows_per_caption
        else "one row per image"
    )
    Console().print(
        f"imported {result.num_images} images x {result.regions} regions x {result.feature_dim} "
        f"({feature_dtype}, {layout}) and {result.num_captions} captions -> {result.store_dir}, "
        f"{result.captions_path}",
        soft_wrap=True,
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe import-precomp`."""
    app.command("import-precomp")(import_precomp_command)
