"""Stage `sample`: write the embedded synthetic image-caption dataset (JPEGs + Karpathy-format JSON)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.params import SampleParams
from pipeline.sample import generate_sample
from stages._stage_params import fail, stage_section


def sample_command(
    out: Path = typer.Option(..., "--out", help="Output folder: OUT/images/*.jpg and OUT/dataset.json."),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `sample` is used."),
    seed: int | None = typer.Option(None, "--seed", help="Override sample.seed."),
) -> None:
    """Generate the deterministic synthetic dataset (same seed, same bytes)."""
    section = stage_section(params, "sample", SampleParams)
    if seed is not None:
        section = section.model_copy(update={"seed": seed})
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a folder")
    try:
        summary = generate_sample(
            out,
            seed=section.seed,
            num_train=section.num_train,
            num_val=section.num_val,
            num_test=section.num_test,
            image_size=section.image_size,
            max_objects=section.max_objects,
        )
    except ValueError as exc:
        fail(str(exc))
    counts = ", ".join(f"{split} {count}" for split, count in summary.num_images.items())
    Console().print(
        f"wrote {sum(summary.num_images.values())} images ({counts}) and {summary.num_captions} captions "
        f"to {summary.dataset_json}"
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe sample`."""
    app.command("sample")(sample_command)
