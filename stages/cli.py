"""`scan-pipe` command line: one Typer app; each stage module registers its own commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="scan-pipe",
    help="Reproducible pipeline from raw JPEGs to image-text retrieval scores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Each module defines `register(app: typer.Typer) -> None`.
STAGE_MODULES = (
    "stages.sample",
    "stages.prepare",
    "stages.extract",
    "stages.weights",
    "stages.features",
    "stages.import_precomp",
    "stages.import_official",
    "stages.tokenize",
    "stages.train",
    "stages.evaluate",
    "stages.report",
    "stages.explain",
    "stages.index",
    "stages.search",
    "stages.serve",
    "stages.compare",
    "stages.seeds",
)

for _name in STAGE_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
