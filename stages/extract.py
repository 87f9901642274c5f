"""Stage `extract`: `scan-pipe extract --images DIR --out DIR` -> bottom-up-attention region feature store.

A shell: merges params.yaml's `extract` section with the options, builds the detector (the one place that
wires extractors/bua to the engine in pipeline.extraction), runs the engine, prints the summary. Exit codes:
0 all images extracted (or failures within --max-failures), 2 bad options/inputs, 3 some images failed
(listed in OUT/_errors.jsonl; a rerun retries them). torch, the detector and the engine are imported when
the command runs: `scan-pipe --help` imports every stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from pipeline.params import ExtractParams
from stages._shell import EXIT_USAGE, SET_HELP, error_console, fail, stage_section, user_errors

if TYPE_CHECKING:
    from extractors.bua.factory import BuiltDetector
    from pipeline.extraction import ExtractSummary

EXIT_IMAGES_FAILED = 3
_HELP_PRECISION = (
    "exact = float32 with TF32 off (matches the Caffe reference); tf32 / bf16 / fp16 = fast modes"
)

# The ExtractParams keys that describe the detector (the rest describe the run).
DETECTOR_KEYS = (
    "weights",
    "arch",
    "boxes",
    "seed",
    "test_scale",
    "max_size",
    "pre_nms_top_n",
    "post_nms_top_n",
)


def load_detector(params: ExtractParams) -> BuiltDetector:
    """The detector `params` describe, with the class vocabularies it names recorded in its metadata."""
    from extractors.bua.factory import DetectorSetupError, build_detector
    from extractors.bua.weights import WeightsError
    from pipeline.labels import read_label_vocabulary

    try:
        built = build_detector(**params.model_dump(include=set(DETECTOR_KEYS)))
    except (DetectorSetupError, WeightsError) as exc:  # extractors/ has its own errors: it cannot see ours
        hint = " (option --weights, or extract.weights in params.yaml)" if params.weights is None else ""
        fail(f"{exc}{hint}", code=EXIT_USAGE)
    config = built.detector.config
    if params.objects_vocab:
        built.metadata["object_names"] = read_label_vocabulary(
            params.objects_vocab, config.num_classes, "object"
        )
    if params.attributes_vocab:
        built.metadata["attribute_names"] = read_label_vocabulary(
            params.attributes_vocab, config.num_attributes, "attribute"
        )
    return built


def print_summary(console: Console, summary: ExtractSummary, out: Path) -> None:
    """The end-of-run table: done, skipped, failed, speed, and where the details are."""
    from pipeline.extraction import ERRORS_FILE, SUMMARY_FILE

    table = Table(title="extract summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("images", str(summary.total))
    if summary.resume_message:
        table.add_row("resumed", summary.resume_message.removeprefix("resuming: "))
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
    for warning, count in summary.warnings.items():
        table.add_row("warning", f"{count} x {warning}")
    tagged = f"{summary.orientation_tagged} image(s) with an orientation tag other than 1"
    table.add_row("EXIF", f"{summary.exif}; {tagged}")
    table.add_row("weights", "untrained (random)" if summary.untrained else summary.weights_sha256[:16])
    table.add_row("summary", str(out / SUMMARY_FILE))
    console.print(table)
    if summary.failed:
        console.print(
            f"[bold red]{summary.failed} image(s) failed[/]: see {out / ERRORS_FILE} (a rerun retries them)",
            highlight=False,
        )


def extract_command(
    images: Path = typer.Option(..., "--images", help="Images root; image ids are paths relative to it."),
    out: Path = typer.Option(..., "--out", help="Feature store directory (created; resumed if it exists)."),
    list_file: Path | None = typer.Option(None, "--list", help="File of image paths relative to --images."),
    weights: str | None = typer.Option(
        None, help="Detector checkpoint (.bin/.pkl/.safetensors) or 'random'."
    ),
    seed: int | None = typer.Option(None, help="Initialisation seed for --weights random."),
    arch: str | None = typer.Option(None, help="full (ResNet-101 C4) or tiny (smoke tests)."),
    boxes: str | None = typer.Option(None, help="36 (fixed, as SCAN) or adaptive (10-100, conf 0.2)."),
    batch_size: int | None = typer.Option(None, help="Images per forward pass (padded batch)."),
    num_workers: int | None = typer.Option(None, help="DataLoader decoding processes (0: in-process)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    feature_dtype: str | None = typer.Option(None, help="float16 (default) or float32 in the store."),
    precision: str | None = typer.Option(None, help=_HELP_PRECISION),
    test_scale: int | None = typer.Option(None, help="Short side in pixels (default: the arch's, 600)."),
    max_size: int | None = typer.Option(None, help="Long-side cap in pixels (default: the arch's, 1000)."),
    pre_nms_top_n: int | None = typer.Option(None, help="RPN proposals before NMS (default 6000)."),
    post_nms_top_n: int | None = typer.Option(None, help="RPN proposals after NMS (default 300)."),
    rows_per_part: int | None = typer.Option(None, help="Images per Parquet part file."),
    objects_vocab: str | None = typer.Option(None, help="objects_vocab.txt: names kept in the metadata."),
    attributes_vocab: str | None = typer.Option(None, help="attributes_vocab.txt."),
    max_failures: int | None = typer.Option(None, help="Failed images tolerated before exit code 3."),
    max_image_pixels: int | None = typer.Option(
        None, help="Refuse larger images (decompression bombs; default 50 Mpx, < 2 GiB per image)."
    ),
    exif: str | None = typer.Option(
        None, help="EXIF orientation: ignore (stored pixels, as the Caffe reference) or apply (rotate)."
    ),
    follow_symlinks: bool | None = typer.Option(
        None, "--follow-symlinks/--no-follow-symlinks", help="Follow symlinks leading outside --images."
    ),
    decode_timeout_s: float | None = typer.Option(
        None, help="Seconds one image may take to read and decode before it is recorded as a timeout."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml (section `extract`)."),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Extract bottom-up-attention region features (36 x 2048 per image) into a Parquet feature store."""
    # Every option but --images, --out, --list, --params and --set is named after its ExtractParams key.
    options = {key: value for key, value in locals().items() if key in ExtractParams.model_fields}
    settings = stage_section(params, "extract", ExtractParams, options=options, assignments=set_values or ())
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    with user_errors(code=EXIT_USAGE):
        from pipeline.extraction import extract_images

        loaded = load_detector(settings)  # before any image is listed: a bad weights file fails at once
        if loaded.untrained and is_main:
            error_console.print(
                f"[bold yellow]warning:[/] --weights random: untrained detector (seed {settings.seed}); the "
                "features only test the plumbing and the store is marked untrained",
                highlight=False,
            )
        for note in loaded.notes if is_main else []:
            error_console.print(f"[yellow]weights:[/] {note}", highlight=False)
        summary = extract_images(
            loaded.detector, images, out, settings, metadata=loaded.metadata, list_file=list_file
        )
    if is_main:
        print_summary(Console(), summary, out)
    if summary.failed > settings.max_failures:
        raise typer.Exit(EXIT_IMAGES_FAILED)


def register(app: typer.Typer) -> None:
    """Add `scan-pipe extract`."""
    app.command("extract")(extract_command)
