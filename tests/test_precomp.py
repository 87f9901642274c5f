"""Import of SCAN's precomputed `{split}_ims.npy`, `{split}_caps.txt`, `{split}_ids.txt`: library and CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.captions import read_captions
from pipeline.precomp import PrecompError, import_precomp
from pipeline.store import FeatureStore, list_parts
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
    # boxes and image sizes are not in the data: zeros that the metadata marks as unknown
    assert store.metadata["boxes_known"] is False and store.metadata["image_size_known"] is False
    assert store.metadata["image_ids"] == "synthetic" and result.image_ids_source == "synthetic"
    for index, record in enumerate(store.iter_records()):
        np.testing.assert_array_equal(record.features, per_image[index])
        assert record.boxes.shape == (REGIONS, 4) and not record.boxes.any()
        assert (record.image_w, record.image_h) == (0, 0) and record.object_ids is None
    # the captions live beside the store directory, which holds only the store
    assert result.captions_path == tmp_path / "out.captions.parquet"
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".parquet" and p not in store.parts]
    table = read_captions(tmp_path / "out.captions.parquet", captions_per_image=5)
    assert table.captions == captions
    assert table.unique_image_ids == store.image_ids
    assert table.image_ids[12] == store.image_ids[12 // 5]


def test_float32_is_the_default_and_float16_reports_its_rounding_error(tmp_path: Path) -> None:
    per_image, _ = make_split(tmp_path / "data")
    exact = import_precomp(tmp_path / "data", "test", tmp_path / "out", progress=False)
    assert exact.feature_dtype == "float32" and exact.float16_max_abs_error is None
    record = next(FeatureStore(tmp_path / "out").iter_records())
    assert record.features.dtype == np.float32
    np.testing.assert_array_equal(record.features, per_image[0])

    half = import_precomp(
        tmp_path / "data", "test", tmp_path / "half", feature_dtype="float16", chunk_images=3, progress=False
    )
    record = next(FeatureStore(tmp_path / "half").iter_records())
    assert record.features.dtype == np.float16
    np.testing.assert_array_equal(record.features, per_image[0].astype(np.float16))
    expected = float(np.abs(per_image.astype(np.float16).astype(np.float32) - per_image).max())
    assert half.float16_max_abs_error == pytest.approx(expected) and 0 < expected < 4e-3


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
    assert "synthetic image ids testall/000000" in output and "no testall_ids.txt" in output
    assert "boxes_known: false" in output and "float16" not in output
    assert FeatureStore(tmp_path / "out").metadata["feature_dtype"] == "float32"
    assert (tmp_path / "out.captions.parquet").is_file() and str(tmp_path / "out.captions.parquet") in output
    assert not (tmp_path / "out" / "captions.parquet").exists()

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


def test_cli_float32_default_and_float16_announced(tmp_path: Path) -> None:
    per_image, _ = make_split(tmp_path / "data")
    runner = CliRunner()
    base = ["import-precomp", "--data", str(tmp_path / "data"), "--split", "test", "--no-progress"]
    exact = runner.invoke(app, [*base, "--out", str(tmp_path / "exact")])
    assert exact.exit_code == 0, exact.output
    assert "float32" in exact.output and "rounding error" not in exact.output
    assert FeatureStore(tmp_path / "exact").feature_dtype == "float32"

    half = runner.invoke(app, [*base, "--out", str(tmp_path / "half"), "--feature-dtype", "float16"])
    assert half.exit_code == 0, half.output
    expected = float(np.abs(per_image.astype(np.float16).astype(np.float32) - per_image).max())
    output = " ".join(half.output.split())
    assert f"float16: max abs rounding error {expected:.3g} on these features" in output


def write_ids(folder: Path, split: str, ids: list[str]) -> None:
    (folder / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")


@pytest.mark.parametrize("rows_per_caption", [False, True])
def test_ids_file_gives_the_image_ids(tmp_path: Path, rows_per_caption: bool) -> None:
    data = tmp_path / "data"
    per_image, captions = make_split(data, rows_per_caption=rows_per_caption)
    ids = [str(391895 + 7 * i) for i in range(NUM_IMAGES)]
    # the ids file follows the .npy: one line per image, or one per caption row (each image's id 5 times)
    write_ids(data, "test", [i for i in ids for _ in range(5)] if rows_per_caption else ids)
    result = import_precomp(data, "test", tmp_path / "out", progress=False)
    assert result.image_ids_source == "test_ids.txt"
    store = FeatureStore(tmp_path / "out")
    assert store.image_ids == ids and store.metadata["image_ids"] == "test_ids.txt"
    np.testing.assert_array_equal(store.read([ids[3]])[0].features, per_image[3])
    table = read_captions(result.captions_path, captions_per_image=5)
    assert table.unique_image_ids == ids and table.captions == captions


def test_ids_file_errors_name_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_split(data)
    out = tmp_path / "out"
    ids = [f"im{i}" for i in range(NUM_IMAGES)]
    write_ids(data, "test", ids[:-1])
    with pytest.raises(PrecompError, match=r"test_ids\.txt: 6 ids, expected 7 \(one per image\) or 35"):
        import_precomp(data, "test", out, progress=False)
    per_caption = [i for i in ids for _ in range(5)]
    per_caption[11] = "other"
    write_ids(data, "test", per_caption)
    with pytest.raises(PrecompError, match=r"test_ids\.txt:12: id 'other' differs from 'im2' on line 11"):
        import_precomp(data, "test", out, progress=False)
    write_ids(data, "test", [*ids[:4], "im1", *ids[5:]])
    with pytest.raises(
        PrecompError, match=r"test_ids\.txt:5: image id 'im1' is also the id of another image"
    ):
        import_precomp(data, "test", out, progress=False)
    write_ids(data, "test", [*ids[:2], " ", *ids[3:]])
    with pytest.raises(PrecompError, match=r"test_ids\.txt:3: empty image id"):
        import_precomp(data, "test", out, progress=False)
    assert not out.exists() or not list_parts(out)


def test_captions_stay_out_of_the_store_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_split(data)
    out = tmp_path / "store"
    with pytest.raises(PrecompError, match="must not be inside the feature store directory"):
        import_precomp(data, "test", out, captions_out=out / "captions.parquet", progress=False)
    out.mkdir()
    (out / "captions.parquet").write_bytes(b"left by an older import")
    with pytest.raises(
        PrecompError, match=r"Parquet files that are not feature-store parts \(captions\.parquet\)"
    ):
        import_precomp(data, "test", out, progress=False)
    (out / "captions.parquet").unlink()

    chosen = tmp_path / "elsewhere" / "test_captions.parquet"
    result = import_precomp(data, "test", out, captions_out=chosen, progress=False)
    assert result.captions_path == chosen and read_captions(chosen).num_images == NUM_IMAGES
    assert not (tmp_path / "store.captions.parquet").exists()
    with pytest.raises(PrecompError, match=r"test_captions\.parquet: already exists; use overwrite"):
        import_precomp(data, "test", tmp_path / "store2", captions_out=chosen, progress=False)

    runner = CliRunner()
    args = ["import-precomp", "--data", str(data), "--split", "test", "--no-progress"]
    inside = runner.invoke(
        app, [*args, "--out", str(out), "--captions-out", str(out / "c.parquet"), "--overwrite"]
    )
    assert inside.exit_code == 1 and "must not be inside the feature store" in " ".join(inside.output.split())
    custom = runner.invoke(
        app, [*args, "--out", str(tmp_path / "s3"), "--captions-out", str(tmp_path / "c3.parquet")]
    )
    assert custom.exit_code == 0, custom.output
    assert read_captions(tmp_path / "c3.parquet").num_images == NUM_IMAGES


def test_non_finite_rows_refuse_the_import_and_are_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    per_image, _ = make_split(data, rows_per_caption=True)
    rows = np.load(data / "test_ims.npy")
    rows[10, 1, 2] = np.nan  # image 2's kept row (rows 10..14 are image 2)
    rows[25, 0, :3] = np.inf  # image 5
    rows[31, 0, 0] = np.nan  # a repeated row of image 6 that is not imported: ignored, as the original does
    np.save(data / "test_ims.npy", rows)
    out = tmp_path / "out"
    with pytest.raises(PrecompError) as caught:
        import_precomp(data, "test", out, chunk_images=2, rows_per_part=1, progress=False)
    message = str(caught.value)
    assert "2 of 7 images hold non-finite values (NaN/inf); nothing was imported" in message
    assert "row 10, image 'test/000002': features: 1 NaN, 0 inf" in message
    assert "row 25, image 'test/000005': features: 0 NaN, 3 inf" in message
    assert "000006" not in message
    assert (not out.exists() or not list_parts(out)) and not (tmp_path / "out.captions.parquet").exists()

    # a failed --overwrite import leaves the previous store and captions as they were
    good = tmp_path / "good"
    make_split(good, rows_per_caption=True)
    import_precomp(good, "test", out, progress=False)
    before = sorted(p.name for p in list_parts(out))
    with pytest.raises(PrecompError, match="nothing was imported"):
        import_precomp(data, "test", out, overwrite=True, rows_per_part=1, progress=False)
    assert sorted(p.name for p in list_parts(out)) == before
    np.testing.assert_array_equal(next(FeatureStore(out).iter_records()).features, per_image[0])

    runner = CliRunner()
    refused = runner.invoke(
        app,
        [
            "import-precomp",
            "--data",
            str(data),
            "--split",
            "test",
            "--out",
            str(tmp_path / "o2"),
            "--no-progress",
        ],
    )
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    output = " ".join(refused.output.split())
    assert "row 10, image 'test/000002'" in output and "row 25, image 'test/000005'" in output


def test_values_beyond_float16_are_refused_not_stored_as_inf(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_split(data)
    rows = np.load(data / "test_ims.npy")
    rows[4, 0, 0] = 1e6
    np.save(data / "test_ims.npy", rows)
    with pytest.raises(PrecompError, match=r"row 4, image 'test/000004': values up to \|x\| = 1e\+06 exceed"):
        import_precomp(data, "test", tmp_path / "half", feature_dtype="float16", progress=False)
    import_precomp(data, "test", tmp_path / "exact", progress=False)  # float32 holds it
    assert FeatureStore(tmp_path / "exact").read(["test/000004"])[0].features[0, 0] == 1e6
