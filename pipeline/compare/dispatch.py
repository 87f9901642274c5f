"""Decide what two paths hold (metrics, a feature manifest, a feature store); run the matching check."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pipeline.compare.features import MANIFEST_KIND, build_feature_manifest, compare_manifests, load_manifest
from pipeline.compare.metrics import METRICS_FILE_NAME, compare_metrics, load_metrics
from pipeline.compare.result import CompareError, ComparisonResult, read_json
from pipeline.compare.tolerances import Tolerances, tolerances_for
from pipeline.store import FeatureStore, list_parts

ArtifactKind = Literal["metrics", "manifest", "store"]
_FAMILIES: dict[ArtifactKind, str] = {"metrics": "metrics", "manifest": "features", "store": "features"}


def detect_artifact(path: str | Path) -> ArtifactKind:
    """What a path holds: a metrics JSON (or a directory with metrics.json), a manifest JSON, or a store."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / METRICS_FILE_NAME).is_file():
            return "metrics"
        if list_parts(path):
            return "store"
        raise CompareError(
            f"{path}: directory holds neither {METRICS_FILE_NAME} "
            "nor feature-store part files (part-<shard>-<index>.parquet)"
        )
    data = read_json(path)
    if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND:
        return "manifest"
    return "metrics"


def _manifest(path: str | Path, kind: ArtifactKind, deterministic: bool, progress: bool) -> dict[str, Any]:
    """A manifest as committed, or summarised now from a store (with exact hashes when `deterministic`)."""
    if kind == "manifest":
        return load_manifest(path)
    return build_feature_manifest(FeatureStore(path), deterministic=deterministic, progress=progress)


def compare_paths(
    baseline: str | Path,
    new: str | Path,
    tolerances: Tolerances | str | Path | None = None,
    *,
    deterministic: bool | None = None,
    progress: bool = True,
) -> ComparisonResult:
    """Compare two artifacts of the same family; a store is summarised into a manifest first.

    `tolerances`: the rules themselves, a tolerance file, or None for a tolerance file beside the baseline
    (built-in defaults when there is none). When the baseline is a manifest, the new store's manifest follows
    its `deterministic` flag, so the exact hashes are computed exactly when the baseline has them;
    `deterministic` overrides that, and decides alone for two stores.
    """
    if not isinstance(tolerances, Tolerances):
        tolerances = tolerances_for(baseline, tolerances)
    baseline_kind, new_kind = detect_artifact(baseline), detect_artifact(new)
    if _FAMILIES[baseline_kind] != _FAMILIES[new_kind]:
        raise CompareError(
            f"cannot compare {baseline} ({baseline_kind}) with {new} ({new_kind}): "
            "both must be metrics, or both feature stores/manifests"
        )
    names = {"baseline_name": str(baseline), "new_name": str(new)}
    if baseline_kind == "metrics":
        return compare_metrics(load_metrics(baseline), load_metrics(new), tolerances, **names)
    if baseline_kind == "manifest":
        base_manifest = load_manifest(baseline)
        want_hashes = bool(base_manifest["deterministic"]) if deterministic is None else deterministic
    else:
        want_hashes = bool(deterministic)
        base_manifest = _manifest(baseline, baseline_kind, want_hashes, progress)
    new_manifest = _manifest(new, new_kind, want_hashes, progress)
    return compare_manifests(base_manifest, new_manifest, tolerances, **names)
