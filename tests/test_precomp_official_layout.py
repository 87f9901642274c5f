"""Precomp import in the official loader's other layout (one .npy row per caption) and its caption reading.

Built from the official fixture's test split, whichever layout it has, so the same tests run on the public
fixtures (one row per image) and the hidden variant (one row per caption).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.captions import read_captions
from pipeline.precomp import PrecompError, import_precomp, read_caption_lines
from pipeline.store import FeatureStore
from stages.cli import app

CAPTIONS_PER_IMAGE = 5


def fixture_split(fixtures: Path) -> tuple[np.ndarray, Path]:
    """The test split's per-image rows (the first of each image's rows) and its captions file."""
    (data,) = [p for p in sorted((fixtures / "data").iterdir()) if p.is_dir()]
    caps = data / "test_caps.txt"
    ims = np.load(data / "test_ims.npy", allow_pickle=False)
    num_captions = len(read_caption_lines(caps))
    assert num_captions % CAPTIONS_PER_IMAGE == 0
    if ims.shape[0] == num_captions:  # already one row per caption
        ims = ims[::CAPTIONS_PER_IMAGE]
    assert ims.shape[0] * CAPTIONS_PER_IMAGE == num_captions
    return ims, caps


def write_split(folder: Path, rows: np.ndarray, caps: Path) -> Path:
    """A `test` split in `folder` with these .npy rows and the fixture's captions file (bytes unchanged)."""
    folder.mkdir(parents=True)
    np.save(folder / "test_ims.npy", rows)
    shutil.copyfile(caps, folder / "test_caps.txt")
    return folder


def stored(store_dir: Path) -> tuple[list[str], list[np.ndarray]]:
    store = FeatureStore(store_dir)
    return store.image_ids, [record.features for record in store.iter_records()]


def test_per_caption_layout_imports_as_the_per_image_layout(
    scan_official_fixtures: Path, tmp_path: Path
) -> None:
    per_image, caps = fixture_split(scan_official_fixtures)
    image_dir = write_split(tmp_path / "per_image", per_image, caps)
    caption_dir = write_split(
        tmp_path / "per_caption", np.repeat(per_image, CAPTIONS_PER_IMAGE, axis=0), caps
    )

    by_image = import_precomp(image_dir, "test", tmp_path / "a", chunk_images=3, progress=False)
    by_caption = import_precomp(caption_dir, "test", tmp_path / "b", chunk_images=3, progress=False)
    assert not by_image.rows_per_caption and by_caption.rows_per_caption
    assert not by_image.repeated_rows_checked and by_image.repeated_rows_max_abs_diff is None
    assert by_caption.repeated_rows_checked and by_caption.images_with_differing_rows == 0
    assert by_caption.repeated_rows_max_abs_diff == 0.0
    ids_a, features_a = stored(tmp_path / "a")
    ids_b, features_b = stored(tmp_path / "b")
    assert ids_a == ids_b and len(features_b) == len(per_image)
    for a, b, expected in zip(features_a, features_b, per_image, strict=True):
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)
    metadata = FeatureStore(tmp_path / "b").metadata
    assert metadata["repeated_rows_checked"] is True and metadata["images_with_differing_rows"] == 0
    assert metadata["repeated_rows_max_abs_diff"] == 0.0
    assert FeatureStore(tmp_path / "a").metadata["repeated_rows_checked"] is False
    captions_a = read_captions(by_image.captions_path, captions_per_image=CAPTIONS_PER_IMAGE).captions
    captions_b = read_captions(by_caption.captions_path, captions_per_image=CAPTIONS_PER_IMAGE).captions
    assert captions_a == captions_b == read_caption_lines(caps)


def test_the_fixture_split_itself_imports(scan_official_fixtures: Path, tmp_path: Path) -> None:
    """Whatever layout the fixture's own test split has, the store holds each image's first row."""
    per_image, caps = fixture_split(scan_official_fixtures)
    result = import_precomp(caps.parent, "test", tmp_path / "out", progress=False)
    assert result.num_images == len(per_image)
    _, features = stored(tmp_path / "out")
    for got, expected in zip(features, per_image, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_differing_repeated_row_is_reported_not_refused(
    scan_official_fixtures: Path, tmp_path: Path
) -> None:
    per_image, caps = fixture_split(scan_official_fixtures)
    rows = np.repeat(per_image, CAPTIONS_PER_IMAGE, axis=0)
    image = len(per_image) // 2
    altered = image * CAPTIONS_PER_IMAGE + 3
    rows[altered, 1, 2] += np.float32(0.25)
    rows[altered, 0, 0] -= np.float32(0.125)
    expected_diff = float(np.abs(rows[altered] - rows[image * CAPTIONS_PER_IMAGE]).max())
    assert expected_diff > 0
    data = write_split(tmp_path / "data", rows, caps)

    result = import_precomp(data, "test", tmp_path / "out", chunk_images=4, progress=False)
    assert result.repeated_rows_checked and result.images_with_differing_rows == 1
    assert result.repeated_rows_max_abs_diff == pytest.approx(expected_diff, rel=0, abs=0)
    metadata = FeatureStore(tmp_path / "out").metadata
    assert metadata["images_with_differing_rows"] == 1
    assert metadata["repeated_rows_max_abs_diff"] == pytest.approx(expected_diff)
    _, features = stored(tmp_path / "out")
    np.testing.assert_array_equal(features[image], per_image[image])  # the first row was kept

    cli = CliRunner().invoke(
        app,
        [
            "import-precomp",
            "--data",
            str(data),
            "--split",
            "test",
            "--out",
            str(tmp_path / "cli"),
            "--no-progress",
        ],
    )
    assert cli.exit_code == 0, cli.output
    output = " ".join(cli.output.split())
    assert f"warning: 1 of {len(per_image)} images have repeated rows that differ" in output
    assert (
        f"max abs difference {expected_diff:.6g}" in output and "first row of each image was kept" in output
    )


def test_a_non_finite_skipped_row_counts_as_an_infinite_difference(
    scan_official_fixtures: Path, tmp_path: Path
) -> None:
    per_image, caps = fixture_split(scan_official_fixtures)
    rows = np.repeat(per_image, CAPTIONS_PER_IMAGE, axis=0)
    rows[1, 0, 0] = np.nan
    rows[CAPTIONS_PER_IMAGE + 4, 0, 0] = np.inf
    result = import_precomp(
        write_split(tmp_path / "data", rows, caps), "test", tmp_path / "out", progress=False
    )
    assert result.images_with_differing_rows == 2 and result.repeated_rows_max_abs_diff == np.inf
    assert FeatureStore(tmp_path / "out").metadata["repeated_rows_max_abs_diff"] == "inf"


def test_equal_rows_are_announced_by_the_cli(scan_official_fixtures: Path, tmp_path: Path) -> None:
    per_image, caps = fixture_split(scan_official_fixtures)
    data = write_split(tmp_path / "data", np.repeat(per_image, CAPTIONS_PER_IMAGE, axis=0), caps)
    cli = CliRunner().invoke(
        app,
        [
            "import-precomp",
            "--data",
            str(data),
            "--split",
            "test",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
    )
    assert cli.exit_code == 0, cli.output
    output = " ".join(cli.output.split())
    assert "repeated rows: each image's 5 rows are equal" in output and "warning" not in output
    help_output = CliRunner().invoke(app, ["import-precomp", "--help"], terminal_width=200).output
    help_text = " ".join(re.sub(r"[\u2500-\u257f]", " ", help_output).split())  # without rich's box lines
    assert "float32 (the default for imports" in help_text and "~4e-3" in help_text


CAPTION_BYTES = [
    b"  A dog\rjumps \t",  # a lone \r stays inside the line; ASCII blanks stripped
    "Un caf\u00e9\u00a0".encode(),  # a trailing U+00A0 is not ASCII whitespace: it stays
    b"plain",
    b"\tcrlf line\r",  # \r\n line end: the \r is stripped as ASCII whitespace
    b"last line without newline",
]
EXPECTED_CAPTIONS = ["A dog\rjumps", "Un caf\u00e9\u00a0", "plain", "crlf line", "last line without newline"]


@pytest.mark.parametrize("trailing_newline", [False, True])
def test_caption_lines_are_read_as_the_official_loader(tmp_path: Path, trailing_newline: bool) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "x_caps.txt").write_bytes(b"\n".join(CAPTION_BYTES) + (b"\n" if trailing_newline else b""))
    assert read_caption_lines(data / "x_caps.txt") == EXPECTED_CAPTIONS
    features = np.arange(1 * 2 * 3, dtype=np.float32).reshape(1, 2, 3)
    np.save(data / "x_ims.npy", features)
    result = import_precomp(data, "x", tmp_path / "out", progress=False)
    assert result.num_captions == 5
    assert read_captions(result.captions_path, captions_per_image=5).captions == EXPECTED_CAPTIONS


def test_undecodable_caption_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x_caps.txt"
    path.write_bytes(b"fine\nalso fine\r\nbad \xff byte\n")
    with pytest.raises(PrecompError, match=r"x_caps\.txt:3: not UTF-8 text"):
        read_caption_lines(path)


def test_ids_file_is_still_read(scan_official_fixtures: Path, tmp_path: Path) -> None:
    per_image, caps = fixture_split(scan_official_fixtures)
    data = write_split(tmp_path / "data", np.repeat(per_image, CAPTIONS_PER_IMAGE, axis=0), caps)
    ids = [f"img{index}" for index in range(len(per_image))]
    # one id per caption row, CRLF line ends and blanks around the ids, no final newline
    (data / "test_ids.txt").write_bytes(
        b"\r\n".join(f" {image_id}\t".encode() for image_id in ids for _ in range(CAPTIONS_PER_IMAGE))
    )
    result = import_precomp(data, "test", tmp_path / "out", progress=False)
    assert result.image_ids_source == "test_ids.txt"
    assert FeatureStore(tmp_path / "out").image_ids == ids
