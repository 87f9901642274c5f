"""Everything the report shows, loaded from the run's files; every error names the file at fault.

The report reads what the stages wrote: the evaluate stage's `metrics.json` and `ranks.parquet`, the train
stage's log (`pipeline.training_log`) and best checkpoint's `checkpoint.json`, the captions tables, the
feature store (boxes of the example images, the extractor's metadata and its object names) and params.yaml.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from pipeline.captions import CaptionTable, read_captions
from pipeline.errors import UserError
from pipeline.labels import display_names, read_label_vocabulary
from pipeline.params import Params, PrepareParams, ReportParams, load_params
from pipeline.report.chance import DIRECTIONS, RECALL_KS
from pipeline.store import FeatureStore
from pipeline.training_log import EpochRecord, read_training_log

if TYPE_CHECKING:
    from pipeline.spread import RunSet

SPLIT_NAMES = ("train", "val", "test")
DATASETS: tuple[str, ...] = get_args(PrepareParams.model_fields["dataset"].annotation)


class ReportError(UserError):
    """An input of the report is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class ReportSources:
    """Where the report's inputs are; the optional ones leave their part of the report out."""

    eval_dir: Path  # metrics.json, ranks.parquet (optional)
    features: Path  # the feature store of the evaluated images
    captions: Path  # captions.parquet of the evaluated split
    images: Path  # images root; image ids are relative to it
    train_dir: Path | None = None  # metrics.jsonl, checkpoints/best/checkpoint.json
    splits: Path | None = None  # {train,val,test}/captions.parquet, for the dataset sizes
    params: Path | None = None  # params.yaml (schema defaults without it)
    objects_vocab: Path | None = None  # objects_vocab.txt for box labels (default: the store metadata's)
    spread_evals: Sequence[Path] = ()  # evaluate outputs of other seeds of this configuration


@dataclass(frozen=True)
class QueryRanks:
    """Per-query results of one direction: 0-based rank of the ground truth, best-first retrieved indices."""

    ranks: np.ndarray  # (Q,)
    topk: list[list[int]]  # best-first retrieved indices (captions for i2t, images for t2i)
    gt_image: np.ndarray  # (Q,) the query's own image index


@dataclass(frozen=True)
class SplitSize:
    """Images and captions of one split, for the dataset table."""

    name: str
    images: int
    captions: int


@dataclass(frozen=True)
class ReportInputs:
    """The loaded inputs; `settings` is the params `report` section with the command's overrides."""

    metrics: Mapping[str, Any]
    dataset: str  # sample | flickr30k | coco
    protocol: str
    params: Params
    settings: ReportParams
    store: FeatureStore
    test_captions: CaptionTable
    images_root: Path
    split_sizes: Sequence[SplitSize] = ()
    training_log: Sequence[EpochRecord] = ()
    checkpoint: Mapping[str, Any] = field(default_factory=dict)  # checkpoint.json of the evaluated model
    checkpoint_dir: Path | None = None  # its folder, when present: the examples' attention heat maps
    ranks: Mapping[str, QueryRanks] | None = None
    sources: Mapping[str, str] = field(default_factory=dict)  # label -> path, listed in the report
    object_vocabulary: Sequence[str] | None = None  # a user's objects_vocab.txt lines, else the store's
    spread_runs: RunSet | None = None  # the seeds' metrics, for the seed-spread section

    @property
    def object_names(self) -> list[str] | None:
        """Box labels: the first synonym per vocabulary line (the given file's, else the extractor's)."""
        lines = self.object_vocabulary or self.store.metadata.get("object_names")
        return display_names(lines) if isinstance(lines, Sequence) and not isinstance(lines, str) else None


def read_json_file(path: Path) -> Any:
    """Parse a JSON file, naming it in the error."""
    if not path.is_file():
        raise ReportError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON: {exc}") from exc


def read_metrics(path: Path) -> dict[str, Any]:
    """`metrics.json` of the evaluate stage: needs at least the six recalls."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object of metrics")
    missing = [f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_KS if f"{d}_r{k}" not in data]
    if missing:
        raise ReportError(f"{path}: missing metric(s) {', '.join(missing)}")
    return data


def read_ranks(path: Path) -> dict[str, QueryRanks]:
    """`ranks.parquet` of the evaluate stage, split by `query_type` (i2t / t2i)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ReportError(f"{path}: ranks table not found")
    try:
        table = pq.read_table(path, columns=["query_type", "query_index", "image_index", "rank", "topk"])
    except Exception as exc:  # pyarrow raises several types for missing columns / corrupt files
        raise ReportError(f"{path}: cannot read the ranks table: {exc}") from exc
    data = table.to_pydict()
    result: dict[str, QueryRanks] = {}
    for direction in DIRECTIONS:
        rows = [i for i, kind in enumerate(data["query_type"]) if kind == direction]
        rows.sort(key=lambda i: data["query_index"][i])
        result[direction] = QueryRanks(
            ranks=np.array([data["rank"][i] for i in rows], dtype=np.int64),
            topk=[list(data["topk"][i]) for i in rows],
            gt_image=np.array([data["image_index"][i] for i in rows], dtype=np.int64),
        )
    return result


def _split_sizes(splits: Path | None, test_captions: CaptionTable, captions_path: Path) -> list[SplitSize]:
    """Images and captions per prepared split; the evaluated split alone when no splits folder is given."""
    sizes = []
    for name in SPLIT_NAMES if splits is not None else ():
        path = splits / name / "captions.parquet"
        if path.is_file():
            table = read_captions(path)
            sizes.append(SplitSize(name, table.num_images, len(table)))
    if not sizes:
        label = f"evaluated ({captions_path.parent.name})"
        sizes.append(SplitSize(label, test_captions.num_images, len(test_captions)))
    return sizes


def load_inputs(
    sources: ReportSources,
    settings: ReportParams,
    *,
    dataset: str | None = None,
    protocol: str | None = None,
) -> ReportInputs:
    """Read every input; `dataset` defaults to params `prepare.dataset`, `protocol` to the evaluated one."""
    for label, path in (("evaluation", sources.eval_dir), ("images", sources.images)):
        if not path.is_dir():
            raise ReportError(f"{path}: {label} folder not found")
    params = load_params(sources.params) if sources.params is not None else Params()
    chosen_dataset = dataset or params.prepare.dataset
    if chosen_dataset not in DATASETS:
        raise ReportError(f"dataset {chosen_dataset!r}: expected one of {', '.join(DATASETS)}")
    metrics_path = sources.eval_dir / "metrics.json"
    metrics = read_metrics(metrics_path)
    ranks_path = sources.eval_dir / "ranks.parquet"
    test_captions = read_captions(sources.captions)
    sources_shown = {"metrics": metrics_path, "features": sources.features, "captions": sources.captions}
    training_log: list[EpochRecord] = []
    checkpoint: dict[str, Any] = {}
    checkpoint_dir: Path | None = None
    if sources.train_dir is not None:
        log_path = sources.train_dir / "metrics.jsonl"
        training_log = read_training_log(log_path)
        sources_shown["training log"] = log_path
        checkpoint_json = sources.train_dir / "checkpoints" / "best" / "checkpoint.json"
        if checkpoint_json.is_file():
            checkpoint, checkpoint_dir = read_json_file(checkpoint_json), checkpoint_json.parent
    if sources.params is not None:
        sources_shown["params"] = sources.params
    spread_runs = None
    if sources.spread_evals:  # imported only when asked for: it loads the metrics module (torch)
        from pipeline.spread import runs_from_metrics_files

        spread_runs = runs_from_metrics_files(sources.spread_evals)
    return ReportInputs(
        metrics=metrics,
        dataset=chosen_dataset,
        protocol=str(protocol or metrics.get("protocol") or params.evaluate.protocol),
        params=params,
        settings=settings,
        store=FeatureStore(sources.features),
        test_captions=test_captions,
        images_root=sources.images,
        split_sizes=_split_sizes(sources.splits, test_captions, sources.captions),
        training_log=training_log,
        checkpoint=checkpoint,
        checkpoint_dir=checkpoint_dir,
        ranks=read_ranks(ranks_path) if ranks_path.exists() else None,
        sources={label: str(path) for label, path in sources_shown.items()},
        object_vocabulary=(
            read_label_vocabulary(sources.objects_vocab) if sources.objects_vocab is not None else None
        ),
        spread_runs=spread_runs,
    )
