"""Stage `index build`: encode a feature store's images (and a caption set) into a resumable search index."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from stages._shell import fail, user_errors

index_app = typer.Typer(
    name="index",
    help="Search indexes over a feature store: build (incremental, resumable).",
    no_args_is_help=True,
)


@index_app.callback()
def index_group() -> None:
    """Search indexes: the shortlist behind `scan-pipe search`."""


@index_app.command("build")
def build_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Trained checkpoint directory (SCAN or MMCA)."),
    features: Path = typer.Option(..., "--features", help="Feature store directory of the gallery images."),
    out: Path = typer.Option(..., "--out", help="Index directory (a killed build resumes here)."),
    shard_size: int | None = typer.Option(
        None, "--shard-size", help="Items per embedding shard (unit of resume; default 4,096)."
    ),
    captions: Path | None = typer.Option(
        None, "--captions", help="captions.parquet to index too, for image-to-text search (`--image`)."
    ),
    nlist: int | None = typer.Option(
        None, "--nlist", help="SCAN: region centroids (default: 2^k <= 2 sqrt(regions), at most 4,096)."
    ),
    batch_size: int = typer.Option(128, "--batch-size", help="Images/captions per encoder call."),
    device: str = typer.Option("auto", "--device", help="Encoder device: auto, cpu, cuda."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Cache of the memory-mapped features."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Encode every image of the store (and the captions) as float16 shards, then the candidate index."""
    if not checkpoint.exists():
        fail(f"{checkpoint}: --checkpoint not found")
    if not features.is_dir():
        fail(f"{features}: --features directory not found")
    if captions is not None and not captions.is_file():
        fail(f"{captions}: --captions file not found")
    from pipeline.index.build import DEFAULT_SHARD_SIZE, build_index

    console = Console()
    with user_errors():
        report = build_index(
            checkpoint,
            features,
            out,
            shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
            captions=captions,
            nlist=nlist,
            batch_size=batch_size,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
            console=console,
        )
    meta = report.meta
    if report.already_complete:
        console.print(f"{out}: index already complete ({meta.num_images:,} images); nothing to do")
        return
    shards = ", ".join(
        f"{side}: {report.written.get(side, 0)} shard(s) written, {report.reused.get(side, 0)} reused"
        for side in ("images", "captions")
        if report.written.get(side) or report.reused.get(side)
    )
    stats = ", ".join(
        f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}"
        for key, value in meta.stats.items()
    )
    console.print(
        f"index {out} ({meta.kind}): {meta.num_images:,} images, {meta.num_captions:,} captions in "
        f"{report.seconds:.1f} s; {shards or 'no shards'}" + (f"; {stats}" if stats else "")
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe index build`."""
    app.add_typer(index_app, name="index")
