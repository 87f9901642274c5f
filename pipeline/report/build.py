"""Assemble the report and write it: `report.md`, `report.html`, the PNG figures and their data as CSV.

Every file is written atomically (`pipeline.atomic`), so a report folder never holds half a file. The CSVs
(`recall_at_k.csv`, `training_curves.csv`) are what `dvc plots` draws.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.atomic import write_text_atomic
from pipeline.errors import UserError
from pipeline.params import ReportParams
from pipeline.report.chance import DIRECTIONS, RECALL_KS, chance_curve, recall_curve
from pipeline.report.document import Block, Figure, Page, Section, render_page
from pipeline.report.examples import BOXES_DRAWN, choose_examples, draw_retrieval_example
from pipeline.report.inputs import ReportInputs, ReportSources, load_inputs
from pipeline.report.plots import plot_recall_at_k, plot_seed_spread, plot_training_curves
from pipeline.report.published import load_published_results
from pipeline.report.sections import (
    UNTRAINED_WARNING,
    configuration_section,
    dataset_section,
    gallery_size,
    is_untrained,
    parameters_section,
    published_section,
    recall_section,
    seed_spread_section,
)

if TYPE_CHECKING:
    from pipeline.report.examples import RetrievalExample
    from pipeline.spread import RunSet
    from pipeline.store import RegionRecord

RECALL_CURVE_MAX_K = 100


@dataclass(frozen=True)
class ReportOutputs:
    """The files a report run wrote."""

    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)
    data_files: list[Path] = field(default_factory=list)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def _recall_curve_figure(inputs: ReportInputs, out: Path) -> Figure:
    """Recall@K up to K=100 from the ranks table (else the three metric points), chance dashed; CSV too."""
    cpi = inputs.test_captions.captions_per_image
    if inputs.ranks is not None and len(inputs.ranks["t2i"].ranks):
        num_images = len(inputs.ranks["i2t"].ranks)
        ks = np.arange(1, min(num_images * cpi, RECALL_CURVE_MAX_K) + 1)
        ours = {d: recall_curve(inputs.ranks[d].ranks, len(ks)) for d in DIRECTIONS}
        note = f"over all {num_images} evaluated images"
    else:
        num_images = gallery_size(inputs.metrics, inputs)
        ks = np.array(RECALL_KS)
        ours = {d: np.array([float(inputs.metrics[f"{d}_r{k}"]) for k in RECALL_KS]) for d in DIRECTIONS}
        note = "at K = 1, 5, 10 (no ranks table given)"
    chance = chance_curve(num_images, cpi, ks)
    plot_recall_at_k(ks, ours, chance, out / "recall_at_k.png")
    columns = {"k": ks, **ours, **{f"{d}_chance": chance[d] for d in DIRECTIONS}}
    _write_csv(out / "recall_at_k.csv", pd.DataFrame(columns).round(4))
    return Figure("recall_at_k.png", f"Recall@K {note}; dashed: chance level")


def _training_section(inputs: ReportInputs, out: Path) -> Section:
    """Loss and validation rsum per epoch (PNG, and CSV for `dvc plots`)."""
    log = inputs.training_log
    if not log:
        return Section("Training", ["No training log entries were given."])
    plot_training_curves(log, out / "training_curves.png")
    rows = [(r.epoch, r.train_loss, r.val_rsum, r.lr) for r in log]
    frame = pd.DataFrame(rows, columns=["epoch", "train_loss", "val_rsum", "lr"])
    _write_csv(out / "training_curves.csv", frame)
    best = max(log, key=lambda record: record.val_rsum)
    return Section(
        "Training",
        [
            Figure("training_curves.png", "Training loss and validation rsum per epoch"),
            f"{len(log)} epochs logged; best validation rsum {best.val_rsum:.1f} at epoch {best.epoch}.",
        ],
    )


def _top_match_heats(
    inputs: ReportInputs, examples: list[RetrievalExample], regions: Mapping[str, RegionRecord]
) -> tuple[list[np.ndarray | None], str]:
    """The evaluated checkpoint's per-region weights for each query's top image, and a sentence saying what
    they are; without a checkpoint none, and a checkpoint that cannot explain (its vocabulary or BERT gone)
    leaves the examples untinted with the reason instead of failing the report."""
    none: list[np.ndarray | None] = [None] * len(examples)
    if inputs.checkpoint_dir is None:
        return none, ""
    from pipeline.explain import ExplainError, load_explainer

    tokenize = inputs.params.tokenize
    try:
        explainer = load_explainer(
            inputs.checkpoint_dir,
            bert=tokenize.bert,
            max_words=tokenize.max_words,
            text_dtype=tokenize.text_feature_dtype,
        )
    except UserError as exc:
        return none, f"No attention heat maps ({inputs.checkpoint_dir}): {exc}"
    heats: list[np.ndarray | None] = []
    label = ""
    for example in examples:
        top = regions.get(example.retrieved_image_ids[0]) if example.retrieved_image_ids else None
        try:  # a caption of unknown words only has nothing to show: that example stays untinted
            explanation = None if top is None else explainer.explain(top, example.caption)
        except ExplainError:
            explanation = None
        heats.append(None if explanation is None else explanation.region_weights())
        label = label or (explanation.region_weights_label if explanation is not None else "")
    if not label:
        return heats, ""
    return heats, (
        f"The top image of each query is tinted by the model's {label} (brighter is more, scaled to the "
        "image's largest weight; where boxes overlap the larger weight wins). `scan-pipe explain` shows "
        "the full attention of a pair."
    )


def _examples_section(inputs: ReportInputs, out: Path) -> Section:
    """A few caption queries drawn with their top-k images, boxes and the ground truth marked; the top image
    tinted by the evaluated model's attention when its checkpoint is at hand."""
    title = "Retrieval examples"
    captions = inputs.test_captions
    top_k = inputs.settings.top_k
    examples = []
    if inputs.ranks is not None:
        examples = choose_examples(
            inputs.ranks["t2i"],
            captions.captions,
            captions.unique_image_ids,
            count=inputs.settings.num_examples,
            top_k=top_k,
            captions_per_image=captions.captions_per_image,
        )
    if not examples:
        return Section(
            title, ["No retrieval examples: they need the ranks table and `num_examples` above 0."]
        )
    wanted = sorted({i for e in examples for i in (*e.retrieved_image_ids, e.gt_image_id)})
    stored = [image_id for image_id in wanted if image_id in inputs.store]
    regions = {record.image_id: record for record in inputs.store.read(stored)}
    heats, heat_note = _top_match_heats(inputs, examples, regions)
    blocks: list[Block] = [
        f"Caption queries and their top {top_k} images (best first), with the {BOXES_DRAWN} most confident "
        "region boxes drawn and labelled; the ground-truth image is framed green (appended with its rank "
        "when it is not among the top images)."
    ]
    if heat_note:
        blocks.append(heat_note)
    for number, (example, heat) in enumerate(zip(examples, heats, strict=True), start=1):
        name = f"example_{number}.png"
        draw_retrieval_example(
            example, inputs.images_root, regions, out / name, inputs.object_names, top_heat=heat
        )
        verdict = "found at rank 1" if example.gt_rank == 0 else f"ground truth at rank {example.gt_rank + 1}"
        blocks.append(Figure(name, f'Query {example.caption_index}: "{example.caption}" ({verdict})'))
    return Section(title, blocks)


def _seed_spread_section(
    inputs: ReportInputs, runs: RunSet, out: Path, published: Mapping[str, Any]
) -> Section:
    """The seeds' spread table and a strip plot of their runs with the paper's value marked."""
    from pipeline.spread import build_spread, runs_frame

    spread = build_spread(runs, dataset=inputs.dataset, published=published)
    paper = spread.paper
    plot_seed_spread(
        runs_frame(runs, list(spread.frame.index)),
        paper.values if paper else {},
        paper.seed_ranges if paper else {},
        out / "seed_spread.png",
    )
    section = seed_spread_section(inputs, spread)
    caption = "Each metric over the seeds (points; box from 3 runs), the paper's value as a black bar"
    figure = Figure("seed_spread.png", caption + (", its published seed range shaded" if paper else ""))
    return Section(section.title, [*section.blocks, figure])


def build_report(
    inputs: ReportInputs,
    out_dir: str | Path,
    *,
    published: Mapping[str, Any] | None = None,
    template_dir: Path | None = None,
) -> ReportOutputs:
    """Write the report of `inputs` into `out_dir` through the templates (`template_dir`'s own first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    published = published if published is not None else load_published_results()
    recall = recall_section(inputs)
    sections = [
        configuration_section(inputs),
        dataset_section(inputs),
        Section(recall.title, [*recall.blocks, _recall_curve_figure(inputs, out)]),
        published_section(inputs, published),
        *([_seed_spread_section(inputs, inputs.spread_runs, out, published)] if inputs.spread_runs else []),
        _training_section(inputs, out),
        _examples_section(inputs, out),
        parameters_section(inputs),
    ]
    untrained = is_untrained(inputs.store.metadata)
    page = Page(
        title=f"scan-pipe report: {inputs.dataset}",
        sections=sections,
        warning=UNTRAINED_WARNING if untrained else None,
        warning_title="Untrained detector",
    )
    rendered = render_page(page, out, template_dir)
    markdown_path, html_path = out / "report.md", out / "report.html"
    write_text_atomic(markdown_path, rendered["markdown"])
    write_text_atomic(html_path, rendered["html"])
    figures = [
        out / block.path for section in sections for block in section.blocks if isinstance(block, Figure)
    ]
    data_files = [out / "recall_at_k.csv", *([out / "training_curves.csv"] if inputs.training_log else [])]
    return ReportOutputs(markdown_path, html_path, figures, data_files)


def write_report(
    sources: ReportSources,
    out_dir: str | Path,
    settings: ReportParams,
    *,
    dataset: str | None = None,
    protocol: str | None = None,
    template_dir: Path | None = None,
) -> ReportOutputs:
    """Load the run's files and write its report: what the `report` stage does."""
    inputs = load_inputs(sources, settings, dataset=dataset, protocol=protocol)
    return build_report(inputs, out_dir, template_dir=template_dir)
