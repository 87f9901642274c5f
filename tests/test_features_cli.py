"""`scan-pipe features`: TSV export/import through the CLI round-trips a store; bad input names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from pipeline.store import FeatureStore
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
