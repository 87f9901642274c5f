"""Stage `report`: read the run's artifacts and write `report.md`, `report.html`, plots and plot data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.params import Params, ParamsError, load_params
from stages._stage_params import fail

SPLIT_NAMES = ("train", "val", "test")


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
    num_examples: int | None = typer.Option(
        None, "--num-examples", min=0, help="Override report.num_examples."
    ),
    top_k: int | None = typer.Option(None, "--top-k", min=1, help="Override report.top_k."),
) -> None:
    """Write the run report (Markdown + self-contained HTML) with recall tables, plots and examples."""
    from pipeline.captions import read_captions
    from pipeline.report import (
        RegionBoxes,
        ReportError,
        ReportInputs,
        SplitSize,
        build_report,
        read_json_file,
        read_metrics,
        read_ranks,
        read_training_log,
    )
    from pipeline.store import FeatureStore

    try:
        all_params = load_params(params) if params is not None else Params()
    except ParamsError as exc:
        fail(str(exc), code=2)
    chosen_dataset = dataset or all_params.prepare.dataset
    if chosen_dataset not in ("sample", "flickr30k", "coco"):
        raise typer.BadParameter(
            f"expected sample, flickr30k or coco, got {chosen_dataset!r}", param_hint="--dataset"
        )
    for label, path in (("--eval", eval_dir), ("--features", features), ("--images", images)):
        if not path.is_dir():
            fail(f"{label} {path}: directory not found")
    try:
        metrics = read_metrics(eval_dir / "metrics.json")
        ranks_path = eval_dir / "ranks.parquet"
        ranks = read_ranks(ranks_path) if ranks_path.exists() else None
        training_log = read_training_log(train_dir / "metrics.jsonl") if train_dir is not None else []
        checkpoint_json = (
            train_dir / "checkpoints" / "best" / "checkpoint.json" if train_dir is not None else None
        )
        checkpoint = read_json_file(checkpoint_json) if checkpoint_json and checkpoint_json.is_file() else {}
    except ReportError as exc:
        fail(str(exc))
    try:
        test_table = read_captions(captions)
        split_sizes = []
        if splits is not None:
            for name in SPLIT_NAMES:
                split_path = splits / name / "captions.parquet"
                if split_path.is_file():
                    table = read_captions(split_path)
                    split_sizes.append(SplitSize(name, table.num_images, len(table)))
        if not split_sizes:
            split_sizes = [
                SplitSize(f"evaluated ({captions.parent.name})", test_table.num_images, len(test_table))
            ]
    except (OSError, ValueError) as exc:
        fail(f"captions: {exc}")
    try:
        store = FeatureStore(features)
    except (OSError, ValueError) as exc:
        fail(str(exc))

    object_names: list[str] | None = None
    if objects_vocab is not None:
        if not objects_vocab.is_file():
            fail(f"--objects-vocab {objects_vocab}: file not found")
        object_names = [line.split(",")[0].strip() for line in objects_vocab.read_text().splitlines()]
    elif isinstance(store.metadata.get("object_names"), list):
        object_names = [str(name) for name in store.metadata["object_names"]]

    def region_boxes(image_ids: list[str] | tuple[str, ...]) -> dict[str, RegionBoxes]:
        present = [image_id for image_id in image_ids if image_id in store]
        return {
            record.image_id: RegionBoxes(record.boxes, record.object_ids, record.object_conf)
            for record in store.read(present)
        }

    chosen_protocol = protocol or metrics.get("protocol") or all_params.evaluate.protocol
    sections = ("prepare", "extract", "tokenize", "train", "evaluate")
    inputs = ReportInputs(
        metrics=metrics,
        dataset=chosen_dataset,
        protocol=str(chosen_protocol),
        training_log=training_log,
        ranks=ranks,
        test_captions=test_table.captions,
        test_image_ids=test_table.unique_image_ids,
        captions_per_image=test_table.captions_per_image,
        split_sizes=split_sizes,
        feature_store_rows=len(store),
        store_metadata=store.metadata,
        params={name: getattr(all_params, name).model_dump(mode="json") for name in sections},
        checkpoint=checkpoint,
        images_root=images,
        region_boxes=region_boxes,
        object_names=object_names,
        num_examples=all_params.report.num_examples if num_examples is None else num_examples,
        top_k=all_params.report.top_k if top_k is None else top_k,
        sources={
            "metrics": str(eval_dir / "metrics.json"),
            "features": str(features),
            "captions": str(captions),
            **({"training log": str(train_dir / "metrics.jsonl")} if train_dir is not None else {}),
            **({"params": str(params)} if params is not None else {}),
        },
    )
    try:
        outputs = build_report(inputs, out)
    except ReportError as exc:
        fail(str(exc))
    Console().print(
        f"report: {outputs.markdown} and {outputs.html} "
        f"({len(outputs.figures)} figures, plot data {', '.join(p.name for p in outputs.data_files)})"
    )


def register(app: typer.Typer) -> None:
    """Add `scan-pipe report`."""
    app.command("report")(report_command)
