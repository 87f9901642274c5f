"""Stage `sample`: write the embedded synthetic image-caption dataset (JPEGs + Karpathy-format JSON)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.params import SampleParams
from stages._shell import SET_HELP, fail, stage_section, user_errors


def sample_command(
    out: Path = typer.Option(..., "--out", help="Output folder: OUT/images/*.jpg and OUT/dataset.json."),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `sample` is used."),
    seed: int | None = typer.Option(None, "--seed", help="Override sample.seed."),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Generate the deterministic synthetic dataset (same seed, same bytes)."""
    settings = stage_section(
        params, "sample", SampleParams, options={"seed": seed}, assignments=set_values or ()
    )
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder")
    from pipeline.sample import generate_sample

    with user_errors():
        summary = generate_sample(out, **settings.model_dump())
    counts = ", ".join(f"{split} {count}" for split, count in summary.num_images.items())
    Console().print(
        f"wrote {sum(summary.num_images.values())} images ({counts}) and {summary.num_captions} captions "
        f"to {summary.dataset_json}"
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe sample`."""
    app.command("sample")(sample_command)
