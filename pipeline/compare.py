"""Compare two runs' artifacts (recall metrics, feature stores) against tolerances, for CI.

A CI job keeps a committed baseline (a `metrics.json` and a feature manifest) and checks every new run
against it. Recall metrics have a direction (recalls and rsum: higher is better; medr/meanr: lower is
better) and an absolute tolerance; only a change in the bad direction beyond the tolerance is a regression.
A feature store is summarised by a *manifest* (row count, schema, a hash of the sorted image ids, streaming
per-column statistics, and exact content hashes only when the extraction path was declared deterministic),
so a multi-gigabyte store can be checked against a few kilobytes of committed JSON.

Default tolerances (overridable with a YAML/JSON tolerance file, see `load_tolerances`):

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
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import yaml

from pipeline.atomic import write_text_atomic
from pipeline.progress import progress_bar
from pipeline.errors import UserError

MANIFEST_KIND = "scan_pipe_feature_manifest"
MANIFEST_VERSION = 1
METRICS_FILE_NAME = "metrics.json"
TOLERANCE_FILE_NAMES = ("tolerances.yaml", "tolerances.yml", "tolerances.json")
# Stores with at most this many rows keep their full id list in the manifest, for a readable id diff.
MANIFEST_MAX_LISTED_IDS = 2000

Direction = Literal["higher", "lower", "info"]
Status = Literal["ok", "improved", "REGRESSION", "MISSING", "new", "info", "CHANGED"]
FAILING_STATUSES: frozenset[str] = frozenset({"REGRESSION", "MISSING", "CHANGED"})

DEFAULT_METRIC_TOLERANCES: dict[str, float] = {
    "recall": 1.0,
    "rsum": 3.0,
    "ar": 2.0,
    "medr": 1.0,
    "meanr": 1.0,
}
DEFAULT_FEATURE_ATOL = 1e-4
DEFAULT_FEATURE_RTOL = 2e-3

_RECALL_KEY = re.compile(r"(^|[_/.])r\d+$")
_MEAN_RECALL_KEY = re.compile(r"(^|[_/.])(ar|ari)$")


class CompareError(UserError):
    """An input cannot be read or the two inputs cannot be compared; the message names the file."""


# --------------------------------------------------------------------------------------------- tolerances


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
    """Recalls (`*_r1`, `*_r5`, ...), mean recalls and rsum improve upwards; ranks improve downwards."""
    name = key.lower()
    if name.endswith("medr") or name.endswith("meanr"):
        return "lower"
    if name.endswith("rsum") or _RECALL_KEY.search(name) or _MEAN_RECALL_KEY.search(name):
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
    name = key.lower()
    if direction == "info":
        return MetricRule("info", 0.0)
    if name.endswith("medr"):
        return MetricRule(direction, DEFAULT_METRIC_TOLERANCES["medr"])
    if name.endswith("meanr"):
        return MetricRule(direction, DEFAULT_METRIC_TOLERANCES["meanr"])
    if name.endswith("rsum"):
        return MetricRule(direction, DEFAULT_METRIC_TOLERANCES["rsum"])
    if _MEAN_RECALL_KEY.search(name):
        return MetricRule(direction, DEFAULT_METRIC_TOLERANCES["ar"])
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


# --------------------------------------------------------------------------------------------- rows


@dataclass
class ComparisonRow:
    """One line of the comparison table."""

    name: str
    baseline: float | str | None
    new: float | str | None
    delta: float | None
    tolerance: str
    status: Status
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILING_STATUSES


@dataclass
class ComparisonResult:
    """All rows of one comparison, plus what was compared (for the table title and JSON output)."""

    kind: Literal["metrics", "features"]
    baseline: str
    new: str
    tolerance_source: str
    rows: list[ComparisonRow] = field(default_factory=list)

    @property
    def regressions(self) -> list[ComparisonRow]:
        return [row for row in self.rows if row.failed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN written as null so the output stays strict JSON)."""

        def clean(value: Any) -> Any:
            return None if isinstance(value, float) and math.isnan(value) else value

        return {
            "kind": self.kind,
            "baseline": self.baseline,
            "new": self.new,
            "tolerance_source": self.tolerance_source,
            "passed": self.passed,
            "regressions": [row.name for row in self.regressions],
            "rows": [{k: clean(v) for k, v in asdict(row).items()} for row in self.rows],
        }


# --------------------------------------------------------------------------------------------- metrics


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


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CompareError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON: {exc}") from exc


def load_metrics(path: str | Path) -> dict[str, float]:
    """Read a metrics JSON file (or a directory holding `metrics.json`) into a flat name -> value mapping."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    if not path.is_file():
        raise CompareError(f"{path}: metrics file not found")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CompareError(
            f"{path}: expected a JSON object of metric name to value, got {type(data).__name__}"
        )
    flat = flatten_metrics(data)
    if not flat:
        raise CompareError(f"{path}: contains no numeric metrics")
    return flat


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
        if rule.direction == "info":
            status: Status = "info"
        elif math.isnan(new_value) and not math.isnan(base_value):
            status = "REGRESSION"
        elif math.isnan(base_value):
            status = "ok" if math.isnan(new_value) else "improved"
        else:
            worse_by = -delta if rule.direction == "higher" else delta
            if worse_by > rule.tolerance + 1e-9:
                status = "REGRESSION"
            elif worse_by < -1e-12:
                status = "improved"
            else:
                status = "ok"
        note = {"higher": "higher is better", "lower": "lower is better"}.get(rule.direction, "")
        result.rows.append(
            ComparisonRow(
                key, base_value, new_value, None if math.isnan(delta) else delta, tolerance_text, status, note
            )
        )
    for key in new:
        if key not in baseline:
            result.rows.append(ComparisonRow(key, None, new[key], None, "-", "new", "not in baseline"))
    return result


# --------------------------------------------------------------------------------------------- features


class _Record(Protocol):
    image_id: str
    image_w: int
    image_h: int
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray | None
    object_conf: np.ndarray | None
    attribute_ids: np.ndarray | None
    attribute_conf: np.ndarray | None


class _Store(Protocol):
    image_ids: list[str]
    metadata: dict

    def __len__(self) -> int: ...

    def iter_records(self, batch_rows: int = ...) -> Iterator[_Record]: ...


@dataclass
class RunningStats:
    """Streaming count/mean/std/min/max in float64 (Chan et al. merge: stable for billions of values)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        n = values.size
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))

    def summary(self) -> dict[str, float | int | None]:
        if self.count == 0:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        return {
            "count": self.count,
            "mean": self.mean,
            "std": math.sqrt(self.m2 / self.count),
            "min": self.minimum,
            "max": self.maximum,
        }


def image_ids_sha256(image_ids: Iterable[str]) -> str:
    """Order-independent fingerprint of a set of image ids: sha256 of the sorted ids joined by newlines."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()


def _combine_digests(per_image: dict[str, bytes]) -> str:
    """One hash over per-image digests in sorted-id order, so it does not depend on the part layout."""
    combined = hashlib.sha256()
    for image_id in sorted(per_image):
        combined.update(image_id.encode("utf-8"))
        combined.update(b"\0")
        combined.update(per_image[image_id])
    return combined.hexdigest()


def _array_digest(array: np.ndarray) -> bytes:
    contiguous = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{contiguous.dtype.str}{contiguous.shape}".encode())
    digest.update(contiguous.tobytes())
    return digest.digest()


def _store_schema(root: Path) -> dict[str, str]:
    """Arrow schema of the first part file (all parts share it), as column -> type string."""
    import pyarrow.parquet as pq

    parts = sorted(root.glob("part-*.parquet"))
    if not parts:
        raise CompareError(f"{root}: no part-*.parquet files: not a feature store")
    try:
        schema = pq.read_schema(parts[0])
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise CompareError(f"{parts[0]}: cannot read Parquet schema: {exc}") from exc
    return {name: str(schema.field(name).type) for name in schema.names}


def is_feature_store(path: str | Path) -> bool:
    """A directory with Parquet part files in the feature-store layout."""
    path = Path(path)
    return path.is_dir() and any(path.glob("part-*.parquet"))


def open_feature_store(path: str | Path) -> _Store:
    """Open a feature store via `pipeline.store`; its errors become a CompareError naming the path."""
    from pipeline.store import FeatureStore

    try:
        return FeatureStore(path)
    except Exception as exc:
        raise CompareError(f"{path}: cannot open feature store: {exc}") from exc


def build_feature_manifest(
    store: _Store,
    root: str | Path,
    *,
    deterministic: bool = False,
    progress: bool = True,
    batch_rows: int = 256,
) -> dict[str, Any]:
    """Summarise a feature store: counts, schema, id hash, per-column statistics, optional exact hashes.

    `deterministic` declares that the extraction path reproduces bit-identical features (same code, weights,
    device and precision on the same kind of machine); only then are exact content hashes recorded and later
    enforced, otherwise the statistics with tolerances are the check.
    """
    root = Path(root)
    stats: dict[str, RunningStats] = {
        name: RunningStats()
        for name in (
            "features",
            "region_norm",
            "boxes",
            "box_area",
            "num_boxes",
            "image_w",
            "image_h",
            "object_ids",
            "object_conf",
            "attribute_ids",
            "attribute_conf",
        )
    }
    feature_digests: dict[str, bytes] = {}
    box_digests: dict[str, bytes] = {}
    seen_ids: list[str] = []
    dtypes: set[str] = set()

    records: Iterable[_Record] = store.iter_records(batch_rows=batch_rows)
    with progress_bar("img", disable=not progress, transient=True) as bar:
        task = bar.add_task(f"manifest {root.name}", total=len(store))
        pending: dict[str, list[np.ndarray]] = {name: [] for name in stats}

        def flush() -> None:
            # Statistics over ~64 images at once: one float64 pass instead of many small numpy calls.
            for name, arrays in pending.items():
                if arrays:
                    values = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
                    if name == "features":
                        stats["region_norm"].update(
                            np.sqrt(np.square(values).reshape(-1, feature_dim).sum(1))
                        )
                    stats[name].update(values)
                    arrays.clear()

        feature_dim = 0
        for count, record in enumerate(records, start=1):
            features = np.asarray(record.features)
            boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)
            dtypes.add(str(features.dtype))
            if features.size:
                feature_dim = features.shape[-1]
                pending["features"].append(features)
            pending["boxes"].append(boxes)
            pending["box_area"].append(
                np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
            )
            pending["num_boxes"].append(np.array([boxes.shape[0]]))
            pending["image_w"].append(np.array([record.image_w]))
            pending["image_h"].append(np.array([record.image_h]))
            for name in ("object_ids", "object_conf", "attribute_ids", "attribute_conf"):
                values = getattr(record, name, None)
                if values is not None:
                    pending[name].append(np.asarray(values))
            seen_ids.append(record.image_id)
            if deterministic:
                feature_digests[record.image_id] = _array_digest(features)
                box_digests[record.image_id] = _array_digest(boxes)
            if count % 64 == 0:
                flush()
            bar.advance(task)
        flush()

    if len(seen_ids) != len(set(seen_ids)):
        duplicates = sorted(image_id for image_id, n in Counter(seen_ids).items() if n > 1)[:5]
        raise CompareError(f"{root}: duplicate image ids in the feature store, e.g. {duplicates}")
    metadata = dict(getattr(store, "metadata", {}) or {})
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "store": str(root),
        "row_count": len(seen_ids),
        "schema": _store_schema(root),
        "feature_dim": metadata.get("feature_dim", getattr(store, "feature_dim", None)),
        "feature_dtype": metadata.get("feature_dtype", ",".join(sorted(dtypes)) or None),
        "weights_sha256": metadata.get("weights_sha256"),
        "untrained": metadata.get("untrained"),
        "image_ids_sha256": image_ids_sha256(seen_ids),
        "image_ids": sorted(seen_ids) if len(seen_ids) <= MANIFEST_MAX_LISTED_IDS else None,
        "deterministic": bool(deterministic),
        "content_sha256": (
            {"features": _combine_digests(feature_digests), "boxes": _combine_digests(box_digests)}
            if deterministic
            else None
        ),
        "columns": {name: running.summary() for name, running in stats.items() if running.count > 0},
        # informational; long lists (1,600 class names) left out to keep the committed baseline small
        "store_metadata": {
            key: value for key, value in metadata.items() if not (isinstance(value, list) and len(value) > 50)
        },
    }
    return manifest


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename: never half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a feature manifest JSON, checking it is one (clear error naming the file otherwise)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
        raise CompareError(f"{path}: not a scan-pipe feature manifest (missing kind={MANIFEST_KIND!r})")
    if data.get("version") != MANIFEST_VERSION:
        raise CompareError(
            f"{path}: manifest version {data.get('version')!r}, this code reads {MANIFEST_VERSION}"
        )
    for key in ("row_count", "schema", "image_ids_sha256", "columns", "deterministic"):
        if key not in data:
            raise CompareError(f"{path}: manifest lacks the key {key!r}")
    return data


def _exact_row(name: str, base: Any, new: Any, note: str = "") -> ComparisonRow:
    status: Status = "ok" if base == new else "CHANGED"
    return ComparisonRow(
        name, _short(base), _short(new), None, "exact", status, note if status != "ok" else ""
    )


def _short(value: Any) -> float | str | None:
    if value is None or isinstance(value, (float, str)):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return float(value)
    return json.dumps(value, sort_keys=True)


def _id_diff_note(base: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    base_ids, new_ids = base.get("image_ids"), new.get("image_ids")
    if not isinstance(base_ids, list) or not isinstance(new_ids, list):
        return "sorted image ids differ"
    missing = sorted(set(base_ids) - set(new_ids))
    extra = sorted(set(new_ids) - set(base_ids))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} extra (e.g. {', '.join(extra[:3])})")
    return "; ".join(parts) or "sorted image ids differ"


def _schema_note(base: Mapping[str, str], new: Mapping[str, str]) -> str:
    parts = []
    for column in sorted(set(base) | set(new)):
        if column not in new:
            parts.append(f"{column} missing")
        elif column not in base:
            parts.append(f"{column} added")
        elif base[column] != new[column]:
            parts.append(f"{column}: {base[column]} -> {new[column]}")
    return "; ".join(parts)


def compare_manifests(
    baseline: Mapping[str, Any],
    new: Mapping[str, Any],
    tolerances: Tolerances | None = None,
    *,
    baseline_name: str = "baseline",
    new_name: str = "new",
) -> ComparisonResult:
    """Exact checks (rows, schema, ids, dims, weights, hashes if deterministic), then statistics."""
    tolerances = tolerances or Tolerances()
    result = ComparisonResult("features", baseline_name, new_name, tolerances.source)
    rows = result.rows
    rows.append(_exact_row("row_count", baseline["row_count"], new["row_count"]))
    rows.append(_exact_row("image_ids_sha256", baseline["image_ids_sha256"], new["image_ids_sha256"]))
    if rows[-1].failed:
        rows[-1].note = _id_diff_note(baseline, new)
    schema_row = _exact_row("schema", baseline["schema"], new["schema"])
    if schema_row.failed:
        schema_row.note = _schema_note(baseline["schema"], new["schema"])
    schema_row.baseline, schema_row.new = (
        f"{len(baseline['schema'])} columns",
        f"{len(new['schema'])} columns",
    )
    rows.append(schema_row)
    for key in ("feature_dim", "feature_dtype", "weights_sha256", "untrained"):
        if baseline.get(key) is not None:
            rows.append(_exact_row(key, baseline.get(key), new.get(key)))
    if baseline.get("deterministic"):
        base_hashes = baseline.get("content_sha256") or {}
        new_hashes = new.get("content_sha256") or {}
        for column, digest in sorted(base_hashes.items()):
            if column not in new_hashes:
                rows.append(
                    ComparisonRow(
                        f"content_sha256.{column}", digest, None, None, "exact", "MISSING", "no hash in new"
                    )
                )
            else:
                rows.append(_exact_row(f"content_sha256.{column}", digest, new_hashes[column]))
    base_columns: Mapping[str, Mapping[str, Any]] = baseline["columns"]
    new_columns: Mapping[str, Mapping[str, Any]] = new["columns"]
    for column, base_stats in base_columns.items():
        if column not in new_columns:
            rows.append(
                ComparisonRow(
                    f"{column}.*", None, None, None, "-", "MISSING", f"column {column} absent from new"
                )
            )
            continue
        for stat, base_value in base_stats.items():
            name = f"{column}.{stat}"
            new_value = new_columns[column].get(stat)
            if base_value is None and new_value is None:
                continue
            if new_value is None:
                rows.append(ComparisonRow(name, base_value, None, None, "-", "MISSING", f"{name} absent"))
                continue
            if base_value is None:
                rows.append(
                    ComparisonRow(name, None, float(new_value), None, "-", "CHANGED", "baseline had none")
                )
                continue
            base_float, new_float = float(base_value), float(new_value)
            if stat == "count":
                rows.append(_exact_row(name, base_value, new_value))
                continue
            tolerance = tolerances.feature_tolerance(name)
            status: Status = "ok" if tolerance.allows(base_float, new_float) else "CHANGED"
            rows.append(
                ComparisonRow(
                    name,
                    base_float,
                    new_float,
                    new_float - base_float,
                    tolerance.describe(base_float),
                    status,
                )
            )
    return result


# --------------------------------------------------------------------------------------------- dispatch


ArtifactKind = Literal["metrics", "manifest", "store"]


def detect_artifact(path: str | Path) -> ArtifactKind:
    """What a path holds: a metrics JSON (or a directory with metrics.json), a manifest JSON, or a store."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / METRICS_FILE_NAME).is_file():
            return "metrics"
        if is_feature_store(path):
            return "store"
        raise CompareError(
            f"{path}: directory holds neither {METRICS_FILE_NAME} "
            "nor feature-store part files (part-*.parquet)"
        )
    data = _read_json(path)
    if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND:
        return "manifest"
    return "metrics"


def compare_paths(
    baseline: str | Path,
    new: str | Path,
    tolerances: Tolerances | None = None,
    *,
    deterministic: bool | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Compare two artifacts of the same family; a store is summarised into a manifest first.

    When the baseline is a manifest, the new store's manifest follows its `deterministic` flag, so the exact
    hashes are computed exactly when the baseline has them. `deterministic` overrides that for two stores.
    """
    baseline_kind, new_kind = detect_artifact(baseline), detect_artifact(new)
    families = {"metrics": "metrics", "manifest": "features", "store": "features"}
    if families[baseline_kind] != families[new_kind]:
        raise CompareError(
            f"cannot compare {baseline} ({baseline_kind}) with {new} ({new_kind}): "
            "both must be metrics, or both feature stores/manifests"
        )
    tolerances = tolerances or Tolerances()
    if baseline_kind == "metrics":
        return compare_metrics(
            load_metrics(baseline),
            load_metrics(new),
            tolerances,
            baseline_name=str(baseline),
            new_name=str(new),
        )
    if baseline_kind == "manifest":
        base_manifest = load_manifest(baseline)
        want_hashes = bool(base_manifest["deterministic"]) if deterministic is None else deterministic
    else:
        want_hashes = bool(deterministic)
        base_manifest = build_feature_manifest(
            open_feature_store(baseline), baseline, deterministic=want_hashes, progress=progress
        )
    if new_kind == "manifest":
        new_manifest = load_manifest(new)
    else:
        new_manifest = build_feature_manifest(
            open_feature_store(new), new, deterministic=want_hashes, progress=progress
        )
    return compare_manifests(
        base_manifest, new_manifest, tolerances, baseline_name=str(baseline), new_name=str(new)
    )
