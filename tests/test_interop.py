"""Interop and fidelity of imports and exports: TSV ids that the original readers can parse, SCAN's official
precomputed files (ids, both row layouts) into a store and back out, and non-finite values refused by every
importer and by the extraction's `to_record`."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.extraction.detector import NonFiniteRegionsError, to_record
from pipeline.precomp import import_precomp
from pipeline.store import FeatureStore, RegionRecord
from pipeline.store_writer import FeatureStoreWriter
from pipeline.tsv import TsvError, convert_ids, export_tsv, read_id_map, read_tsv
from tests.conftest import SHARED_DIR

OFFICIAL_PRECOMP = SHARED_DIR / "fixtures" / "scan_official" / "data" / "tiny_precomp"


def read_tsv_like_bottom_up_attention(path: Path) -> dict[int, dict[str, object]]:
    """A reader written the way the original bottom-up-attention `read_tsv.py` reads a dump.

    Written here from that description: DictReader over tab-separated lines with fixed field names, the csv
    field size limit raised, `int()` on the id, the sizes and the box count, `base64.decodebytes` and float32
    `frombuffer` reshaped to (num_boxes, -1).
    """
    fieldnames = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
    csv.field_size_limit(sys.maxsize)
    items: dict[int, dict[str, object]] = {}
    with open(path) as handle:
        for item in csv.DictReader(handle, delimiter="\t", fieldnames=fieldnames):
            entry: dict[str, object] = {
                "image_id": int(item["image_id"]),
                "image_w": int(item["image_w"]),
                "image_h": int(item["image_h"]),
                "num_boxes": int(item["num_boxes"]),
            }
            for field in ("boxes", "features"):
                raw = base64.decodebytes(item[field].encode())
                entry[field] = np.frombuffer(raw, dtype=np.float32).reshape(entry["num_boxes"], -1)
            items[entry["image_id"]] = entry  # type: ignore[index]
    return items


def _records(names: Sequence[str], dim: int = 6, *, seed: int = 0) -> list[RegionRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for index, name in enumerate(names):
        n = 2 + index % 3
        records.append(
            RegionRecord(
                image_id=name,
                image_w=500 + index,
                image_h=300 + index,
                boxes=rng.uniform(0, 300, size=(n, 4)).astype(np.float32),
                features=rng.standard_normal((n, dim)).astype(np.float32),
            )
        )
    return records


def _write(root: Path, records: Sequence[RegionRecord], **kwargs: object) -> None:
    with FeatureStoreWriter(root, **kwargs) as writer:  # type: ignore[arg-type]
        for record in records:
            writer.add(record)


def _assert_read_back(
    items: dict[int, dict[str, object]],
    records: Sequence[RegionRecord],
    ids: Sequence[int],
    stored: str = "float32",
) -> None:
    """Every record came back under its converted id, with its sizes, boxes and (stored) features."""
    assert sorted(items) == sorted(ids)
    for record, number in zip(records, ids, strict=True):
        item = items[number]
        assert (item["image_w"], item["image_h"], item["num_boxes"]) == (
            record.image_w,
            record.image_h,
            record.num_boxes,
        )
        np.testing.assert_array_equal(item["boxes"], record.boxes)
        np.testing.assert_array_equal(item["features"], record.features.astype(stored).astype(np.float32))


# ------------------------------------------------------------------------------------------- export ids


def test_the_original_reader_fails_on_path_ids_and_reads_converted_ones(tmp_path: Path) -> None:
    names = [
        "val2014/COCO_val2014_000000391895.jpg",
        "val2014/COCO_val2014_000000000042.jpg",
        "train2017/000000000139.jpg",  # 2017 names are the bare zero-padded id
        "COCO_test2015_000000000001.png",
    ]
    records = _records(names)
    _write(tmp_path / "store", records, feature_dtype="float16")
    kept = tmp_path / "keep.tsv"
    export_tsv(tmp_path / "store", kept, progress=False)
    with pytest.raises(ValueError, match="invalid literal for int"):
        read_tsv_like_bottom_up_attention(kept)

    coco = tmp_path / "coco.tsv"
    assert export_tsv(tmp_path / "store", coco, ids="coco", progress=False) == 4
    _assert_read_back(read_tsv_like_bottom_up_attention(coco), records, [391895, 42, 139, 1], "float16")


def test_flickr_ids_and_our_reader_keeps_the_converted_ids(tmp_path: Path) -> None:
    names = ["flickr30k-images/1000092795.jpg", "36979.jpg", "flickr30k-images/667626.jpg"]
    records = _records(names)
    _write(tmp_path / "store", records, feature_dtype="float32")
    path = tmp_path / "f30k.tsv"
    export_tsv(tmp_path / "store", path, ids="flickr", progress=False)
    _assert_read_back(read_tsv_like_bottom_up_attention(path), records, [1000092795, 36979, 667626])
    assert [r.image_id for r in read_tsv(path)] == ["1000092795", "36979", "667626"]


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_mapping_file_ids(tmp_path: Path, suffix: str) -> None:
    names = ["a/x.jpg", "b/y.jpg", "c,d/z.jpg"]
    records = _records(names)
    _write(tmp_path / "store", records, feature_dtype="float32")
    sep = "," if suffix == ".csv" else "\t"
    id_map = tmp_path / f"ids{suffix}"
    with id_map.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=sep, lineterminator="\n")
        writer.writerows(
            [["image_id", "int"], [names[0], 10], [], [names[1], 11], [names[2], 12], ["unused.jpg", 13]]
        )
    path = tmp_path / "mapped.tsv"
    export_tsv(tmp_path / "store", path, ids="mapping", id_map=id_map, progress=False)
    _assert_read_back(read_tsv_like_bottom_up_attention(path), records, [10, 11, 12])
    assert read_id_map(id_map) == {names[0]: 10, names[1]: 11, names[2]: 12, "unused.jpg": 13}


def test_id_rule_errors_name_the_ids(tmp_path: Path) -> None:
    with pytest.raises(
        TsvError, match=r"--ids coco: 1 of 2 image ids cannot be converted .*\n  '1000092795\.jpg'"
    ):
        convert_ids(["COCO_val2014_000000391895.jpg", "1000092795.jpg"], "coco")  # Flickr names are no COCO
    with pytest.raises(TsvError, match=r"--ids flickr: 1 of 2 .*\n  'img_3\.jpg'"):
        convert_ids(["12.jpg", "img_3.jpg"], "flickr")
    with pytest.raises(TsvError, match=r"'a/12\.jpg' and 'b/12\.jpg' -> 12"):
        convert_ids(["a/12.jpg", "b/12.jpg"], "flickr")  # a dict keyed by int would silently lose one
    with pytest.raises(TsvError, match=r"'y' -> 5"):
        convert_ids(["x", "y"], "mapping", {"x": 5, "y": 5})
    many = [f"img_{i}.jpg" for i in range(25)]
    with pytest.raises(TsvError, match=r"\.\.\. and 5 more"):
        convert_ids(many, "flickr")
    assert convert_ids(["a b/c.jpg"], "keep") == ["a b/c.jpg"]

    bad = tmp_path / "map.tsv"
    bad.write_text("a.jpg\t1\nb.jpg\tseven\n")
    with pytest.raises(TsvError, match=r"map\.tsv:2: 'seven' is not a non-negative integer id"):
        read_id_map(bad)
    bad.write_text("a.jpg\t1\textra\n")
    with pytest.raises(TsvError, match=r"map\.tsv:1: expected 2 tab-separated fields"):
        read_id_map(bad)
    bad.write_text("a.jpg\t1\na.jpg\t2\n")
    with pytest.raises(TsvError, match=r"map\.tsv:2: image_id 'a\.jpg' maps to 2 here but to 1 on line 1"):
        read_id_map(bad)
    with pytest.raises(TsvError, match="id map file not found"):
        read_id_map(tmp_path / "absent.tsv")


# ------------------------------------------------------------------------------------------- non-finite


def test_read_tsv_refuses_non_finite_values(tmp_path: Path) -> None:
    records = _records(["1.jpg", "2.jpg"])
    records[1].features[1, 0] = -np.inf
    _write(tmp_path / "store", records, feature_dtype="float32")
    path = tmp_path / "dump.tsv"
    export_tsv(tmp_path / "store", path, progress=False)  # a dump as other tools may have written it
    with pytest.raises(
        TsvError, match=r"dump\.tsv:2: image '2\.jpg' holds non-finite values \(features: 0 NaN, 1 inf\)"
    ):
        list(read_tsv(path))


@dataclass
class Regions:
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray | None = None
    object_conf: np.ndarray | None = None
    attribute_ids: np.ndarray | None = None
    attribute_conf: np.ndarray | None = None


def _regions(**changes: np.ndarray) -> Regions:
    values = {
        "boxes": np.array([[0, 0, 10, 10], [1, 2, 3, 4]], dtype=np.float64),
        "features": np.ones((2, 4), dtype=np.float32),
        "object_ids": np.array([1, 2]),
        "object_conf": np.array([0.5, 0.25]),
    }
    values.update(changes)
    return Regions(**values)  # type: ignore[arg-type]


def test_to_record_refuses_non_finite_detector_output() -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    record = to_record("ok.jpg", image, _regions(), "float16")
    assert record.features.dtype == np.float16 and (record.image_w, record.image_h) == (30, 20)

    nan_features = np.ones((2, 4), dtype=np.float32)
    nan_features[0, 1] = np.nan
    with pytest.raises(
        NonFiniteRegionsError, match=r"a\.jpg: detector output is not finite \(features: 1 NaN, 0 inf\)"
    ):
        to_record("a.jpg", image, _regions(features=nan_features), "float32")
    with pytest.raises(NonFiniteRegionsError, match=r"boxes: 0 NaN, 1 inf"):
        to_record("b.jpg", image, _regions(boxes=np.array([[0, 0, np.inf, 1], [0, 0, 1, 1]])), "float32")
    with pytest.raises(NonFiniteRegionsError, match=r"object_conf: 1 NaN, 0 inf"):
        to_record("c.jpg", image, _regions(object_conf=np.array([np.nan, 0.1])), "float32")
    with pytest.raises(NonFiniteRegionsError, match=r"attribute_conf: 1 NaN"):
        to_record(
            "d.jpg",
            image,
            _regions(attribute_ids=np.array([0, 1]), attribute_conf=np.array([0.2, np.nan])),
            "float32",
        )
    big = np.full((2, 4), 1e5, dtype=np.float32)
    assert to_record("e.jpg", image, _regions(features=big), "float32").features.max() == 1e5
    with pytest.raises(
        NonFiniteRegionsError, match=r"features: 0 NaN, 8 inf \(finite values up to 100000 overflow float16\)"
    ):
        to_record("e.jpg", image, _regions(features=big), "float16")


class NanDetector:
    """Returns NaN features for images whose name-derived brightness is high; finite output otherwise."""

    def to(self, device: object) -> NanDetector:
        return self

    def detect(self, images_bgr: Sequence[np.ndarray], *, precision: str) -> list[Regions]:
        out = []
        for image in images_bgr:
            features = np.ones((2, 4), dtype=np.float32)
            if image.mean() > 128:
                features[1, 1] = np.nan
            out.append(_regions(features=features))
        return out

    def image_size_problem(self, height: int, width: int) -> str | None:
        return None


def test_extraction_records_non_finite_output_as_a_failed_image(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.extraction import ERRORS_FILE, extract_images
    from pipeline.params import ExtractParams

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 40, 3), 10, dtype=np.uint8)).save(images / "dark.png")
    Image.fromarray(np.full((40, 40, 3), 250, dtype=np.uint8)).save(images / "bright.png")
    settings = ExtractParams(batch_size=2, num_workers=0, feature_dtype="float32", device="cpu")
    summary = extract_images(NanDetector(), images, tmp_path / "out", settings, metadata={"extractor": "nan"})
    assert (summary.done, summary.failed) == (1, 1)
    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert [(e["image_id"], e["error_type"], e["exception"]) for e in errors] == [
        ("bright.png", "detector_failed", "NonFiniteRegionsError")
    ]
    assert "features: 1 NaN" in errors[0]["reason"]
    assert FeatureStore(tmp_path / "out").image_ids == ["dark.png"]


# ------------------------------------------------------------------------------- the official precomp files


@pytest.fixture
def official_test_split(tmp_path: Path) -> Path:
    if not OFFICIAL_PRECOMP.is_dir():
        pytest.skip(f"official SCAN fixtures not found at {OFFICIAL_PRECOMP}")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(OFFICIAL_PRECOMP / name, data / name)
    return data


@pytest.mark.parametrize("rows_per_caption", [False, True])
def test_official_precomp_files_round_trip_to_the_original_reader(
    official_test_split: Path, tmp_path: Path, rows_per_caption: bool
) -> None:
    """The fixture's test split (10 images x 7 regions x 32), in the layout the official loader reads, with
    an ids file: imported exactly (float32), captions beside the store, exported with integer ids."""
    data = official_test_split
    per_image = np.load(data / "test_ims.npy")
    captions = [line.strip() for line in (data / "test_caps.txt").read_text(encoding="utf-8").splitlines()]
    num_images = per_image.shape[0]
    coco_ids = [100000 + 17 * i for i in range(num_images)]
    if (
        rows_per_caption
    ):  # the hidden copy's layout: each image's row repeated 5 times, one id per caption row
        np.save(data / "test_ims.npy", np.repeat(per_image, 5, axis=0))
        lines = [str(i) for i in coco_ids for _ in range(5)]
    else:
        lines = [str(i) for i in coco_ids]
    (data / "test_ids.txt").write_text("\n".join(lines) + "\n")

    result = import_precomp(data, "test", tmp_path / "store", progress=False)
    assert (result.num_images, result.regions, result.feature_dim) == (num_images, 7, 32)
    assert result.rows_per_caption is rows_per_caption and result.image_ids_source == "test_ids.txt"
    store = FeatureStore(tmp_path / "store")
    assert store.image_ids == [str(i) for i in coco_ids] and store.feature_dtype == "float32"
    assert sorted(p.name for p in (tmp_path / "store").glob("*.parquet")) == sorted(
        p.name for p in store.parts
    )
    for index, record in enumerate(store.iter_records()):
        np.testing.assert_array_equal(record.features, per_image[index])  # bit-exact, as the loader reads it
    from pipeline.captions import read_captions

    table = read_captions(tmp_path / "store.captions.parquet", captions_per_image=5)
    assert table.captions == captions and table.unique_image_ids == store.image_ids

    out = tmp_path / "test.tsv"
    export_tsv(store, out, progress=False)  # the ids are integers already: keep works for the original reader
    items = read_tsv_like_bottom_up_attention(out)
    assert sorted(items) == coco_ids
    for index, number in enumerate(coco_ids):
        np.testing.assert_array_equal(items[number]["features"], per_image[index])
        assert items[number]["num_boxes"] == 7 and not np.asarray(items[number]["boxes"]).any()


def test_official_precomp_without_ids_gets_synthetic_ids_and_float16_reports_its_error(
    official_test_split: Path, tmp_path: Path
) -> None:
    per_image = np.load(official_test_split / "test_ims.npy")
    result = import_precomp(
        official_test_split, "test", tmp_path / "half", feature_dtype="float16", progress=False
    )
    assert result.image_ids_source == "synthetic"
    assert FeatureStore(tmp_path / "half").image_ids[:2] == ["test/000000", "test/000001"]
    expected = float(np.abs(per_image.astype(np.float16).astype(np.float32) - per_image).max())
    assert result.float16_max_abs_error == pytest.approx(expected) and expected > 0
