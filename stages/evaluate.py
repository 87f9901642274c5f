"""Stage `evaluate`: recall metrics of one checkpoint or an ensemble on a split, under a named protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.params import EvaluateParams
from stages._shell import EXIT_USAGE, SET_HELP, fail, stage_section, user_errors


def metrics_table(metrics: dict[str, Any], keys: list[str], title: str) -> Table:
    """A rich table, one row per metric and one column per result (the protocol's, then coco_1k folds)."""
    columns: list[tuple[str, dict[str, Any]]] = [(str(metrics.get("protocol", "")), metrics)]
    nested = metrics.get("coco_1k") if isinstance(metrics.get("coco_1k"), dict) else None
    if nested is not None:
        columns.append(("coco_1k", nested))
    for source in (metrics, nested or {}):
        columns.extend((f"fold {index}", fold) for index, fold in enumerate(source.get("folds", [])))
    two_stage = metrics.get("two_stage")
    if isinstance(two_stage, dict):
        columns.append((f"two-stage k={two_stage['k']}", two_stage["metrics"]))
    table = Table(title=title)
    table.add_column("metric")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for key in keys:
        table.add_row(key, *(f"{float(values[key]):.2f}" if key in values else "—" for _, values in columns))
    return table


def evaluate_command(
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", help="Checkpoint directory; repeat for an ensemble (score matrices averaged)."
    ),
    features: Path = typer.Option(
        ..., "--features", help="Feature store directory holding the split's images."
    ),
    captions: Path = typer.Option(..., "--captions", help="captions.parquet of the split to evaluate."),
    out: Path = typer.Option(..., "--out", help="Output directory: metrics.json, ranks.parquet, scores.npy."),
    protocol: str | None = typer.Option(
        None,
        "--protocol",
        help="flickr30k_1k, coco_1k (5 folds), coco_5k, or all. Overrides evaluate.protocol.",
    ),
    model: list[str] | None = typer.Option(
        None, "--model", help="Expected model variant of each checkpoint (one per --checkpoint, in order)."
    ),
    vocab: Path | None = typer.Option(
        None, "--vocab", help="Vocabulary JSON (default: the checkpoint's own)."
    ),
    text_features: Path | None = typer.Option(
        None,
        "--text-features",
        help="BERT-input models (MMCA): the cached BERT outputs `scan-pipe tokenize` wrote (DIR/<split>).",
    ),
    rerank_k: int | None = typer.Option(
        None, "--rerank-k", help="MMCA: also two-stage evaluation with shortlists of k (evaluate.rerank_k)."
    ),
    save_scores: bool | None = typer.Option(
        None, "--save-scores/--no-save-scores", help="Also write the score matrix as scores.npy."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `evaluate` is used."),
    block_size: int | None = typer.Option(None, "--block-size", help="Images x captions per scoring block."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images/captions per encoder call."),
    device: str | None = typer.Option(None, "--device", help="Override evaluate.device (auto, cpu, cuda)."),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache of the memory-mapped feature table."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Score a split with trained checkpoints; write recall metrics, per-query ranks and optionally scores."""
    settings = stage_section(
        params,
        "evaluate",
        EvaluateParams,
        options={
            "protocol": protocol,
            "save_scores": save_scores,
            "block_size": block_size,
            "batch_size": batch_size,
            "device": device,
            "rerank_k": rerank_k,
        },
        assignments=set_values or (),
    )
    for path in checkpoint:
        if not path.exists():
            fail(f"{path}: --checkpoint not found")
    if not features.is_dir():
        fail(f"{features}: --features directory not found")
    if not captions.is_file():
        fail(f"{captions}: --captions file not found")
    if model and len(model) != len(checkpoint):
        fail(
            f"{len(model)} --model value(s) for {len(checkpoint)} --checkpoint(s); give one per checkpoint",
            code=EXIT_USAGE,
        )
    from pipeline.evaluation import evaluate_run, write_evaluation
    from pipeline.metrics import METRIC_KEYS

    console = Console()
    with user_errors():
        run = evaluate_run(
            checkpoint,
            features,
            captions,
            vocab_path=vocab,
            text_features=text_features,
            rerank_k=settings.rerank_k,
            protocol=settings.protocol,
            block_size=settings.block_size,
            batch_size=settings.batch_size,
            captions_per_image=settings.captions_per_image,
            device=settings.device,
            cache_dir=cache_dir,
            expect_models=model or None,
            progress=progress,
            console=console,
        )
    written = write_evaluation(run, out, save_scores=settings.save_scores)
    members = " + ".join(run.metrics["models"])
    title = f"{members} on {captions} ({run.layout.num_images} images)"
    console.print(metrics_table(run.metrics, list(METRIC_KEYS), title))
    if run.metrics.get("two_stage_skipped"):
        console.print(run.metrics["two_stage_skipped"])
    two_stage = run.metrics.get("two_stage")
    if two_stage:
        k, seconds, exact = two_stage["k"], two_stage["time_s"], two_stage["exact_time_s"]
        console.print(
            f"two-stage (k={k}): {seconds:.1f} s for {two_stage['pairs_scored']:,} of "
            f"{two_stage['pairs_total']:,} pairs; exact: {exact:.1f} s. {two_stage['note']}"
        )
    console.print(f"wrote {', '.join(path.name for path in written)} to {out}")


def register(app: typer.Typer) -> None:
    """Add `scan-pipe evaluate`."""
    app.command("evaluate")(evaluate_command)
