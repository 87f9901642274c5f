"""Stage `import-precomp`: SCAN's precomputed `{split}_ims.npy` + `{split}_caps.txt` into a feature store.

`--out` becomes the feature store and holds nothing else; the captions go to `--captions-out` (default
`<out>.captions.parquet`, beside the store directory). Image ids come from `{split}_ids.txt` when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer
from rich.console import Console

from stages._shell import error_console, fail, user_errors


def import_precomp_command(
    data: Path = typer.Option(
        ..., "--data", help="Folder holding {split}_ims.npy, {split}_caps.txt and optionally {split}_ids.txt."
    ),
    split: str = typer.Option(..., "--split", help="Split name, e.g. train, dev, test, testall."),
    out: Path = typer.Option(
        ..., "--out", help="Feature store directory to write; it holds only the store (no captions)."
    ),
    captions_out: Path | None = typer.Option(
        None,
        "--captions-out",
        help="Captions table to write [default: OUT.captions.parquet, beside the store directory].",
    ),
    feature_dtype: str = typer.Option(
        "float32",
        "--feature-dtype",
        help="Stored feature type: float32 (the default for imports: the .npy's values exactly) or float16 "
        "(opt-in: half the size, but loses up to ~4e-3 on typical feature values; prints its measured max "
        "rounding error).",
    ),
    captions_per_image: int = typer.Option(
        5, "--captions-per-image", min=1, help="Consecutive captions per image."
    ),
    rows_per_part: int = typer.Option(512, "--rows-per-part", min=1, help="Images per Parquet part file."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a feature store in --out and the --captions-out file."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Import precomputed SCAN features and captions (one .npy row per image, or one per caption).

    Rows with NaN or inf values refuse the whole import: every such row is named and nothing is written.
    With one row per caption, each image's first row is kept (as the official evalrank does) and its
    repeated rows are checked against it: differing rows are a warning, not an error.
    Boxes and image sizes are not in the precomputed data: they are stored as zeros and the store's metadata
    says boxes_known: false, image_size_known: false.
    """
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
            captions_out=captions_out,
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
    ids = (
        f"synthetic image ids {split}/000000... (no {split}_ids.txt in {data})"
        if result.image_ids_source == "synthetic"
        else f"image ids from {result.image_ids_source}"
    )
    lines = [
        f"imported {result.num_images} images x {result.regions} regions x {result.feature_dim} "
        f"({result.feature_dtype}, {layout}) -> feature store {result.store_dir}",
        f"{result.num_captions} captions -> {result.captions_path}",
        ids,
        "boxes and image sizes: not in precomputed data; stored as zeros meaning unknown "
        "(metadata boxes_known: false, image_size_known: false)",
    ]
    if result.float16_max_abs_error is not None:
        lines.append(
            f"float16: max abs rounding error {result.float16_max_abs_error:.3g} on these features "
            "(--feature-dtype float32 keeps them exact)"
        )
    if result.repeated_rows_checked and not result.images_with_differing_rows:
        lines.append(f"repeated rows: each image's {captions_per_image} rows are equal; the first was kept")
    console = Console()
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    if result.images_with_differing_rows:
        error_console.print(
            f"[bold yellow]warning:[/] {result.images_with_differing_rows} of {result.num_images} images "
            "have repeated rows that differ from their first row (max abs difference "
            f"{result.repeated_rows_max_abs_diff:.6g}); the first row of each image was kept, as the "
            "official evalrank does (official training gives each caption its own row)",
            soft_wrap=True,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe import-precomp`."""
    app.command("import-precomp")(import_precomp_command)
