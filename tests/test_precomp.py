"""Import of SCAN's precomputed `{split}_ims.npy` + `{split}_caps.txt`, library and CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.captions import read_captions
from pipeline.precomp import PrecompError, import_precomp
from pipeline.store import FeatureStore
from stages.cli import app

NUM_IMAGES, REGIONS, DIM = 7, 4, 8


def make_split(
    folder: Path, split: str = "test", *, rows_per_caption: bool = False, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """A tiny split in the original format; returns the per-image features and the captions."""
    rng = np.random.default_rng(seed)
    per_image = rng.standard_normal((NUM_IMAGES, REGIONS, DIM)).astype(np.float32)
    captions = [f"image {i} caption {k}" for i in range(NUM_IMAGES) for k in range(5)]
    rows = np.repeat(per_image, 5, axis=0) if rows_per_caption else per_image
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", rows)
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return per_image, captions


@pytest.mark.parametrize("rows_per_caption", [False, True])
def test_import_writes_store_and_captions(tmp_path: Path, rows_per_caption: bool) -> None:
    per_image, captions = make_split(tmp_path / "data", rows_per_caption=rows_per_caption)
    result = import_precomp(
        tmp_path / "data",
        "test",
        tmp_path / "out",
        feature_dtype="float32",
        rows_per_part=3,
        chunk_images=2,
        progress=False,
    )
    assert result.num_images == NUM_IMAGES and result.num_captions == 5 * NUM_IMAGES
    assert result.rows_per_caption is rows_per_caption
    assert (result.regions, result.feature_dim) == (REGIONS, DIM)
    store = FeatureStore(tmp_path / "out")
    assert len(store.parts) == 3  # 7 images in parts of 3
    assert store.image_ids == [f"test/{i:06d}" for i in range(NUM_IMAGES)]
    assert (
        store.metadata["source"] == "scan_precomp" and store.metadata["rows_per_caption"] is rows_per_caption
    )
    for index, record in enumerate(store.iter_records()):
        np.testing.assert_array_equal(record.features, per_image[index])
        assert record.boxes.shape == (REGIONS, 4) and not record.boxes.any()
        assert (record.image_w, record.image_h) == (0, 0) and record.object_ids is None
    table = read_captions(tmp_path / "out" / "captions.parquet", captions_per_image=5)
    assert table.captions == captions
    assert table.unique_image_ids == store.image_ids
    assert table.image_ids[12] == store.image_ids[12 // 5]


def test_float16_is_the_default(tmp_path: Path) -> None:
    per_image, _ = make_split(tmp_path / "data")
    import_precomp(tmp_path / "data", "test", tmp_path / "out", progress=False)
    record = next(FeatureStore(tmp_path / "out").iter_records())
    assert record.features.dtype == np.float16
    np.testing.assert_array_equal(record.features, per_image[0].astype(np.float16))


def test_errors_name_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_split(data)
    out = tmp_path / "out"
    with pytest.raises(PrecompError, match=r"dev_ims\.npy: features file not found"):
        import_precomp(data, "dev", out, progress=False)
    (data / "test_caps.txt").rename(data / "kept_caps.txt")
    with pytest.raises(PrecompError, match=r"test_caps\.txt: captions file not found"):
        import_precomp(data, "test", out, progress=False)
    (data / "kept_caps.txt").rename(data / "test_caps.txt")

    np.save(data / "flat_ims.npy", np.zeros((7, 32), np.float32))
    (data / "flat_caps.txt").write_text("a\n" * 35)
    with pytest.raises(PrecompError, match=r"flat_ims\.npy: expected a 3-D array"):
        import_precomp(data, "flat", out, progress=False)

    np.save(data / "odd_ims.npy", np.zeros((7, 4, 8), np.float32))
    (data / "odd_caps.txt").write_text("a\n" * 34)
    with pytest.raises(PrecompError, match=r"odd_caps\.txt: 34 captions is not a multiple of 5"):
        import_precomp(data, "odd", out, progress=False)

    np.save(data / "short_ims.npy", np.zeros((6, 4, 8), np.float32))
    (data / "short_caps.txt").write_text("a\n" * 35)
    with pytest.raises(PrecompError, match=r"short_ims\.npy: 6 image rows do not match .*35 captions"):
        import_precomp(data, "short", out, progress=False)

    np.save(data / "ints_ims.npy", np.zeros((7, 4, 8), np.int64))
    (data / "ints_caps.txt").write_text("a\n" * 35)
    with pytest.raises(PrecompError, match=r"ints_ims\.npy: features must be floating point"):
        import_precomp(data, "ints", out, progress=False)

    np.save(data / "obj_ims.npy", np.array([{"a": 1}] * 7, dtype=object).reshape(7, 1, 1), allow_pickle=True)
    (data / "obj_caps.txt").write_text("a\n" * 35)
    with pytest.raises(PrecompError, match=r"obj_ims\.npy: not a plain numeric \.npy"):
        import_precomp(data, "obj", out, progress=False)
    assert not list(out.glob("part-*.parquet"))  # nothing half-written

    import_precomp(data, "test", out, progress=False)
    with pytest.raises(PrecompError, match="already holds a feature store"):
        import_precomp(data, "test", out, progress=False)
    import_precomp(data, "test", out, overwrite=True, progress=False)
    assert len(FeatureStore(out)) == NUM_IMAGES


def test_cli_import_precomp(tmp_path: Path) -> None:
    make_split(tmp_path / "data", "testall", rows_per_caption=True)
    runner = CliRunner()
    args = [
        "import-precomp",
        "--data",
        str(tmp_path / "data"),
        "--split",
        "testall",
        "--out",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, [*args, "--feature-dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # independent of terminal wrapping
    assert "imported 7 images" in output and "every 5th row kept" in output
    assert FeatureStore(tmp_path / "out").metadata["feature_dtype"] == "float32"
    assert (tmp_path / "out" / "captions.parquet").is_file()

    again = runner.invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 1 and "already holds a feature store" in " ".join(again.output.split())
    missing = runner.invoke(
        app,
        ["import-precomp", "--data", str(tmp_path / "data"), "--split", "val", "--out", str(tmp_path / "o2")],
    )
    assert missing.exit_code == 1 and "val_ims.npy: features file not found" in " ".join(
        missing.output.split()
    )
    assert "Traceback" not in missing.output
    bad_dtype = runner.invoke(app, [*args, "--feature-dtype", "float64"])
    assert bad_dtype.exit_code == 2 and "float16 or float32" in " ".join(bad_dtype.output.split())
