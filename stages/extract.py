"""Stage `extract`: `scan-pipe extract --images DIR --out DIR` -> bottom-up-attention region feature store.

Thin CLI layer: merges params.yaml's `extract` section with explicit options, calls `stages.extract_run`,
prints the summary. Exit codes: 0 all images extracted (or failures within --max-failures), 2 bad
options/inputs, 3 some images failed (listed in OUT/errors.jsonl; a rerun retries them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from pipeline.params import ExtractParams, ParamsError, load_section
from stages.extract_run import (
    ERRORS_FILE,
    EXIT_IMAGES_FAILED,
    SUMMARY_FILE,
    ExtractError,
    ExtractSummary,
    run_extract,
)

_HELP_PRECISION = (
    "exact = float32 with TF32 off (matches the Caffe reference); tf32 / bf16 / fp16 = fast modes"
)


def _fail(console: Console, message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def resolve_params(params_path: Path | None, overrides: dict[str, Any], console: Console) -> ExtractParams:
    """params.yaml's `extract` section (or the defaults) with every explicitly given option on top."""
    if params_path is None:
        base = ExtractParams()
    else:
        try:
            section = load_section(params_path, "extract")
        except ParamsError as exc:
            raise _fail(console, str(exc)) from None
        assert isinstance(section, ExtractParams)
        base = section
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return ExtractParams.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        lines = []
        for item in exc.errors():
            key = str(item["loc"][0]) if item["loc"] else "?"
            source = f"--{key.replace('_', '-')}" if key in given else f"extract.{key}"
            lines.append(f"{source}: {item['msg']} (got {item.get('input')!r})")
        raise _fail(console, "; ".join(lines)) from None


def print_summary(console: Console, summary: ExtractSummary, out: Path) -> None:
    """The end-of-run table: done, skipped, failed, speed, and where the details are."""
    table = Table(title="extract summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("images", str(summary.total))
    table.add_row("done", f"[green]{summary.done}[/]")
    table.add_row("skipped (already in the store)", str(summary.skipped))
    table.add_row("failed", f"[red]{summary.failed}[/]" if summary.failed else "0")
    table.add_row("speed", f"{summary.images_per_s:.2f} images/s ({summary.device}, {summary.precision})")
    if summary.num_boxes:
        boxes = summary.num_boxes
        table.add_row(
            "boxes per image", f"min {boxes['min']:.0f} / mean {boxes['mean']:.1f} / max {boxes['max']:.0f}"
        )
    for conversion, count in summary.conversions.items():
        if conversion not in ("YCbCr to BGR", "RGB to BGR"):
            table.add_row("converted", f"{count} x {conversion}")
    table.add_row("weights", "untrained (random)" if summary.untrained else summary.weights_sha256[:16])
    table.add_row("summary", str(out / SUMMARY_FILE))
    console.print(table)
    if summary.failed:
        console.print(
            f"[bold red]{summary.failed} image(s) failed[/]: see {out / ERRORS_FILE} (a rerun retries them)",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe extract`."""

    @app.command("extract")
    def extract(
        images: Path = typer.Option(..., "--images", help="Images root; image ids are paths relative to it."),
        out: Path = typer.Option(
            ..., "--out", help="Feature store directory (created; resumed if it exists)."
        ),
        list_file: Path | None = typer.Option(
            None, "--list", help="File of image paths relative to --images."
        ),
        weights: str | None = typer.Option(
            None, help="Detector checkpoint (.bin/.pkl/.safetensors) or 'random'."
        ),
        seed: int | None = typer.Option(None, help="Initialisation seed for --weights random."),
        arch: str | None = typer.Option(None, help="full (ResNet-101 C4) or tiny (smoke tests)."),
        boxes: str | None = typer.Option(None, help="36 (fixed, as SCAN) or adaptive (10-100, conf 0.2)."),
        batch_size: int | None = typer.Option(None, help="Images per forward pass (padded batch)."),
        num_workers: int | None = typer.Option(None, help="DataLoader decoding processes (0: in-process)."),
        device: str | None = typer.Option(None, help="cpu, cuda or cuda:N."),
        feature_dtype: str | None = typer.Option(None, help="float16 (default) or float32 in the store."),
        precision: str | None = typer.Option(None, help=_HELP_PRECISION),
        test_scale: int | None = typer.Option(None, help="Short side in pixels (default: the arch's, 600)."),
        max_size: int | None = typer.Option(
            None, help="Long-side cap in pixels (default: the arch's, 1000)."
        ),
        pre_nms_top_n: int | None = typer.Option(None, help="RPN proposals before NMS (default 6000)."),
        post_nms_top_n: int | None = typer.Option(None, help="RPN proposals after NMS (default 300)."),
        rows_per_part: int | None = typer.Option(None, help="Images per Parquet part file."),
        objects_vocab: str | None = typer.Option(None, help="objects_vocab.txt: names kept in the metadata."),
        attributes_vocab: str | None = typer.Option(None, help="attributes_vocab.txt."),
        max_failures: int | None = typer.Option(None, help="Failed images tolerated before exit code 3."),
        max_image_pixels: int | None = typer.Option(None, help="Refuse larger images (decompression bombs)."),
        params: Path | None = typer.Option(None, "--params", help="params.yaml (section `extract`)."),
    ) -> None:
        """Extract bottom-up-attention region features (36 x 2048 per image) into a Parquet feature store."""
        console = Console(stderr=True)
        overrides: dict[str, Any] = {
            "weights": weights,
            "seed": seed,
            "arch": arch,
            "boxes": boxes,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "device": device,
            "feature_dtype": feature_dtype,
            "precision": precision,
            "test_scale": test_scale,
            "max_size": max_size,
            "pre_nms_top_n": pre_nms_top_n,
            "post_nms_top_n": post_nms_top_n,
            "rows_per_part": rows_per_part,
            "objects_vocab": objects_vocab,
            "attributes_vocab": attributes_vocab,
            "max_failures": max_failures,
            "max_image_pixels": max_image_pixels,
        }
        settings = resolve_params(params, overrides, console)
        try:
            summary = run_extract(images, out, settings, list_file=list_file, console=console)
        except ExtractError as exc:
            raise _fail(console, str(exc)) from None
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports the merged summary
            print_summary(Console(), summary, out)
        if summary.failed > settings.max_failures:
            raise typer.Exit(EXIT_IMAGES_FAILED)
