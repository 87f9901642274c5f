"""Stage `search`: text -> gallery images, or image -> indexed captions; shortlisted, then scored exactly."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stages._shell import EXIT_USAGE, fail, user_errors


def search_command(
    index: Path = typer.Option(..., "--index", help="Index directory written by `scan-pipe index build`."),
    text: str | None = typer.Option(None, "--text", help="Text query: find gallery images."),
    image: str | None = typer.Option(None, "--image", help="Image id of the store: find indexed captions."),
    k: int | None = typer.Option(
        None, "--k", help="Shortlist size scored exactly (default 128; clamped to the gallery, noted)."
    ),
    top: int | None = typer.Option(None, "--top", help="Results shown and written (default 10)."),
    images: Path | None = typer.Option(None, "--images", help="Images folder, for thumbnails on the page."),
    html: Path | None = typer.Option(None, "--html", help="Write the result page (HTML) here."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result (JSON) here."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="The index's checkpoint, if moved (must be the same model)."
    ),
    features: Path | None = typer.Option(
        None, "--features", help="The index's feature store, if moved (must be the same store)."
    ),
    nprobe: int | None = typer.Option(
        None, "--nprobe", help="Centroids probed per query word (MMCA: IVF lists; default 8)."
    ),
    candidates: int | None = typer.Option(
        None,
        "--candidates",
        help="SCAN: items scored on centroids before the k best (default max(16k, 2048)).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Heat maps on the page, if available."),
) -> None:
    """Shortlist k candidates from the index, score them with the model's exact score, show the best."""
    if (text is None) == (image is None):
        fail("give exactly one of --text and --image", code=EXIT_USAGE)
    if images is not None and not images.is_dir():
        fail(f"{images}: --images folder not found")
    from pipeline.search import Searcher, SearchOptions, write_result_json
    from pipeline.search_page import write_search_page

    console = Console()
    given = {"k": k, "top": top, "nprobe": nprobe, "candidates": candidates}
    options = SearchOptions(**{name: value for name, value in given.items() if value is not None})
    with user_errors():
        searcher = Searcher.open(index, checkpoint=checkpoint, features=features, device=device)
        result = searcher.text(text, options) if text is not None else searcher.image(str(image), options)
        written = [write_result_json(result, json_out)] if json_out is not None else []
        if html is not None:
            written.append(write_search_page(result, searcher, html, images_dir=images, explain=explain))
    table = Table(title=f"{result.target} for {text!r}" if text is not None else f"captions for {image}")
    for column in ("rank", "caption" if image is not None else "image", "score", "shortlist rank"):
        table.add_column(column, justify="left" if column in ("image", "caption") else "right")
    for hit in result.hits:
        label = f"{hit.caption} ({hit.image_id})" if hit.caption is not None else hit.image_id
        table.add_row(str(hit.rank), escape(label), f"{hit.score:.4f}", str(hit.shortlist_rank))
    console.print(table)
    times = result.timings_ms
    console.print(
        f"{result.k} of {result.gallery_size:,} {result.target} scored exactly; "
        f"encode {times['encode']:.1f} ms, shortlist {times['shortlist']:.1f} ms, "
        f"re-rank {times['rerank']:.1f} ms"
    )
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    if written:
        console.print(f"wrote {', '.join(str(path) for path in written)}")


def register(app: typer.Typer) -> None:
    """Add `scan-pipe search`."""
    app.command("search")(search_command)
