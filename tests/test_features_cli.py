"""`scan-pipe features`: TSV export/import through the CLI round-trips a store; bad input names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from pipeline.store import FeatureStore, RegionRecord
from stages.cli import app
from tests.test_store import make_records, write_store

runner = CliRunner()


def test_export_then_import_round_trips_features_and_boxes(tmp_path: Path) -> None:
    records = make_records(5, dim=8)
    write_store(tmp_path / "store", records, feature_dtype="float32")
    tsv = tmp_path / "dump.tsv"

    exported = runner.invoke(app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv)])
    assert exported.exit_code == 0, exported.output
    assert len(tsv.read_text().splitlines()) == 5

    imported = runner.invoke(
        app, ["features", "import-tsv", str(tsv), str(tmp_path / "back"), "--feature-dtype", "float32"]
    )
    assert imported.exit_code == 0, imported.output
    back = {record.image_id: record for record in FeatureStore(tmp_path / "back").iter_records()}
    assert sorted(back) == sorted(record.image_id for record in records)
    for record in records:
        np.testing.assert_array_equal(back[record.image_id].features, record.features.astype(np.float32))
        np.testing.assert_array_equal(back[record.image_id].boxes, record.boxes)

    info = runner.invoke(app, ["features", "info", str(tmp_path / "back")])
    assert info.exit_code == 0, info.output
    assert "5" in info.output and "float32" in info.output


def test_bad_inputs_name_the_path(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["features", "import-tsv", str(tmp_path / "nope.tsv"), str(tmp_path / "o")])
    assert missing.exit_code == 2
    assert "nope.tsv" in missing.output

    not_a_store = runner.invoke(app, ["features", "info", str(tmp_path / "empty")])
    assert not_a_store.exit_code == 2
    assert "empty" in not_a_store.output

    write_store(tmp_path / "full", make_records(2, dim=8))
    tsv = tmp_path / "x.tsv"
    tsv.write_text("")
    occupied = runner.invoke(app, ["features", "import-tsv", str(tsv), str(tmp_path / "full")])
    assert occupied.exit_code == 2
    assert "already holds" in occupied.output


def _coco_records(names: list[str], dim: int = 8) -> list[RegionRecord]:
    rng = np.random.default_rng(1)
    return [
        RegionRecord(
            image_id=name,
            image_w=640,
            image_h=480,
            boxes=rng.uniform(0, 400, size=(3, 4)).astype(np.float32),
            features=rng.standard_normal((3, dim)).astype(np.float32),
        )
        for name in names
    ]


def test_export_ids_rules_write_integer_ids(tmp_path: Path) -> None:
    names = ["val2014/COCO_val2014_000000391895.jpg", "train2017/000000000139.jpg"]
    write_store(tmp_path / "store", _coco_records(names), feature_dtype="float32")
    tsv = tmp_path / "coco.tsv"
    coco = runner.invoke(app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv), "--ids", "coco"])
    assert coco.exit_code == 0, coco.output
    assert [line.split("\t")[0] for line in tsv.read_text().splitlines()] == ["391895", "139"]
    assert "note" not in coco.output

    id_map = tmp_path / "ids.tsv"
    id_map.write_text(f"image_id\tid\n{names[0]}\t7\n{names[1]}\t8\n")
    mapped = runner.invoke(
        app,
        [
            "features",
            "export-tsv",
            str(tmp_path / "store"),
            str(tsv),
            "--ids",
            "mapping",
            "--id-map",
            str(id_map),
        ],
    )
    assert mapped.exit_code == 0, mapped.output
    assert [line.split("\t")[0] for line in tsv.read_text().splitlines()] == ["7", "8"]

    kept = runner.invoke(app, ["features", "export-tsv", str(tmp_path / "store"), str(tmp_path / "keep.tsv")])
    assert kept.exit_code == 0, kept.output
    assert "int(image_id)" in " ".join(kept.output.split())  # the note says which readers cannot read it


def test_export_id_errors_write_nothing(tmp_path: Path) -> None:
    names = ["val2014/COCO_val2014_000000391895.jpg", "misc/holiday.jpg"]
    write_store(tmp_path / "store", _coco_records(names))
    tsv = tmp_path / "out.tsv"
    tsv.write_text("previous content\n")
    bad = runner.invoke(app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv), "--ids", "flickr"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    output = " ".join(bad.output.split())
    assert "'val2014/COCO_val2014_000000391895.jpg'" in output and "'misc/holiday.jpg'" in output
    assert "2 of 2 image ids cannot be converted" in output
    assert tsv.read_text() == "previous content\n"  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    id_map = tmp_path / "map.csv"
    id_map.write_text(f"{names[0]},1\n")
    missing = runner.invoke(
        app,
        [
            "features",
            "export-tsv",
            str(tmp_path / "store"),
            str(tsv),
            "--ids",
            "mapping",
            "--id-map",
            str(id_map),
        ],
    )
    assert missing.exit_code == 2 and "'misc/holiday.jpg'" in missing.output
    assert tsv.read_text() == "previous content\n"

    no_map = runner.invoke(
        app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv), "--ids", "mapping"]
    )
    assert no_map.exit_code == 2 and "--id-map" in no_map.output
    stray_map = runner.invoke(
        app,
        [
            "features",
            "export-tsv",
            str(tmp_path / "store"),
            str(tsv),
            "--ids",
            "coco",
            "--id-map",
            str(id_map),
        ],
    )
    assert stray_map.exit_code == 2 and "only used with --ids mapping" in " ".join(stray_map.output.split())
    unknown = runner.invoke(
        app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv), "--ids", "int"]
    )
    assert unknown.exit_code == 2 and "keep, coco, flickr or mapping" in " ".join(unknown.output.split())


def test_import_tsv_defaults_to_float32_and_announces_float16(tmp_path: Path) -> None:
    records = make_records(4, dim=8)
    write_store(tmp_path / "store", records, feature_dtype="float32")
    tsv = tmp_path / "dump.tsv"
    assert runner.invoke(app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv)]).exit_code == 0

    exact = runner.invoke(app, ["features", "import-tsv", str(tsv), str(tmp_path / "exact")])
    assert exact.exit_code == 0, exact.output
    assert "float32" in exact.output and "rounding error" not in exact.output
    assert FeatureStore(tmp_path / "exact").feature_dtype == "float32"

    half = runner.invoke(
        app, ["features", "import-tsv", str(tsv), str(tmp_path / "half"), "--feature-dtype", "float16"]
    )
    assert half.exit_code == 0, half.output
    features = np.concatenate([r.features for r in records])
    expected = float(np.abs(features.astype(np.float16).astype(np.float32) - features).max())
    assert f"float16: max abs rounding error {expected:.3g} on these features" in " ".join(
        half.output.split()
    )
    assert FeatureStore(tmp_path / "half").feature_dtype == "float16"


def test_import_tsv_refuses_non_finite_values_naming_each_line(tmp_path: Path) -> None:
    records = make_records(4, dim=8, adaptive=False)
    records[1].features[0, 2] = np.nan
    records[3].boxes[2, 0] = np.inf
    write_store(tmp_path / "store", records, feature_dtype="float32")
    tsv = tmp_path / "dump.tsv"
    assert runner.invoke(app, ["features", "export-tsv", str(tmp_path / "store"), str(tsv)]).exit_code == 0
    refused = runner.invoke(app, ["features", "import-tsv", str(tsv), str(tmp_path / "back")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    output = " ".join(refused.output.split())
    assert "2 of 4 images hold non-finite values (NaN/inf); nothing was imported" in output
    assert f"line 2, image '{records[1].image_id}': features: 1 NaN, 0 inf" in output
    assert f"line 4, image '{records[3].image_id}': boxes: 0 NaN, 1 inf" in output
    assert not list((tmp_path / "back").glob("*.parquet"))
