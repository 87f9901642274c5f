"""Feature stores summarised as manifests, and two manifests checked against each other.

A manifest holds a store's row count, schema, a hash of the sorted image ids, streaming per-column statistics,
and exact content hashes only when the extraction path was declared deterministic, so a multi-gigabyte store
can be checked against a few kilobytes of committed JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import write_text_atomic
from pipeline.compare.result import CompareError, ComparisonResult, ComparisonRow, Status, read_json
from pipeline.compare.tolerances import Tolerances
from pipeline.progress import progress_bar
from pipeline.store import FeatureStore, column_types

MANIFEST_KIND = "scan_pipe_feature_manifest"
MANIFEST_VERSION = 1
# Stores with at most this many rows keep their full id list in the manifest, for a readable id diff.
MANIFEST_MAX_LISTED_IDS = 2000
# Columns summarised by statistics: the stored arrays, plus region norms and box areas derived from them.
STATISTIC_COLUMNS = (
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
OPTIONAL_COLUMNS = ("object_ids", "object_conf", "attribute_ids", "attribute_conf")
# Long metadata lists (1,600 class names) are left out to keep the committed baseline small.
_MAX_METADATA_LIST = 50


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


def _column_statistics(
    store: FeatureStore, *, deterministic: bool, progress: bool, batch_rows: int
) -> tuple[dict[str, RunningStats], dict[str, bytes], dict[str, bytes]]:
    """One streaming pass over the store: statistics per column, per-image digests when deterministic."""
    stats = {name: RunningStats() for name in STATISTIC_COLUMNS}
    pending: dict[str, list[np.ndarray]] = {name: [] for name in STATISTIC_COLUMNS}
    feature_digests: dict[str, bytes] = {}
    box_digests: dict[str, bytes] = {}

    def flush() -> None:
        # Statistics over ~64 images at once: one float64 pass instead of many small numpy calls.
        for name, arrays in pending.items():
            if arrays:
                values = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
                if name == "features":
                    regions = values.reshape(-1, store.feature_dim)
                    stats["region_norm"].update(np.sqrt(np.square(regions).sum(1)))
                stats[name].update(values)
                arrays.clear()

    with progress_bar("img", disable=not progress, transient=True) as bar:
        task = bar.add_task(f"manifest {store.root.name}", total=len(store))
        for count, record in enumerate(store.iter_records(batch_rows=batch_rows), start=1):
            features = np.asarray(record.features)
            boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)
            if features.size:
                pending["features"].append(features)
            pending["boxes"].append(boxes)
            pending["box_area"].append(
                np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
            )
            pending["num_boxes"].append(np.array([boxes.shape[0]]))
            pending["image_w"].append(np.array([record.image_w]))
            pending["image_h"].append(np.array([record.image_h]))
            for name in OPTIONAL_COLUMNS:
                values = getattr(record, name)
                if values is not None:
                    pending[name].append(np.asarray(values))
            if deterministic:
                feature_digests[record.image_id] = _array_digest(features)
                box_digests[record.image_id] = _array_digest(boxes)
            if count % 64 == 0:
                flush()
            bar.advance(task)
        flush()
    return stats, feature_digests, box_digests


def build_feature_manifest(
    store: FeatureStore, *, deterministic: bool = False, progress: bool = True, batch_rows: int = 256
) -> dict[str, Any]:
    """Summarise a feature store: counts, schema, id hash, per-column statistics, optional exact hashes.

    `deterministic` declares that the extraction path reproduces bit-identical features (same code, weights,
    device and precision on the same kind of machine); only then are exact content hashes recorded and later
    enforced, otherwise the statistics with tolerances are the check.
    """
    stats, feature_digests, box_digests = _column_statistics(
        store, deterministic=deterministic, progress=progress, batch_rows=batch_rows
    )
    metadata = store.metadata
    image_ids = store.image_ids
    return {
        "kind": MANIFEST_KIND,
        "version": MANIFEST_VERSION,
        "store": str(store.root),
        "row_count": len(image_ids),
        "schema": column_types(store),
        "feature_dim": store.feature_dim,
        "feature_dtype": store.feature_dtype,
        "weights_sha256": metadata.get("weights_sha256"),
        "untrained": metadata.get("untrained"),
        "image_ids_sha256": image_ids_sha256(image_ids),
        "image_ids": sorted(image_ids) if len(image_ids) <= MANIFEST_MAX_LISTED_IDS else None,
        "deterministic": bool(deterministic),
        "content_sha256": (
            {"features": _combine_digests(feature_digests), "boxes": _combine_digests(box_digests)}
            if deterministic
            else None
        ),
        "columns": {name: running.summary() for name, running in stats.items() if running.count > 0},
        "store_metadata": {
            key: value
            for key, value in metadata.items()
            if not (isinstance(value, list) and len(value) > _MAX_METADATA_LIST)
        },
    }


def write_store_manifest(
    store_path: str | Path, manifest_path: str | Path, *, deterministic: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Summarise the store at `store_path` into a manifest JSON (written atomically); return the manifest."""
    store = FeatureStore(store_path)
    manifest = build_feature_manifest(store, deterministic=deterministic, progress=progress)
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a feature manifest JSON, checking it is one (clear error naming the file otherwise)."""
    path = Path(path)
    data = read_json(path)
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


def _exact_rows(baseline: Mapping[str, Any], new: Mapping[str, Any]) -> list[ComparisonRow]:
    """Rows, ids, schema, dims, dtype, weights, and content hashes when the baseline is deterministic."""
    rows = [_exact_row("row_count", baseline["row_count"], new["row_count"])]
    ids_row = _exact_row("image_ids_sha256", baseline["image_ids_sha256"], new["image_ids_sha256"])
    if ids_row.failed:
        ids_row.note = _id_diff_note(baseline, new)
    rows.append(ids_row)
    schema_row = _exact_row("schema", baseline["schema"], new["schema"])
    if schema_row.failed:
        schema_row.note = _schema_note(baseline["schema"], new["schema"])
    schema_row.baseline = f"{len(baseline['schema'])} columns"
    schema_row.new = f"{len(new['schema'])} columns"
    rows.append(schema_row)
    for key in ("feature_dim", "feature_dtype", "weights_sha256", "untrained"):
        if baseline.get(key) is not None:
            rows.append(_exact_row(key, baseline.get(key), new.get(key)))
    if baseline.get("deterministic"):
        new_hashes = new.get("content_sha256") or {}
        for column, digest in sorted((baseline.get("content_sha256") or {}).items()):
            name = f"content_sha256.{column}"
            if column not in new_hashes:
                rows.append(ComparisonRow(name, digest, None, None, "exact", "MISSING", "no hash in new"))
            else:
                rows.append(_exact_row(name, digest, new_hashes[column]))
    return rows


def _statistic_rows(
    baseline: Mapping[str, Any], new: Mapping[str, Any], tolerances: Tolerances
) -> list[ComparisonRow]:
    """Each baseline column statistic in `new`: counts exact, the rest within its tolerance."""
    rows: list[ComparisonRow] = []
    new_columns: Mapping[str, Mapping[str, Any]] = new["columns"]
    for column, base_stats in baseline["columns"].items():
        if column not in new_columns:
            note = f"column {column} absent from new"
            rows.append(ComparisonRow(f"{column}.*", None, None, None, "-", "MISSING", note))
            continue
        for stat, base_value in base_stats.items():
            name = f"{column}.{stat}"
            new_value = new_columns[column].get(stat)
            if base_value is None and new_value is None:
                continue
            if new_value is None:
                rows.append(ComparisonRow(name, base_value, None, None, "-", "MISSING", f"{name} absent"))
            elif base_value is None:
                rows.append(
                    ComparisonRow(name, None, float(new_value), None, "-", "CHANGED", "baseline had none")
                )
            elif stat == "count":
                rows.append(_exact_row(name, base_value, new_value))
            else:
                base_float, new_float = float(base_value), float(new_value)
                tolerance = tolerances.feature_tolerance(name)
                status: Status = "ok" if tolerance.allows(base_float, new_float) else "CHANGED"
                delta = new_float - base_float
                rows.append(
                    ComparisonRow(name, base_float, new_float, delta, tolerance.describe(base_float), status)
                )
    return rows


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
    result.rows = _exact_rows(baseline, new) + _statistic_rows(baseline, new, tolerances)
    return result
