"""`scan-pipe compare`: metric regressions by direction and tolerance, feature manifests and their checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.compare import (
    CompareError,
    RunningStats,
    Tolerances,
    build_feature_manifest,
    compare_manifests,
    compare_metrics,
    flatten_metrics,
    load_tolerances,
    metric_direction,
)
from pipeline.errors import UserError
from pipeline.store import FeatureStore, RegionRecord
from pipeline.store_writer import FeatureStoreWriter
from stages.cli import app

BASELINE = {
    "protocol": "flickr30k_1k",
    "num_images": 1000,
    "num_captions": 5000,
    "i2t_r1": 35.0,
    "i2t_r5": 70.0,
    "i2t_r10": 85.0,
    "i2t_medr": 2.0,
    "i2t_meanr": 4.1,
    "t2i_r1": 27.0,
    "t2i_r5": 66.0,
    "t2i_r10": 80.0,
    "t2i_medr": 3.0,
    "t2i_meanr": 5.2,
    "rsum": 363.0,
}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _run(*args: str | Path):
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def test_identical_metrics_pass(tmp_path: Path) -> None:
    base = _write(tmp_path / "base" / "metrics.json", BASELINE)
    new_dir = tmp_path / "new"
    _write(new_dir / "metrics.json", BASELINE)
    result = _run(base, new_dir)  # a directory holding metrics.json works too
    assert result.exit_code == 0, result.output
    assert "no regression" in result.output


def test_rsum_drop_beyond_tolerance_fails(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", BASELINE)
    new = _write(tmp_path / "new.json", {**BASELINE, "rsum": BASELINE["rsum"] - 10.0})
    result = _run(base, new)
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("rsum"))
    assert "REGRESSION" in line and "-10" in line


def test_small_drop_within_tolerance_passes(tmp_path: Path) -> None:
    rule = Tolerances().metric_rule("rsum")
    base = _write(tmp_path / "base.json", BASELINE)
    new = _write(tmp_path / "new.json", {**BASELINE, "rsum": BASELINE["rsum"] - rule.tolerance / 2})
    assert _run(base, new).exit_code == 0


def test_worse_medr_fails_and_better_medr_passes(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", BASELINE)
    worse = _write(tmp_path / "worse.json", {**BASELINE, "t2i_medr": BASELINE["t2i_medr"] + 3})
    better = _write(tmp_path / "better.json", {**BASELINE, "t2i_medr": 1.0, "i2t_meanr": 2.0})
    result = _run(base, worse)
    assert result.exit_code == 1 and "t2i_medr" in result.output.split("REGRESSION in")[-1]
    assert _run(base, better).exit_code == 0


def test_improvement_passes(tmp_path: Path) -> None:
    improved = {**BASELINE, "i2t_r1": 50.0, "t2i_r1": 40.0, "rsum": BASELINE["rsum"] + 28.0}
    result = compare_metrics(flatten_metrics(BASELINE), flatten_metrics(improved))
    assert result.passed
    assert {row.name for row in result.rows if row.status == "improved"} == {"i2t_r1", "t2i_r1", "rsum"}
    base = _write(tmp_path / "base.json", BASELINE)
    assert _run(base, _write(tmp_path / "new.json", improved)).exit_code == 0


def test_missing_metric_fails_and_is_named(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", BASELINE)
    new = _write(tmp_path / "new.json", {k: v for k, v in BASELINE.items() if k != "i2t_r10"})
    result = _run(base, new, "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["regressions"] == ["i2t_r10"]
    assert next(r for r in report["rows"] if r["name"] == "i2t_r10")["status"] == "MISSING"


def test_small_gallery_tolerates_one_flipped_query(tmp_path: Path) -> None:
    sample = {**BASELINE, "num_images": 20, "num_captions": 100}  # one image query = 5 points of i2t recall
    base = _write(tmp_path / "base.json", sample)
    one_flip = {**sample, "i2t_r1": sample["i2t_r1"] - 5.0, "t2i_r5": sample["t2i_r5"] - 1.0}
    one_flip["rsum"] = sample["rsum"] - 6.0
    assert _run(base, _write(tmp_path / "one.json", one_flip)).exit_code == 0
    two_flips = {**one_flip, "i2t_r1": sample["i2t_r1"] - 10.0, "rsum": sample["rsum"] - 11.0}
    result = _run(base, _write(tmp_path / "two.json", two_flips), "--format", "json")
    assert result.exit_code == 1 and json.loads(result.stdout)["regressions"] == ["i2t_r1"]
    collapsed = {**sample, "rsum": 150.0}  # near chance on 20 images
    assert _run(base, _write(tmp_path / "chance.json", collapsed)).exit_code == 1


def test_directions() -> None:
    assert metric_direction("i2t_r10") == "higher"
    assert metric_direction("folds/3/t2i_r5") == "higher"
    assert metric_direction("rsum") == "higher"
    assert metric_direction("t2i_medr") == "lower" and metric_direction("i2t_meanr") == "lower"
    assert metric_direction("num_images") == "info"


def test_tolerance_file_beside_baseline_is_used(tmp_path: Path) -> None:
    base = _write(tmp_path / "ci" / "metrics.json", BASELINE)
    new = _write(tmp_path / "new.json", {**BASELINE, "i2t_r1": 30.0, "rsum": 358.0})
    assert _run(base, new).exit_code == 1  # built-in tolerances: 1 point of R@1, 3 of rsum
    (tmp_path / "ci" / "tolerances.yaml").write_text('metrics:\n  "i2t_r*": 5.0\n  rsum: 10\n')
    result = _run(base, new)
    assert result.exit_code == 0, result.output
    assert "tolerances.yaml" in result.output
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"metrics": {"i2t_r1": 0.5}}))
    assert _run(base, new, "--tolerances", strict).exit_code == 1


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", BASELINE)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = _run(base, broken)
    assert result.exit_code == 2 and "broken.json" in result.output and "not valid JSON" in result.output
    result = _run(base, tmp_path / "absent.json")
    assert result.exit_code == 2 and "absent.json" in result.output
    bad_tolerances = tmp_path / "tol.yaml"
    bad_tolerances.write_text("metric:\n  rsum: 1\n")
    result = _run(base, base, "--tolerances", bad_tolerances)
    assert result.exit_code == 2 and "tol.yaml" in result.output and "metric" in result.output
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        (tmp_path / "neg.yaml").write_text("metrics:\n  rsum: -1\n")
        load_tolerances(tmp_path / "neg.yaml")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    result = _run(base, empty_dir)
    assert result.exit_code == 2 and "empty" in result.output and "neither metrics.json" in result.output
    assert issubclass(CompareError, UserError)  # stages print it as one line, no traceback


# ------------------------------------------------------------------------------------------ features


def _write_store(
    root: Path, *, scale: float = 1.0, rename: dict[str, str] | None = None, tweak: bool = False
):
    rng = np.random.default_rng(7)
    rename = rename or {}
    with FeatureStoreWriter(root, rows_per_part=5, row_group_size=3, metadata={"untrained": True}) as writer:
        for i in range(12):
            features = rng.normal(1.0, 0.5, size=(6, 16)).astype(np.float32) * scale
            if tweak and i == 4:
                features[0, 0] += 0.25  # one value: invisible in the statistics, visible in a content hash
            image_id = f"img_{i:03d}.jpg"
            writer.add(
                RegionRecord(
                    image_id=rename.get(image_id, image_id),
                    image_w=200,
                    image_h=150,
                    boxes=rng.uniform(0, 150, size=(6, 4)).astype(np.float32),
                    features=features,
                    object_conf=rng.uniform(size=6).astype(np.float32),
                )
            )
    return root


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_store(tmp_path_factory.mktemp("stores") / "base")


def test_manifest_round_trip(base_store: Path, tmp_path: Path) -> None:
    manifest_path = tmp_path / "features_manifest.json"
    result = _run("--write-manifest", base_store, manifest_path)
    assert result.exit_code == 0, result.output
    manifest = json.loads(manifest_path.read_text())
    assert manifest["row_count"] == 12 and manifest["deterministic"] is False
    assert manifest["content_sha256"] is None
    assert manifest["columns"]["num_boxes"]["mean"] == pytest.approx(6.0)
    assert set(manifest["schema"]) >= {"image_id", "features", "boxes", "num_boxes"}
    assert _run(manifest_path, base_store).exit_code == 0  # committed manifest vs the store
    assert _run(base_store, base_store).exit_code == 0


def test_planted_feature_change_fails(base_store: Path, tmp_path: Path) -> None:
    manifest_path = tmp_path / "features_manifest.json"
    assert _run("--write-manifest", base_store, manifest_path).exit_code == 0
    changed = _write_store(tmp_path / "scaled", scale=1.05)
    result = _run(manifest_path, changed, "--format", "json")
    assert result.exit_code == 1
    failed = set(json.loads(result.stdout)["regressions"])
    assert {"features.mean", "features.std"} <= failed
    assert not any(name.startswith(("boxes", "row_count", "image_ids")) for name in failed)


def test_planted_image_id_change_fails(base_store: Path, tmp_path: Path) -> None:
    renamed = _write_store(tmp_path / "renamed", rename={"img_003.jpg": "img_999.jpg"})
    result = _run(base_store, renamed)
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if "image_ids_sha256" in line)
    assert "CHANGED" in line and "img_003.jpg" in line and "img_999.jpg" in line


def test_deterministic_manifest_enforces_content_hash(base_store: Path, tmp_path: Path) -> None:
    tweaked = _write_store(tmp_path / "tweaked", tweak=True)
    store = FeatureStore(base_store)
    loose = build_feature_manifest(store, deterministic=False, progress=False)
    strict = build_feature_manifest(store, deterministic=True, progress=False)
    tweaked_manifest = build_feature_manifest(FeatureStore(tweaked), deterministic=True, progress=False)
    assert compare_manifests(loose, tweaked_manifest).passed  # a 0.25 nudge of one value of 1152
    result = compare_manifests(strict, tweaked_manifest)
    assert [row.name for row in result.regressions] == ["content_sha256.features"]
    # CLI: the baseline manifest's flag decides whether the new store is hashed
    manifest_path = tmp_path / "strict.json"
    assert _run("--write-manifest", "--deterministic", base_store, manifest_path).exit_code == 0
    assert _run(manifest_path, base_store).exit_code == 0
    assert _run(manifest_path, tweaked).exit_code == 1


def test_metrics_against_store_is_an_input_error(base_store: Path, tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", BASELINE)
    result = _run(base, base_store)
    assert result.exit_code == 2 and "cannot compare" in result.output


def test_running_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 1000, 33)]
    stats = RunningStats()
    for chunk in chunks:
        stats.update(chunk)
    everything = np.concatenate(chunks)
    summary = stats.summary()
    assert summary["count"] == everything.size
    assert summary["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert summary["std"] == pytest.approx(everything.std(), rel=1e-12)
    assert summary["min"] == everything.min() and summary["max"] == everything.max()
