"""Compare two runs' artifacts (recall metrics, feature stores) against tolerances, for CI.

A CI job keeps a committed baseline (a `metrics.json` and a feature manifest) and checks every new run
against it. One module per job: `tolerances` (the rules and the file that overrides them), `metrics`
(direction-aware metric checks), `features` (store manifests and their checks), `dispatch` (what two paths
hold, and which comparison they get); `result` holds the rows and verdict they all produce.
"""

from pipeline.compare.dispatch import compare_paths, detect_artifact
from pipeline.compare.features import (
    RunningStats,
    build_feature_manifest,
    compare_manifests,
    load_manifest,
    write_store_manifest,
)
from pipeline.compare.metrics import compare_metrics, flatten_metrics, load_metrics
from pipeline.compare.result import CompareError, ComparisonResult, ComparisonRow
from pipeline.compare.tolerances import Tolerances, load_tolerances, metric_direction, tolerances_for

__all__ = [
    "CompareError",
    "ComparisonResult",
    "ComparisonRow",
    "RunningStats",
    "Tolerances",
    "build_feature_manifest",
    "compare_manifests",
    "compare_metrics",
    "compare_paths",
    "detect_artifact",
    "flatten_metrics",
    "load_manifest",
    "load_metrics",
    "load_tolerances",
    "metric_direction",
    "tolerances_for",
    "write_store_manifest",
]
