"""Recall metrics of two runs, judged by direction and tolerance: recalls may not drop, ranks not rise."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.compare.result import CompareError, ComparisonResult, ComparisonRow, Status, read_json
from pipeline.compare.tolerances import Tolerances

METRICS_FILE_NAME = "metrics.json"


def flatten_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (possibly nested) metrics mapping; nested keys and list indices joined with '/'."""
    flat: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, list):  # e.g. coco_1k's per-fold metric dicts: folds/0/i2t_r1, ...
            flat.update(flatten_metrics({str(i): item for i, item in enumerate(value)}, prefix=f"{name}/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
        elif value is None:
            flat[name] = float("nan")
    return flat


def load_metrics(path: str | Path) -> dict[str, float]:
    """Read a metrics JSON file (or a directory holding `metrics.json`) into a flat name -> value mapping."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    if not path.is_file():
        raise CompareError(f"{path}: metrics file not found")
    data = read_json(path)
    if not isinstance(data, dict):
        raise CompareError(
            f"{path}: expected a JSON object of metric name to value, got {type(data).__name__}"
        )
    flat = flatten_metrics(data)
    if not flat:
        raise CompareError(f"{path}: contains no numeric metrics")
    return flat


def _status(base_value: float, new_value: float, direction: str, tolerance: float) -> Status:
    """The verdict on one metric; NaN (a metric that could not be computed) is worse than any number."""
    if direction == "info":
        return "info"
    if math.isnan(new_value) and not math.isnan(base_value):
        return "REGRESSION"
    if math.isnan(base_value):
        return "ok" if math.isnan(new_value) else "improved"
    delta = new_value - base_value
    worse_by = -delta if direction == "higher" else delta
    if worse_by > tolerance + 1e-9:
        return "REGRESSION"
    if worse_by < -1e-12:
        return "improved"
    return "ok"


def compare_metrics(
    baseline: Mapping[str, float],
    new: Mapping[str, float],
    tolerances: Tolerances | None = None,
    *,
    baseline_name: str = "baseline",
    new_name: str = "new",
) -> ComparisonResult:
    """Judge every baseline metric in `new`: a bad move beyond tolerance, or absence, fails."""
    tolerances = tolerances or Tolerances()
    result = ComparisonResult("metrics", baseline_name, new_name, tolerances.source)
    for key, base_value in baseline.items():
        rule = tolerances.metric_rule(key, baseline)
        tolerance_text = "-" if rule.direction == "info" else f"{rule.tolerance:g}"
        if key not in new:
            result.rows.append(
                ComparisonRow(key, base_value, None, None, tolerance_text, "MISSING", "absent from NEW")
            )
            continue
        new_value = new[key]
        delta = new_value - base_value
        note = {"higher": "higher is better", "lower": "lower is better"}.get(rule.direction, "")
        result.rows.append(
            ComparisonRow(
                key,
                base_value,
                new_value,
                None if math.isnan(delta) else delta,
                tolerance_text,
                _status(base_value, new_value, rule.direction, rule.tolerance),
                note,
            )
        )
    for key in new:
        if key not in baseline:
            result.rows.append(ComparisonRow(key, None, new[key], None, "-", "new", "not in baseline"))
    return result
