"""A store directory read by plain Parquet readers: the README's block as written, and the readers the store
layout promises (pyarrow, pandas, DuckDB), one row per image, run records beside the parts skipped."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import duckdb  # the dev extra
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.extraction.summary import ERRORS_FILE, SUMMARY_FILE
from tests.test_store import make_records, write_store

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 9
DIM = 12


def readme_block() -> str:
    """The python block of README.md's "Reading a store without scan-pipe" section."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reading a store without scan-pipe", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the README section should hold one python block"
    return blocks[0]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A store of several parts with a run's records beside them, as `scan-pipe extract` leaves it."""
    root = tmp_path / "features"
    write_store(root, make_records(NUM_IMAGES, dim=DIM), rows_per_part=4, row_group_size=2)
    (root / ERRORS_FILE).write_text('{"image_id": "broken.jpg", "error_type": "decode"}\n')
    (root / SUMMARY_FILE).write_text('{"done": 9}\n')
    return root


def test_run_records_have_names_parquet_readers_skip() -> None:
    assert ERRORS_FILE.startswith("_") and SUMMARY_FILE.startswith("_")


def test_readme_block_reads_one_row_per_image(store_dir: Path) -> None:
    code = readme_block()
    assert code.count("features/") == 3
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("features/", f"{store_dir}/"), "README.md", "exec"), namespace)
    expected = make_records(NUM_IMAGES, dim=DIM)
    df, table, per_image = namespace["df"], namespace["table"], namespace["per_image"]
    assert len(df) == NUM_IMAGES and table.num_rows == NUM_IMAGES and len(per_image) == NUM_IMAGES
    assert sorted(df["image_id"]) == sorted(per_image["image_id"]) == sorted(r.image_id for r in expected)
    first = expected[[r.image_id for r in expected].index(table["image_id"][0].as_py())]
    assert namespace["regions"].shape == (first.num_boxes, DIM)  # the pyarrow reshape
    np.testing.assert_array_equal(namespace["regions"], first.features.astype(np.float16))
    row = df.index[df["image_id"] == expected[0].image_id][0]
    np.testing.assert_array_equal(np.stack(df["features"][row]), expected[0].features.astype(np.float16))
    np.testing.assert_array_equal(np.stack(df["boxes"][row]), expected[0].boxes)


def test_plain_readers_see_only_the_parts(store_dir: Path) -> None:
    """pq.read_table, pd.read_parquet and pyarrow.dataset on the directory, DuckDB on a recursive glob."""
    assert pq.read_table(store_dir).num_rows == NUM_IMAGES
    assert len(pd.read_parquet(store_dir)) == NUM_IMAGES
    assert ds.dataset(store_dir, format="parquet").count_rows() == NUM_IMAGES
    rows = duckdb.sql(f"SELECT image_id, features FROM read_parquet('{store_dir}/**/*.parquet')").fetchall()
    assert len(rows) == NUM_IMAGES == len({image_id for image_id, _ in rows})
    image_id, features = rows[0]
    expected = {r.image_id: r for r in make_records(NUM_IMAGES, dim=DIM)}[image_id]
    assert np.array(features).shape == (expected.num_boxes, DIM)
