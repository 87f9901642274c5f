"""Stage `serve`: a local search page over a built index (type a query or pick an image; ranked results with
heat maps). A shell: options, one library call."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._shell import user_errors


def serve_command(
    index: Path = typer.Option(..., "--index", help="Index directory written by `scan-pipe index build`."),
    images: Path | None = typer.Option(None, "--images", help="Images folder, for thumbnails and heat maps."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; the default keeps the page on this machine."
    ),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Serve the search page at http://HOST:PORT/ until interrupted (Ctrl-C)."""
    from pipeline.serve import serve

    with user_errors():
        serve(index, images_dir=images, host=host, port=port, device=device)


def register(app: typer.Typer) -> None:
    """Add `scan-pipe serve`."""
    app.command("serve")(serve_command)
