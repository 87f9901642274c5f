"""Stage `report`: read the run's artifacts and write `report.md`, `report.html`, plots and plot data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.params import ReportParams
from stages._shell import SET_HELP, stage_section, user_errors


def report_command(
    eval_dir: Path = typer.Option(..., "--eval", help="Evaluate output: metrics.json, ranks.parquet."),
    features: Path = typer.Option(..., "--features", help="Feature store of the evaluated images (boxes)."),
    captions: Path = typer.Option(..., "--captions", help="captions.parquet of the evaluated split."),
    images: Path = typer.Option(..., "--images", help="Images root (image ids are relative to it)."),
    out: Path = typer.Option(..., "--out", help="Report folder to write."),
    train_dir: Path | None = typer.Option(
        None, "--train", help="Train output: metrics.jsonl, checkpoints/best/checkpoint.json."
    ),
    splits: Path | None = typer.Option(
        None, "--splits", help="Prepared data root with {train,val,test}/captions.parquet, for dataset sizes."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml (sections shown; `report` used)."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="sample, flickr30k or coco (default: params prepare.dataset)."
    ),
    protocol: str | None = typer.Option(
        None, "--protocol", help="Evaluation protocol (default: metrics.json, else params evaluate.protocol)."
    ),
    objects_vocab: Path | None = typer.Option(
        None,
        "--objects-vocab",
        help="objects_vocab.txt for box labels (default: names in the store metadata).",
    ),
    templates: Path | None = typer.Option(
        None,
        "--templates",
        help="Folder with report.md.j2 and/or report.html.j2 replacing the bundled templates.",
    ),
    num_examples: int | None = typer.Option(None, "--num-examples", help="Override report.num_examples."),
    top_k: int | None = typer.Option(None, "--top-k", help="Override report.top_k."),
    spread_evals: list[Path] | None = typer.Option(
        None,
        "--spread-eval",
        help="Evaluate output of one seed of this configuration (repeatable): adds a Seed spread section.",
    ),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Write the run report (Markdown + self-contained HTML) with recall tables, plots and examples."""
    settings = stage_section(
        params,
        "report",
        ReportParams,
        options={"num_examples": num_examples, "top_k": top_k},
        assignments=set_values or (),
    )
    from pipeline.report import ReportSources, write_report

    sources = ReportSources(
        eval_dir=eval_dir,
        features=features,
        captions=captions,
        images=images,
        train_dir=train_dir,
        splits=splits,
        params=params,
        objects_vocab=objects_vocab,
        spread_evals=tuple(spread_evals or ()),
    )
    with user_errors():
        outputs = write_report(
            sources, out, settings, dataset=dataset, protocol=protocol, template_dir=templates
        )
    Console().print(
        f"report: {outputs.markdown} and {outputs.html} "
        f"({len(outputs.figures)} figures, plot data {', '.join(p.name for p in outputs.data_files)})"
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe report`."""
    app.command("report")(report_command)
