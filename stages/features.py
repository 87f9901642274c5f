"""`scan-pipe features`: inspect a feature store; move features to and from the bottom-up-attention TSV.

The TSV format (`image_id, image_w, image_h, num_boxes, boxes, features`, base64 float32) is what the Caffe
`generate_tsv` and most SCAN-era tools read and write, so existing dumps can be imported and ours exported.
Their readers call `int(image_id)`: `export-tsv --ids coco|flickr|mapping` writes integer ids for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from stages._shell import EXIT_USAGE, fail, user_errors

if TYPE_CHECKING:  # imported on use: the CLI starts without pyarrow
    from pipeline.store import FeatureStore

features_app = typer.Typer(
    name="features",
    help="Feature stores: info, export to and import from the bottom-up-attention TSV format, migrate.",
    no_args_is_help=True,
)


def _open(store: Path) -> FeatureStore:
    from pipeline.store import FeatureStore

    with user_errors(code=EXIT_USAGE):
        return FeatureStore(store)


@features_app.command("info")
def info(store: Path = typer.Argument(..., help="Feature store directory.")) -> None:
    """Row count, parts, feature size and the extraction metadata of a store."""
    opened = _open(store)
    table = Table(title=str(store), show_header=False)
    table.add_row("images", f"{len(opened):,}")
    table.add_row("parts", str(len(opened.parts)))
    table.add_row("features", f"{opened.feature_dim} x {opened.feature_dtype}")
    for key, value in sorted(opened.metadata.items()):
        if key not in ("feature_dim", "feature_dtype"):
            table.add_row(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    Console().print(table)


@features_app.command("export-tsv")
def export(
    store: Path = typer.Argument(..., help="Feature store directory."),
    out: Path = typer.Argument(..., help="TSV file to write (atomically)."),
    ids: str = typer.Option(
        "keep",
        "--ids",
        help="image_id column: keep (as stored), coco (integer of a COCO file name), flickr (numeric "
        "Flickr30K file stem) or mapping (looked up in --id-map). The original read_tsv.py needs integers.",
    ),
    id_map: Path | None = typer.Option(
        None,
        "--id-map",
        help="For --ids mapping: two-column file image_id<TAB>int (comma-separated if .csv).",
    ),
) -> None:
    """Write every image of a store as one TSV line (boxes and features as base64 float32).

    Every id is converted before anything is written; an id the --ids rule cannot convert is an error
    naming it.
    """
    if ids not in ("keep", "coco", "flickr", "mapping"):
        fail(f"--ids must be keep, coco, flickr or mapping, got {ids!r}", code=EXIT_USAGE)
    if ids == "mapping" and id_map is None:
        fail("--ids mapping needs --id-map FILE (image_id<TAB>int per line)", code=EXIT_USAGE)
    if ids != "mapping" and id_map is not None:
        fail(f"--id-map is only used with --ids mapping (got --ids {ids})", code=EXIT_USAGE)
    from pipeline.tsv import export_tsv, is_integer_id

    opened = _open(store)
    console = Console()
    with user_errors(code=EXIT_USAGE):
        count = export_tsv(opened, out, ids=ids, id_map=id_map)  # type: ignore[arg-type]
    console.print(f"exported {count:,} images to {out} (image ids: {ids})", highlight=False, soft_wrap=True)
    if ids == "keep" and not all(is_integer_id(image_id) for image_id in opened.image_ids):
        console.print(
            "note: the image ids are not integers, so readers that call int(image_id) (the original "
            "bottom-up-attention read_tsv.py, SCAN's converter) cannot read this file; "
            "use --ids coco, flickr or mapping for them",
            highlight=False,
            soft_wrap=True,
        )
    if opened.metadata.get("boxes_known") is False:
        console.print(
            "note: this store's boxes and image sizes are unknown (boxes_known: false); "
            "the TSV holds zero boxes and image size 0",
            highlight=False,
            soft_wrap=True,
        )


@features_app.command("import-tsv")
def import_(
    tsv: Path = typer.Argument(..., help="bottom-up-attention TSV file."),
    out: Path = typer.Argument(..., help="Feature store directory to create."),
    feature_dtype: str = typer.Option(
        "float32",
        help="Stored feature type: float32 (exact) or float16 (half the size; prints its rounding error).",
    ),
) -> None:
    """Convert a TSV dump (e.g. from the Caffe generate_tsv) into a feature store.

    Lines with NaN or inf in their boxes or features refuse the whole import: each is named and nothing is
    written.
    """
    if feature_dtype not in ("float16", "float32"):
        fail(f"--feature-dtype must be float16 or float32, got {feature_dtype!r}", code=EXIT_USAGE)
    if not tsv.is_file():
        fail(f"{tsv}: TSV file not found", code=EXIT_USAGE)
    from pipeline.store import existing_ids
    from pipeline.tsv import import_tsv_file

    if existing_ids(out):
        fail(f"{out}: already holds a feature store; choose an empty directory", code=EXIT_USAGE)
    with user_errors(code=EXIT_USAGE):
        result = import_tsv_file(tsv, out, feature_dtype=feature_dtype)  # type: ignore[arg-type]
    console = Console()
    console.print(
        f"imported {result.num_images:,} images from {tsv} into {out} ({result.feature_dtype})",
        highlight=False,
        soft_wrap=True,
    )
    if result.float16_max_abs_error is not None:
        console.print(
            f"float16: max abs rounding error {result.float16_max_abs_error:.3g} on these features "
            "(--feature-dtype float32 keeps them exact)",
            highlight=False,
            soft_wrap=True,
        )


@features_app.command("migrate")
def migrate(
    old: Path = typer.Argument(..., help="Store in scan-pipe's first layout (flat feature lists)."),
    new: Path = typer.Argument(..., help="Empty or new directory for the converted store."),
) -> None:
    """Convert a store of the first layout into the current one (same parts and values, no recomputation)."""
    from pipeline.store_repair import migrate_store

    with user_errors(code=EXIT_USAGE):
        result = migrate_store(old, new)
    console = Console()
    console.print(f"migrated {result.images:,} images in {result.parts} parts to {new}", highlight=False)
    if result.left_behind:
        console.print(f"left in {old}: {', '.join(result.left_behind)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the `features` command group."""
    app.add_typer(features_app, name="features")
