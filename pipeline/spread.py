"""Seed spread: the same configuration trained with several seeds, summarised per metric beside the paper.

Two runs that differ only in the random seed routinely differ by 1-2 points of R@1, which users mistake for
bugs; the mean, sample std, min and max over several seeds show how far apart is normal. Runs come from the
evaluate stage's `metrics.json` files (`runs_from_metrics_files`) or from the JSON of `dvc exp show --json`
(`runs_from_dvc_experiments`); `spread_report` loads either and builds the report. Runs that differ in
anything but the seed (params, protocol, model, gallery) are refused unless the caller allows it: their
spread would not be seed spread.

Decisions: a run lacking a metric is an error naming the run and the metric (a mean over a different subset
of runs per metric would mislead); `std` is the sample standard deviation (ddof=1), NaN for a single run;
min/max name the first run holding the extreme value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import UserError
from pipeline.metrics import METRIC_KEYS

# The evaluate stage's metrics file in dvc.yaml (tests/test_spread.py checks the two agree).
EVAL_METRICS_FILE = "results/eval/metrics.json"
METRICS_FILE_NAME = "metrics.json"
SEED_PARAM = "train.seed"
# metrics.json fields that must agree between runs for their spread to be seed spread.
CONTEXT_FIELDS = ("protocol", "models", "num_images", "num_captions")
_UNFINISHED_STATES = ("queued", "running")


class SpreadError(UserError):
    """Runs cannot be read or aggregated; the message names the file, run or metric."""


@dataclass(frozen=True)
class RunSet(Mapping[str, Mapping[str, float]]):
    """Runs by name (each a flat metric name -> value mapping) and what they have in common.

    `dataset`, `protocol` and `variant` (the model, `ensemble:a+b` for an ensemble) select the paper's row;
    `seeds` holds each run's `train.seed` where known; `skipped` names experiments left out, with why.
    """

    runs: dict[str, dict[str, float]]
    dataset: str | None = None
    protocol: str | None = None
    variant: str | None = None
    seeds: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Mapping[str, float]:
        return self.runs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)


@dataclass(frozen=True)
class PaperReference:
    """The paper's numbers for one dataset/protocol/variant, and any published seed ranges beside them."""

    label: str
    protocol: str
    source: str
    values: dict[str, float] = field(default_factory=dict)
    seed_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    seed_label: str | None = None
    seed_source: str | None = None


@dataclass(frozen=True)
class SpreadReport:
    """`frame`: one row per metric (n, mean, std, min, max, min_run, max_run, paper, paper_seed_min/max)."""

    frame: pd.DataFrame
    runs: RunSet
    paper: PaperReference | None = None
    notes: tuple[str, ...] = ()

    def display_rows(self, single_run_std: str = "—") -> list[dict[str, str]]:
        """One row of readable cells per metric (the CLI table and the report's section share them)."""

        def cell(value: float, digits: int = 2) -> str:
            return "—" if value != value else f"{value:.{digits}f}"  # NaN: not available

        rows = []
        for metric, row in self.frame.iterrows():
            seeds = "—"
            if row["paper_seed_min"] == row["paper_seed_min"]:
                seeds = f"{row['paper_seed_min']:.1f}–{row['paper_seed_max']:.1f}"
            std = single_run_std if row["n"] < 2 else cell(row["std"])
            rows.append(
                {
                    "metric": str(metric),
                    "n": str(int(row["n"])),
                    "mean ± std": f"{cell(row['mean'])} ± {std}",
                    "min (run)": f"{cell(row['min'])} ({row['min_run']})",
                    "max (run)": f"{cell(row['max'])} ({row['max_run']})",
                    "paper": cell(row["paper"], 1),
                    "paper seeds": seeds,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; NaN written as null so the output stays strict JSON."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            return value.item() if hasattr(value, "item") else value

        rows = [
            {"metric": metric, **{key: clean(value) for key, value in row.items()}}
            for metric, row in self.frame.to_dict(orient="index").items()
        ]
        paper = None
        if self.paper is not None:
            paper = {
                "label": self.paper.label,
                "protocol": self.paper.protocol,
                "source": self.paper.source,
                "seed_label": self.paper.seed_label,
                "seed_source": self.paper.seed_source,
            }
        return {
            "kind": "spread",
            "runs": list(self.runs),
            "seeds": dict(self.runs.seeds),
            "dataset": self.runs.dataset,
            "protocol": self.runs.protocol,
            "variant": self.runs.variant,
            "skipped": dict(self.runs.skipped),
            "paper": paper,
            "notes": list(self.notes),
            "rows": rows,
        }


# -- the math ---------------------------------------------------------------------------------------------


def runs_frame(runs: Mapping[str, Mapping[str, float]], keys: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Runs x metrics as floats (index: run name); a missing or non-numeric metric names run and metric."""
    if not runs:
        raise SpreadError("no runs to aggregate")
    table: dict[str, dict[str, float]] = {}
    for name, metrics in runs.items():
        row = {}
        for key in keys:
            if key not in metrics:
                raise SpreadError(f"run {name}: metric {key} is missing")
            value = metrics[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SpreadError(f"run {name}: metric {key} is {value!r}, not a finite number")
            row[key] = float(value)
        table[name] = row
    frame = pd.DataFrame.from_dict(table, orient="index", columns=list(keys))
    frame.index.name = "run"
    return frame


def metric_spread(runs: Mapping[str, Mapping[str, float]], keys: Sequence[str] = METRIC_KEYS) -> pd.DataFrame:
    """Per metric (index `metric`): n, mean, std (sample, ddof=1; NaN for one run), min, max and the runs
    holding them (`min_run`, `max_run`).

    Every run must hold every metric in `keys`: a missing one is a `SpreadError` naming run and metric.
    """
    values = runs_frame(runs, keys)
    spread = pd.DataFrame(
        {
            "n": values.count(),
            "mean": values.mean(),
            "std": values.std(ddof=1),
            "min": values.min(),
            "max": values.max(),
            "min_run": values.idxmin(),
            "max_run": values.idxmax(),
        }
    )
    spread.index.name = "metric"
    return spread


# -- reading runs ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpreadError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpreadError(f"{path}: not valid JSON: {exc}") from exc


def numeric_leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric values of a metrics mapping, nested keys joined with '/' (as `scan-pipe compare` does)."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(numeric_leaves(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _variant(models: Any) -> str | None:
    """The evaluated model in the published results' naming (`ensemble:a+b` for an averaged pair)."""
    if isinstance(models, list) and models:
        return str(models[0]) if len(models) == 1 else "ensemble:" + "+".join(map(str, models))
    return None


def _unique_names(directories: Sequence[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell the runs apart."""
    parts = [directory.resolve().parts for directory in directories]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise SpreadError(
        f"cannot tell the runs apart (one evaluate folder per run): {', '.join(map(str, directories))}"
    )


def _check_same(label: str, values: Mapping[str, Any], allow_differences: bool) -> Any:
    """The value all runs share; runs that differ are refused (not seed spread) unless allowed."""
    distinct = {json.dumps(value, sort_keys=True) for value in values.values()}
    if len(distinct) > 1 and not allow_differences:
        listed = ", ".join(f"{name} {json.dumps(value)}" for name, value in values.items())
        raise SpreadError(
            f"runs differ in {label} ({listed}): that is not seed spread "
            "(`scan-pipe compare --spread --allow-differences` aggregates them anyway)"
        )
    return next(iter(values.values())) if len(distinct) == 1 else None


def runs_from_metrics_files(paths: Iterable[str | Path], *, allow_differences: bool = False) -> RunSet:
    """Runs from evaluate outputs: `metrics.json` files or folders holding one; name = the folder's name.

    Runs whose protocol, model or gallery size differ are refused unless `allow_differences`.
    """
    files: list[Path] = []
    for given in map(Path, paths):
        if not given.exists():
            raise SpreadError(f"{given}: no such metrics file or evaluate folder")
        path = given / METRICS_FILE_NAME if given.is_dir() else given
        if not path.is_file():
            raise SpreadError(f"{path}: metrics file not found")
        files.append(path)
    if not files:
        raise SpreadError("no metrics files given")
    names = _unique_names([path.parent for path in files])
    raw: dict[str, dict[str, Any]] = {}
    for name, path in zip(names, files, strict=True):
        data = _read_json(path)
        if not isinstance(data, dict):
            raise SpreadError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
        raw[name] = data
    context = {
        key: _check_same(key, {name: data.get(key) for name, data in raw.items()}, allow_differences)
        for key in CONTEXT_FIELDS
    }
    return RunSet(
        runs={name: numeric_leaves(data) for name, data in raw.items()},
        protocol=context["protocol"],
        variant=_variant(context["models"]),
    )


def _flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`{"params.yaml": {"data": {"train": {"seed": 1}}}}` -> `{"train.seed": 1}`; other files: `file:key`."""

    def walk(node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
        for key, value in node.items():
            if isinstance(value, Mapping) and value:
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    flat: dict[str, Any] = {}
    for file_name, entry in params.items():
        data = entry.get("data") if isinstance(entry, Mapping) else None
        if isinstance(data, Mapping):
            prefix = "" if file_name == "params.yaml" else f"{file_name}:"
            flat.update(walk(data, prefix))
    return flat


def _experiment_records(exps: Any, source: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(name, baseline rev, rev record) of every experiment in `dvc exp show --json` output."""
    if not isinstance(exps, list):
        raise SpreadError(f"{source}: expected the JSON list that `dvc exp show --json` prints")
    for baseline in exps:
        if not isinstance(baseline, Mapping) or "rev" not in baseline:
            raise SpreadError(
                f"{source}: expected baseline entries with 'rev' (`dvc exp show --json` output)"
            )
        for group in baseline.get("experiments") or []:
            revs = group.get("revs") if isinstance(group, Mapping) else None
            if not revs or not isinstance(revs[0], Mapping):
                raise SpreadError(f"{source}: experiment entry without 'revs' under {baseline['rev']}")
            record = dict(revs[0])
            record["executor"] = group.get("executor")
            name = str(group.get("name") or record.get("name") or str(record.get("rev", "?"))[:7])
            yield name, str(baseline["rev"]), record


def _seed_order(record: Mapping[str, Any], name: str) -> tuple[int, float, str]:
    """Sort key: numeric seeds in order, then the rest by name."""
    seed = _flat_params((record.get("data") or {}).get("params") or {}).get(SEED_PARAM)
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, float(seed), name)
    return (1, 0.0, name)


def _skip_reason(record: Mapping[str, Any], metrics_file: str) -> str | None:
    """Why an experiment has no usable metrics (unfinished, failed, file missing), or None."""
    executor = record.get("executor")
    state = executor.get("state") if isinstance(executor, Mapping) else None
    if state in _UNFINISHED_STATES:
        return str(state)
    error = record.get("error")
    if state == "failed" or error:
        message = error.get("msg") if isinstance(error, Mapping) else None
        return f"failed ({message})" if message else "failed"
    entry = ((record.get("data") or {}).get("metrics") or {}).get(metrics_file)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("data"), Mapping):
        detail = entry.get("error", {}).get("msg") if isinstance(entry, Mapping) else "not recorded"
        return f"no {metrics_file} ({detail})"
    return None


def runs_from_dvc_experiments(
    text_or_path: str | Path,
    metrics_file: str = EVAL_METRICS_FILE,
    *,
    names: Sequence[str] | None = None,
    allow_differences: bool = False,
) -> RunSet:
    """Runs from `dvc exp show --json` output: a `Path` is a file holding it, a `str` the JSON text itself.

    Experiments only (not the workspace or baseline commits); queued, running and failed ones are skipped
    (`RunSet.skipped` says why) unless named in `names`, where each must have finished with metrics.
    Experiments whose params differ in anything but `train.seed` are refused unless `allow_differences`.
    """
    if isinstance(text_or_path, Path):
        source, exps = str(text_or_path), _read_json(text_or_path)
    else:
        source = "dvc exp show output"
        try:
            exps = json.loads(text_or_path)
        except json.JSONDecodeError as exc:
            raise SpreadError(f"{source}: not valid JSON: {exc}") from exc
    records: dict[str, Mapping[str, Any]] = {}
    baselines: dict[str, str] = {}
    for name, baseline, record in _experiment_records(exps, source):
        if name in records:
            raise SpreadError(
                f"{source}: experiment {name} appears under baselines {baselines[name][:7]} and "
                f"{baseline[:7]}; export one baseline's experiments (`dvc exp show --json` without -A)"
            )
        records[name], baselines[name] = record, baseline
    wanted = list(names) if names is not None else list(records)
    absent = [name for name in wanted if name not in records]
    if absent:
        raise SpreadError(f"{source}: no experiment named {', '.join(absent)}")
    skipped = {name: reason for name in wanted if (reason := _skip_reason(records[name], metrics_file))}
    if names is not None and skipped:
        listed = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise SpreadError(f"{source}: experiment(s) without metrics: {listed}")
    usable = [name for name in wanted if name not in skipped]
    if names is None:  # DVC lists the newest first: show the seeds in order instead
        usable.sort(key=lambda name: _seed_order(records[name], name))
    if not usable:
        raise SpreadError(f"{source}: no finished experiment with {metrics_file}")
    params = {name: _flat_params((records[name].get("data") or {}).get("params") or {}) for name in usable}
    differing = sorted(
        key
        for key in {key for flat in params.values() for key in flat} - {SEED_PARAM}
        if len({json.dumps(flat.get(key), sort_keys=True) for flat in params.values()}) > 1
    )
    if differing and not allow_differences:
        raise SpreadError(
            f"{source}: experiments differ in params other than {SEED_PARAM}: {', '.join(differing)}; "
            "that is not seed spread (`scan-pipe compare --allow-differences` aggregates them anyway)"
        )
    metrics = {name: records[name]["data"]["metrics"][metrics_file]["data"] for name in usable}
    context = {
        key: _check_same(key, {name: data.get(key) for name, data in metrics.items()}, allow_differences)
        for key in CONTEXT_FIELDS
    }

    def common(key: str) -> Any:
        values = {json.dumps(flat.get(key)) for flat in params.values()}
        return next(iter(params.values())).get(key) if len(values) == 1 else None

    return RunSet(
        runs={name: numeric_leaves(data) for name, data in metrics.items()},
        dataset=common("prepare.dataset"),
        protocol=context["protocol"] or common("evaluate.protocol"),
        variant=_variant(context["models"]) or common("train.model"),
        seeds={name: params[name].get(SEED_PARAM) for name in usable},
        skipped=skipped,
    )


# -- the paper beside --------------------------------------------------------------------------------------


def paper_reference(
    dataset: str, protocol: str, variant: str, published: Mapping[str, Any] | None = None
) -> PaperReference | None:
    """The bundled paper row and seed ranges for this dataset, protocol and variant (None without either).

    Protocol `all` holds the whole-matrix numbers at its top level (COCO 5K, Flickr30K 1K), as the report
    reads it.
    """
    from pipeline.report.published import PAPER_DATASETS, load_published_results, published_rows
    from pipeline.report.sections import WHOLE_MATRIX_PROTOCOL

    if dataset not in PAPER_DATASETS:
        return None
    if protocol == "all":
        protocol = WHOLE_MATRIX_PROTOCOL[dataset]
    published = published if published is not None else load_published_results()
    rows = [
        row
        for row in published_rows(dataset, protocol, published)
        if row["protocol"] == protocol and row.get("variant") == variant
    ]
    seeds = [
        entry
        for entry in published.get("seed_spread", [])
        if entry.get("protocol") == protocol and entry.get("variant") == variant
    ]
    if not rows and not seeds:
        return None
    ranges = {
        key: (float(value[0]), float(value[1]))
        for entry in seeds
        for key, value in entry.items()
        if key in METRIC_KEYS and isinstance(value, list) and len(value) == 2
    }
    return PaperReference(
        label=rows[0]["label"] if rows else seeds[0].get("label", variant),
        protocol=protocol,
        source=str(published.get("source", "")) if rows else "",
        values={key: float(rows[0][key]) for key in METRIC_KEYS if rows and key in rows[0]},
        seed_ranges=ranges,
        seed_label=seeds[0].get("label") if seeds else None,
        seed_source=" ".join(str(entry.get("source", "")) for entry in seeds) or None,
    )


def build_spread(
    runs: Mapping[str, Mapping[str, float]],
    *,
    dataset: str | None = None,
    keys: Sequence[str] = METRIC_KEYS,
    published: Mapping[str, Any] | None = None,
) -> SpreadReport:
    """`metric_spread` of the runs with the paper's value (`paper`) and seed range beside each metric.

    `dataset` (else the runs' own, from DVC params) must be flickr30k or coco for paper numbers; the runs'
    protocol and variant pick the row.
    """
    runset = runs if isinstance(runs, RunSet) else RunSet(runs={k: dict(v) for k, v in runs.items()})
    frame = metric_spread(runset, keys)
    dataset = dataset or runset.dataset
    notes: list[str] = []
    reference = None
    if dataset is None:
        notes.append("dataset unknown: give it (flickr30k or coco) to see the paper's numbers")
    elif runset.protocol is None or runset.variant is None:
        missing = " and ".join(
            label for label, value in (("protocol", runset.protocol), ("model", runset.variant)) if not value
        )
        notes.append(f"the runs do not record a common {missing}: no paper numbers")
    else:
        reference = paper_reference(dataset, runset.protocol, runset.variant, published)
        if reference is None:
            notes.append(
                f"no published numbers for {runset.variant} on {dataset} ({runset.protocol}); "
                "the papers report Flickr30K and COCO"
            )
    paper = reference.values if reference else {}
    ranges = reference.seed_ranges if reference else {}
    frame["paper"] = [paper.get(metric, math.nan) for metric in frame.index]
    frame["paper_seed_min"] = [ranges.get(metric, (math.nan, math.nan))[0] for metric in frame.index]
    frame["paper_seed_max"] = [ranges.get(metric, (math.nan, math.nan))[1] for metric in frame.index]
    return SpreadReport(frame, runset, reference, tuple(notes))


def spread_report(
    paths: Sequence[str | Path] = (),
    *,
    dvc_exps: Path | None = None,
    metrics_file: str | None = None,
    dataset: str | None = None,
    allow_differences: bool = False,
) -> SpreadReport:
    """The spread of the runs in `paths` (evaluate folders / `metrics.json` files) or in `dvc_exps`.

    `dvc_exps` is a file saved from `dvc exp show --json` (experiments' `metrics_file`, default the evaluate
    stage's); it replaces `paths`. `dataset` picks the paper's numbers as in `build_spread`.
    """
    if dvc_exps is not None:
        runs = runs_from_dvc_experiments(
            dvc_exps, metrics_file or EVAL_METRICS_FILE, allow_differences=allow_differences
        )
    else:
        runs = runs_from_metrics_files(paths, allow_differences=allow_differences)
    return build_spread(runs, dataset=dataset)
