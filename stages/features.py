"""`scan-pipe features`: inspect a feature store; move features to and from the bottom-up-attention TSV.

The TSV format (`image_id, image_w, image_h, num_boxes, boxes, features`, base64 float32) is what the Caffe
`generate_tsv` and most SCAN-era tools read and write, so existing dumps can be imported and ours exported.
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
    help="Feature stores: info, export to and import from the bottom-up-attention TSV format.",
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
) -> None:
    """Write every image of a store as one TSV line (boxes and features as base64 float32)."""
    from pipeline.tsv import export_tsv

    opened = _open(store)
    count = export_tsv(opened, out)
    Console().print(f"exported {count:,} images to {out}")


@features_app.command("import-tsv")
def import_(
    tsv: Path = typer.Argument(..., help="bottom-up-attention TSV file."),
    out: Path = typer.Argument(..., help="Feature store directory to create."),
    feature_dtype: str = typer.Option("float16", help="Stored feature type: float16 or float32."),
) -> None:
    """Convert a TSV dump (e.g. from the Caffe generate_tsv) into a feature store."""
    if feature_dtype not in ("float16", "float32"):
        fail(f"--feature-dtype must be float16 or float32, got {feature_dtype!r}", code=EXIT_USAGE)
    if not tsv.is_file():
        fail(f"{tsv}: TSV file not found", code=EXIT_USAGE)
    from pipeline.store import existing_ids
    from pipeline.tsv import import_tsv

    if existing_ids(out):
        fail(f"{out}: already holds a feature store; choose an empty directory", code=EXIT_USAGE)
    with user_errors(code=EXIT_USAGE):
        count = import_tsv(tsv, out, feature_dtype=feature_dtype)  # type: ignore[arg-type]
    Console().print(f"imported {count:,} images from {tsv} into {out}")


def register(app: typer.Typer) -> None:
    """Add the `features` command group."""
    app.add_typer(features_app, name="features")
