"""How far a metric or feature statistic may move before it is a regression, and the file that says so.

Built-in defaults (a tolerance file overrides any of them, see `load_tolerances`):

* recall@K 1.0 point, rsum 3.0 points, medr 1.0, meanr 1.0, each raised to at least one query's worth when
  the baseline records its gallery (`num_images`, `num_captions`, as `scan-pipe evaluate` writes): a seeded
  run reproduces its numbers exactly on one machine, but across machines BLAS kernels may round differently
  and flip one borderline query. On Flickr30K/COCO one query is 0.02-0.1 point, so the fixed defaults
  apply; on the bundled sample (20 test images, 100 captions) one image query is 5 points of i2t recall and
  one caption query 1 point of t2i recall, so the tolerances become 5 / 1 / rsum 18: one flipped query per
  R@K passes, a collapse towards chance (rsum roughly 150 on that gallery) fails. A `tolerances.yaml`
  beside the baseline (picked up automatically) or `--tolerances F` overrides any of this.
* feature statistics: |new - base| <= atol + rtol*|base| with atol 1e-4, rtol 2e-3: float16 storage has a
  relative rounding step of about 1e-3, so a last-bit change in the float32 computation can move a min/max by
  one float16 step, while the means over millions of values move by far less; any real change to the
  extractor (weights, scale, normalisation) moves them by orders of magnitude more.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.compare.result import CompareError

TOLERANCE_FILE_NAMES = ("tolerances.yaml", "tolerances.yml", "tolerances.json")
DEFAULT_METRIC_TOLERANCES: dict[str, float] = {"recall": 1.0, "rsum": 3.0, "medr": 1.0, "meanr": 1.0}
DEFAULT_FEATURE_ATOL = 1e-4
DEFAULT_FEATURE_RTOL = 2e-3

Direction = Literal["higher", "lower", "info"]

_RECALL_KEY = re.compile(r"(^|[_/.])r\d+$")


@dataclass(frozen=True)
class MetricRule:
    """How one metric is judged: which way is better and how far it may move the wrong way."""

    direction: Direction
    tolerance: float


@dataclass(frozen=True)
class FeatureTolerance:
    """Closeness of one manifest statistic: |new - base| <= atol + rtol * |base|."""

    atol: float = DEFAULT_FEATURE_ATOL
    rtol: float = DEFAULT_FEATURE_RTOL

    def allows(self, base: float, new: float) -> bool:
        """True when `new` is within tolerance of `base` (NaN only matches NaN)."""
        if math.isnan(base) or math.isnan(new):
            return math.isnan(base) and math.isnan(new)
        return abs(new - base) <= self.atol + self.rtol * abs(base)

    def describe(self, base: float) -> str:
        """The allowed absolute deviation around `base`, for the table."""
        return f"±{self.atol + self.rtol * abs(base):.3g}"


@dataclass(frozen=True)
class Tolerances:
    """Metric rules by exact name or glob pattern (in file order), and feature-statistic tolerances."""

    metric_overrides: tuple[tuple[str, MetricRule | float], ...] = ()
    feature_default: FeatureTolerance = FeatureTolerance()
    feature_overrides: tuple[tuple[str, FeatureTolerance], ...] = ()
    source: str = "built-in defaults"

    def metric_rule(self, key: str, baseline: Mapping[str, float] | None = None) -> MetricRule:
        """Direction from the metric's name; tolerance from the file (exact, then patterns) or defaults.

        A built-in default is raised to one query's worth of recall when the baseline records its gallery
        (`num_images`, `num_captions`): on a small gallery one borderline query flipping under float noise
        moves R@K by 100/queries points, which is not a regression.
        """
        default = default_metric_rule(key)
        for pattern, override in self.metric_overrides:
            if pattern == key or fnmatch.fnmatchcase(key, pattern):
                if isinstance(override, MetricRule):
                    return override
                return MetricRule(default.direction, float(override))
        step = one_query_step(key, baseline or {})
        return MetricRule(default.direction, max(default.tolerance, step)) if step else default

    def feature_tolerance(self, check: str) -> FeatureTolerance:
        """Tolerance for a manifest statistic such as `features.mean` (exact name or glob pattern)."""
        for pattern, tolerance in self.feature_overrides:
            if pattern == check or fnmatch.fnmatchcase(check, pattern):
                return tolerance
        return self.feature_default


def metric_direction(key: str) -> Direction:
    """Recalls (`*_r1`, `*_r5`, ...) and rsum improve upwards; ranks improve downwards; the rest is info."""
    name = key.lower()
    if name.endswith("medr") or name.endswith("meanr"):
        return "lower"
    if name.endswith("rsum") or _RECALL_KEY.search(name):
        return "higher"
    return "info"


def one_query_step(key: str, baseline: Mapping[str, float]) -> float:
    """How much one query changes a top-level recall (or rsum: one query per R@K), from the gallery size."""
    if "/" in key:  # nested (per-fold, coco_1k) entries: galleries not recorded beside them
        return 0.0
    images, captions = baseline.get("num_images"), baseline.get("num_captions")
    if not images or not captions or math.isnan(images) or math.isnan(captions):
        return 0.0
    i2t_step, t2i_step = 100.0 / images, 100.0 / captions
    name = key.lower()
    if name == "rsum":
        return 3 * (i2t_step + t2i_step)
    if _RECALL_KEY.search(name):
        return i2t_step if name.startswith("i2t") else t2i_step if name.startswith("t2i") else 0.0
    return 0.0


def default_metric_rule(key: str) -> MetricRule:
    """Built-in direction and tolerance for a metric name (see the module docstring for the reasoning)."""
    direction = metric_direction(key)
    if direction == "info":
        return MetricRule("info", 0.0)
    name = key.lower()
    for suffix in ("medr", "meanr", "rsum"):
        if name.endswith(suffix):
            return MetricRule(direction, DEFAULT_METRIC_TOLERANCES[suffix])
    return MetricRule(direction, DEFAULT_METRIC_TOLERANCES["recall"])


def _parse_metric_override(path: Path, key: str, value: Any) -> MetricRule | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise CompareError(f"{path}: metrics.{key}: expected a number or a mapping, got {value!r}")
    if isinstance(value, dict):
        unknown = set(value) - {"tolerance", "direction"}
        if unknown:
            raise CompareError(f"{path}: metrics.{key}: unknown key(s) {sorted(unknown)}")
        direction = value.get("direction", metric_direction(key))
        if direction not in ("higher", "lower", "info"):
            raise CompareError(
                f"{path}: metrics.{key}.direction: expected higher, lower or info, got {direction!r}"
            )
        tolerance = value.get("tolerance", default_metric_rule(key).tolerance)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            raise CompareError(f"{path}: metrics.{key}.tolerance: expected a number >= 0, got {tolerance!r}")
        return MetricRule(direction, float(tolerance))
    if value < 0:
        raise CompareError(f"{path}: metrics.{key}: tolerance must be >= 0, got {value!r}")
    return float(value)


def _parse_feature_tolerance(path: Path, key: str, value: Any, base: FeatureTolerance) -> FeatureTolerance:
    if not isinstance(value, dict):
        raise CompareError(f"{path}: {key}: expected a mapping with atol/rtol, got {value!r}")
    unknown = set(value) - {"atol", "rtol"}
    if unknown:
        raise CompareError(f"{path}: {key}: unknown key(s) {sorted(unknown)} (expected atol, rtol)")
    numbers: dict[str, float] = {}
    for name in ("atol", "rtol"):
        raw = value.get(name, getattr(base, name))
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw < 0:
            raise CompareError(f"{path}: {key}.{name}: expected a number >= 0, got {raw!r}")
        numbers[name] = float(raw)
    return FeatureTolerance(**numbers)


def load_tolerances(path: str | Path) -> Tolerances:
    """Read a tolerance file (YAML or JSON).

    Layout::

        metrics:                     # absolute tolerances; exact names or glob patterns, first match wins
          "i2t_r*": 5.0
          t2i_medr: {tolerance: 1, direction: lower}
        features:
          atol: 1.0e-4               # default for every statistic
          rtol: 2.0e-3
          checks:                    # per statistic, exact or glob: features.mean, boxes.*, ...
            "boxes.*": {atol: 0.01, rtol: 0.001}
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CompareError(f"{path}: cannot read tolerance file: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text) or {}  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise CompareError(f"{path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CompareError(
            f"{path}: expected a mapping with 'metrics' and/or 'features', got {type(raw).__name__}"
        )
    unknown = set(raw) - {"metrics", "features"}
    if unknown:
        raise CompareError(f"{path}: unknown top-level key(s) {sorted(unknown)} (expected metrics, features)")
    metrics_raw = raw.get("metrics") or {}
    if not isinstance(metrics_raw, dict):
        raise CompareError(f"{path}: metrics: expected a mapping of metric name to tolerance")
    metric_overrides = tuple(
        (str(key), _parse_metric_override(path, str(key), value)) for key, value in metrics_raw.items()
    )
    features_raw = raw.get("features") or {}
    if not isinstance(features_raw, dict):
        raise CompareError(f"{path}: features: expected a mapping with atol, rtol, checks")
    unknown = set(features_raw) - {"atol", "rtol", "checks"}
    if unknown:
        raise CompareError(
            f"{path}: features: unknown key(s) {sorted(unknown)} (expected atol, rtol, checks)"
        )
    feature_default = _parse_feature_tolerance(
        path, "features", {k: v for k, v in features_raw.items() if k != "checks"}, FeatureTolerance()
    )
    checks_raw = features_raw.get("checks") or {}
    if not isinstance(checks_raw, dict):
        raise CompareError(f"{path}: features.checks: expected a mapping of statistic name to atol/rtol")
    feature_overrides = tuple(
        (str(key), _parse_feature_tolerance(path, f"features.checks.{key}", value, feature_default))
        for key, value in checks_raw.items()
    )
    return Tolerances(metric_overrides, feature_default, feature_overrides, source=str(path))


def find_tolerance_file(baseline: str | Path) -> Path | None:
    """A `tolerances.yaml` beside a committed baseline file (or inside a baseline directory), if any."""
    baseline = Path(baseline)
    folder = baseline if baseline.is_dir() else baseline.parent
    for name in TOLERANCE_FILE_NAMES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def tolerances_for(baseline: str | Path, tolerance_file: str | Path | None = None) -> Tolerances:
    """The rules a comparison uses: `tolerance_file`, else the file beside the baseline, else built-ins."""
    found = tolerance_file or find_tolerance_file(baseline)
    return load_tolerances(found) if found else Tolerances()
