"""The report's text and tables, from loaded inputs: configuration, dataset, recall beside chance, the papers.

Nothing here reads or writes files; the sections with figures are assembled in `pipeline.report.build`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.report.chance import DIRECTIONS, RECALL_KS, chance_metrics
from pipeline.report.document import Block, Section, Table
from pipeline.report.inputs import ReportError, ReportInputs
from pipeline.report.published import PAPER_DATASETS, PROTOCOL_TITLES, published_rows

if TYPE_CHECKING:
    from pipeline.spread import SpreadReport

DIRECTION_TITLES = {"i2t": "image → text (sentence retrieval)", "t2i": "text → image (image retrieval)"}
METRIC_COLUMNS = ("r1", "r5", "r10", "medr", "meanr")
RECALL_HEADERS = [
    "",
    "i2t R@1",
    "i2t R@5",
    "i2t R@10",
    "i2t medr",
    "i2t meanr",
    "t2i R@1",
    "t2i R@5",
    "t2i R@10",
    "t2i medr",
    "t2i meanr",
    "rsum",
]
# The whole-matrix protocol of a dataset: what metrics.json holds at its top level under protocol `all`.
WHOLE_MATRIX_PROTOCOL = {"flickr30k": "flickr30k_1k", "coco": "coco_5k"}
PARAMS_SECTIONS_SHOWN = ("prepare", "extract", "tokenize", "train", "evaluate")
UNTRAINED_WARNING = (
    "the region features come from an **untrained detector** (random weights), so the recall below tests "
    "the plumbing of the pipeline (extraction, storage, training, evaluation), not the paper's numbers. Use "
    "the published bottom-up-attention weights to reproduce those."
)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings with dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers with `digits` decimals, missing values as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def is_untrained(metadata: Mapping[str, Any]) -> bool:
    """Whether the store says its features come from a randomly initialised detector."""
    value = metadata.get("untrained")
    if isinstance(value, str):
        return value.lower() in ("true", "1", "yes")
    return bool(value) or str(metadata.get("weights", "")).lower() == "random"


def gallery_size(metrics: Mapping[str, Any], inputs: ReportInputs) -> int:
    """Images per ranking: per fold for coco_1k, else the whole evaluated split."""
    for key in ("images_per_fold", "num_images"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            return int(value)
    if inputs.test_captions.num_images:
        return inputs.test_captions.num_images
    if inputs.ranks is not None and len(inputs.ranks["i2t"].ranks):
        return len(inputs.ranks["i2t"].ranks)
    raise ReportError("cannot tell the gallery size: metrics lack num_images and there are no test captions")


def protocol_results(
    metrics: Mapping[str, Any], dataset: str, protocol: str | None
) -> dict[str, Mapping[str, Any]]:
    """The evaluated results by protocol name (`protocol` as chosen by the caller, else the file's own).

    A plain metrics.json holds one protocol's numbers at the top level. Protocol `all` holds the
    whole-matrix numbers at the top level (COCO 5K on COCO, the 1K test on Flickr30K) and the 5-fold
    numbers under `coco_1k`.
    """
    name = str(protocol or metrics.get("protocol") or "evaluated")
    if name != "all":
        return {name: metrics}
    results: dict[str, Mapping[str, Any]] = {WHOLE_MATRIX_PROTOCOL.get(dataset, "whole split"): metrics}
    nested = metrics.get("coco_1k")
    if isinstance(nested, Mapping):
        results["coco_1k"] = nested
    return results


def run_variant(inputs: ReportInputs) -> str:
    """The evaluated model, in the published results' naming (`ensemble:a+b` for an averaged pair)."""
    models = inputs.metrics.get("models")
    if isinstance(models, list) and models:
        return str(models[0]) if len(models) == 1 else "ensemble:" + "+".join(map(str, models))
    return str(inputs.checkpoint.get("model_name") or inputs.params.train.model)


def recall_row(label: str, values: Mapping[str, Any], *, with_ranks: bool = True) -> list[str]:
    """A row of the recall tables: label, R@K/medr/meanr per direction, rsum (summed when not stated)."""
    cells = [label]
    for direction in DIRECTIONS:
        for column in METRIC_COLUMNS:
            ranks_missing = column in ("medr", "meanr") and not with_ranks
            cells.append("—" if ranks_missing else fmt(values.get(f"{direction}_{column}")))
    rsum = values.get("rsum")
    if rsum is None and all(f"{d}_r{k}" in values for d in DIRECTIONS for k in RECALL_KS):
        rsum = sum(float(values[f"{d}_r{k}"]) for d in DIRECTIONS for k in RECALL_KS)
    cells.append(fmt(rsum))
    return cells


def _recall_table(rows: Sequence[list[str]], caption: str, bold_rows: set[int]) -> Table:
    return Table(pd.DataFrame(rows, columns=RECALL_HEADERS), caption, frozenset(bold_rows))


def _key_value_table(rows: Sequence[tuple[str, Any]], headers: tuple[str, str], caption: str) -> Table:
    cells = [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in rows]
    return Table(pd.DataFrame(cells, columns=list(headers)), caption)


def configuration_section(inputs: ReportInputs) -> Section:
    """Dataset, protocol, model variant, detector weights and where each input came from."""
    metadata = inputs.store.metadata
    flat_metadata = flatten(metadata)
    if is_untrained(metadata):
        seed = f", seed {metadata['weights_seed']}" if "weights_seed" in metadata else ""
        detector = f"**untrained** (random weights{seed})"
    else:
        detector = f"weights sha256 `{metadata.get('weights_sha256') or 'not recorded'}`"
    details = [
        f"{label} {flat_metadata[key]}"
        for label, key in (
            ("arch", "arch"),
            ("test scale", "detector_config.test_scale"),
            ("boxes", "detector_config.box_mode"),
            ("precision", "precision"),
        )
        if key in flat_metadata
    ]
    epoch = f" (checkpoint epoch {inputs.checkpoint['epoch']})" if "epoch" in inputs.checkpoint else ""
    items = [
        f"Dataset: **{inputs.dataset}**; evaluation protocol: **{inputs.protocol}**",
        f"Model variant: **{run_variant(inputs)}**{epoch}",
        f"Detector: {detector}; "
        + ", ".join([*details, f"feature dim {metadata.get('feature_dim', '?')}"])
        + f" stored as {metadata.get('feature_dtype', '?')}",
        *(f"{label}: `{path}`" for label, path in inputs.sources.items()),
    ]
    return Section("Run configuration", [items])


def dataset_section(inputs: ReportInputs) -> Section:
    """Images and captions per split, and how many images the feature store holds."""
    rows = [(s.name, str(s.images), str(s.captions)) for s in inputs.split_sizes]
    blocks: list[Block] = []
    if rows:
        blocks.append(Table(pd.DataFrame(rows, columns=["split", "images", "captions"])))
    blocks.append(f"Feature store: {len(inputs.store)} images with region features.")
    return Section("Dataset", blocks)


def recall_section(inputs: ReportInputs) -> Section:
    """This run's recall per protocol, each beside the chance level of its gallery (and per fold)."""
    cpi = inputs.test_captions.captions_per_image
    rows: list[list[str]] = []
    bold: set[int] = set()
    summary: list[str] = []
    for name, values in protocol_results(inputs.metrics, inputs.dataset, inputs.protocol).items():
        gallery = gallery_size(values, inputs)
        chance = chance_metrics(gallery, cpi)
        per_fold = " per fold" if values.get("images_per_fold") else ""
        bold.add(len(rows))
        label = PROTOCOL_TITLES.get(name, name) if inputs.dataset in PAPER_DATASETS else f"protocol {name}"
        rows.append(recall_row(f"this run, {label}", values))
        rows.append(recall_row(f"chance, {gallery} images x {gallery * cpi} captions{per_fold}", chance))
        summary.append(f"rsum **{recall_row('', values)[-1]}** against **{chance['rsum']:.1f}** at chance")
        folds = values.get("folds")
        if isinstance(folds, list) and all(isinstance(f, Mapping) for f in folds):
            rows += [recall_row(f"fold {i + 1}", fold) for i, fold in enumerate(folds)]
    paragraphs = []
    two_stage = inputs.metrics.get("two_stage")
    if isinstance(two_stage, Mapping) and isinstance(two_stage.get("metrics"), Mapping):
        k = two_stage["k"]
        rows.append(recall_row(f"two-stage, shortlists of k={k} (whole split)", two_stage["metrics"]))
        paragraphs.append(
            f"Two-stage evaluation (mmca.md 5.3) on the same model: {two_stage['pairs_scored']:,} of "
            f"{two_stage['pairs_total']:,} pairs scored in {two_stage['time_s']:.1f} s, against "
            f"{two_stage['exact_time_s']:.1f} s for exact. Only its R@K with K <= {k} are the two-stage "
            "system's recall; its medr/meanr are not comparable with exact evaluation."
        )
    return Section(
        "Recall",
        [
            f"R@K in percent; i2t: {DIRECTION_TITLES['i2t']}, an image query counts its best-ranked of "
            f"{cpi} captions; t2i: {DIRECTION_TITLES['t2i']}. medr/meanr: ranks counted from 1. "
            "The chance rows are the expectation under a random ranking of the same gallery.",
            _recall_table(rows, "Retrieval on the evaluated split", bold),
            "; ".join(summary) + ".",
            *paragraphs,
        ],
    )


def published_section(inputs: ReportInputs, published: Mapping[str, Any]) -> Section:
    """This run beside the papers' numbers for the same protocol (Flickr30K and COCO only)."""
    title = "Published results"
    if inputs.dataset not in PAPER_DATASETS:
        return Section(
            title,
            [
                f"The paper's numbers are for Flickr30K and COCO; this run's dataset ({inputs.dataset}) "
                "is not comparable with them, so they are not shown."
            ],
        )
    ours = protocol_results(inputs.metrics, inputs.dataset, inputs.protocol)
    variant = run_variant(inputs)
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for row in published_rows(inputs.dataset, None, published):
        if row["protocol"] in ours:
            by_protocol.setdefault(row["protocol"], []).append(row)
    blocks: list[Block] = [
        f"Source: {published.get('source', 'pipeline/resources/published_results.json')} "
        "The papers report R@K only; rsum is the paper's where stated, else the sum of the six recalls."
    ]
    if not by_protocol:
        blocks.append(
            f"No published numbers for protocol {', '.join(ours)} on {inputs.dataset}; the papers report "
            f"{', '.join(PAPER_DATASETS[inputs.dataset])}."
        )
    for protocol, entries in by_protocol.items():
        rows = [recall_row("this run", ours[protocol])]
        bold = {0}
        for entry in entries:
            same_variant = entry.get("variant") == variant
            if same_variant:
                bold.add(len(rows))
            label = entry["label"] + (" (same variant)" if same_variant else "")
            rows.append(recall_row(label, entry, with_ranks=False))
        caption = f"{PROTOCOL_TITLES.get(protocol, protocol)}: this run beside the papers"
        blocks.append(_recall_table(rows, caption, bold))
    return Section(title, blocks)


def seed_spread_section(inputs: ReportInputs, spread: SpreadReport) -> Section:
    """Mean ± std, min and max per metric over the seeds given, beside this run and the paper."""
    rows = [{**row, "this run": fmt(inputs.metrics.get(row["metric"]), 2)} for row in spread.display_rows()]
    headers = ["metric", "n", "mean ± std", "min (run)", "max (run)", "this run", "paper", "paper seeds"]
    blocks: list[Block] = [
        f"{len(spread.runs)} runs given as seeds of this configuration ({', '.join(spread.runs)}): "
        "differences of this size between two runs that differ only in the training seed are normal, "
        "not a bug. std is the sample standard deviation (n - 1).",
        Table(pd.DataFrame(rows, columns=headers), "Seed spread per metric"),
    ]
    if spread.paper is not None:
        blocks.append(f"Paper: {spread.paper.label}. {spread.paper.source}".strip())
        if spread.paper.seed_source:
            blocks.append(f"Paper seed range: {spread.paper.seed_source}")
    blocks += [f"Note: {note}." for note in spread.notes]
    return Section("Seed spread", blocks)


def parameters_section(inputs: ReportInputs) -> Section:
    """Store metadata and params.yaml sections in full (long, so last: the reproducibility record)."""
    metadata_rows = [
        (key, value)
        for key, value in sorted(flatten(inputs.store.metadata).items())
        if not isinstance(value, list) or len(json.dumps(value)) <= 80  # skip e.g. 1,600 class names
    ]
    blocks: list[Block] = [
        _key_value_table(metadata_rows, ("key", "value"), "feature store metadata (extractor)")
    ]
    for name in PARAMS_SECTIONS_SHOWN:
        values = getattr(inputs.params, name).model_dump(mode="json")
        caption = f"params.yaml section `{name}`"
        blocks.append(_key_value_table(list(values.items()), ("parameter", "value"), caption))
    return Section("Configuration details", blocks)
