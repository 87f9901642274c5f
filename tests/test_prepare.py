"""`prepare`: Karpathy split files (Flickr30K, COCO with restval, sample) to captions tables + image list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.captions import read_captions
from pipeline.sample import generate_sample
from pipeline.splits import DatasetError, check_images_present, prepare_karpathy, write_prepared
from stages.cli import app


def _sentences(count: int, stem: str) -> list[dict]:
    return [{"raw": f"{stem} caption number {k} .", "tokens": [stem, "caption"]} for k in range(count)]


def _coco_like(tmp_path: Path) -> tuple[Path, Path]:
    """Four COCO-style entries (filepath + filename): train, restval (7 captions), val, test."""
    entries = [
        {"filepath": "train2014", "filename": "t1.jpg", "split": "train", "sentences": _sentences(5, "t1")},
        {"filepath": "val2014", "filename": "r1.jpg", "split": "restval", "sentences": _sentences(7, "r1")},
        {"filepath": "val2014", "filename": "v1.jpg", "split": "val", "sentences": _sentences(6, "v1")},
        {"filepath": "val2014", "filename": "e1.jpg", "split": "test", "sentences": _sentences(5, "e1")},
    ]
    dataset_json = tmp_path / "dataset_coco.json"
    dataset_json.write_text(json.dumps({"dataset": "coco", "images": entries}))
    images = tmp_path / "images"
    for entry in entries:
        (images / entry["filepath"]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(images / entry["filepath"] / entry["filename"])
    return dataset_json, images


def test_coco_restval_goes_to_train_and_extra_captions_are_cut(tmp_path: Path) -> None:
    dataset_json, _ = _coco_like(tmp_path)
    prepared = prepare_karpathy(dataset_json, dataset="coco", captions_per_image=5, restval_to_train=True)
    assert [image.image_id for image in prepared.splits["train"]] == ["train2014/t1.jpg", "val2014/r1.jpg"]
    assert [image.image_id for image in prepared.splits["val"]] == ["val2014/v1.jpg"]
    assert all(len(image.captions) == 5 for images in prepared.splits.values() for image in images)
    restval = prepared.splits["train"][1]
    assert restval.captions == tuple(f"r1 caption number {k} ." for k in range(5))  # the first five are kept
    assert prepared.truncated_images == 2
    assert prepared.all_image_ids() == sorted(
        ["train2014/t1.jpg", "val2014/r1.jpg", "val2014/v1.jpg", "val2014/e1.jpg"]
    )


def test_coco_restval_can_be_left_out(tmp_path: Path) -> None:
    dataset_json, _ = _coco_like(tmp_path)
    prepared = prepare_karpathy(dataset_json, dataset="coco", restval_to_train=False)
    assert [image.image_id for image in prepared.splits["train"]] == ["train2014/t1.jpg"]
    assert prepared.dropped_restval == 1
    assert "val2014/r1.jpg" not in prepared.all_image_ids()


def test_flickr_style_entries_use_the_filename(tmp_path: Path) -> None:
    entries = [
        {"filename": f"{k}.jpg", "split": split, "sentences": _sentences(5, str(k))}
        for k, split in enumerate(["train", "train", "val", "test"])
    ]
    dataset_json = tmp_path / "dataset_flickr30k.json"
    dataset_json.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    prepared = prepare_karpathy(dataset_json, dataset="flickr30k")
    assert [image.image_id for image in prepared.splits["train"]] == ["0.jpg", "1.jpg"]
    assert [image.image_id for image in prepared.splits["test"]] == ["3.jpg"]


def test_too_few_captions_names_the_image(tmp_path: Path) -> None:
    entries = [
        {"filename": "ok.jpg", "split": "train", "sentences": _sentences(5, "ok")},
        {"filename": "short.jpg", "split": "val", "sentences": _sentences(4, "short")},
        {"filename": "t.jpg", "split": "test", "sentences": _sentences(5, "t")},
    ]
    dataset_json = tmp_path / "d.json"
    dataset_json.write_text(json.dumps({"images": entries}))
    with pytest.raises(DatasetError, match=r"short\.jpg has 4 captions"):
        prepare_karpathy(dataset_json, dataset="flickr30k")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"dataset": "coco", "images": []}), "describes dataset 'coco'"),
        (
            json.dumps({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}),
            "unknown split 'dev'",
        ),
        (json.dumps({"images": [{"split": "train", "sentences": []}]}), r"images\[0\] has no 'filename'"),
        (
            json.dumps({"images": [{"filename": "../x.jpg", "split": "train", "sentences": []}]}),
            "leaves the images",
        ),
        (json.dumps({"photos": []}), "'images' list"),
    ],
)
def test_malformed_dataset_json_is_a_clear_error(tmp_path: Path, document: str, message: str) -> None:
    dataset_json = tmp_path / "d.json"
    dataset_json.write_text(document)
    with pytest.raises(DatasetError, match=message) as info:
        prepare_karpathy(dataset_json, dataset="flickr30k")
    assert str(dataset_json) in str(info.value)


def test_missing_images_are_listed(tmp_path: Path) -> None:
    (tmp_path / "present.jpg").write_bytes(b"x")
    ids = ["present.jpg"] + [f"gone_{k}.jpg" for k in range(8)]
    with pytest.raises(
        DatasetError, match=r"8 of 9 images are missing: gone_0\.jpg, .*gone_4\.jpg \(and 3 more\)"
    ):
        check_images_present(tmp_path, ids)
    with pytest.raises(DatasetError, match="images folder not found"):
        check_images_present(tmp_path / "nowhere", ids)


def test_sample_prepares_like_flickr(tmp_path: Path) -> None:
    generate_sample(
        tmp_path / "sample", seed=0, num_train=4, num_val=2, num_test=3, image_size=48, show_progress=False
    )
    document = json.loads((tmp_path / "sample" / "dataset.json").read_text())
    prepared = prepare_karpathy(tmp_path / "sample" / "dataset.json", dataset="sample")
    written = write_prepared(prepared, tmp_path / "prepared")
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        table = read_captions(written[split], captions_per_image=5)
        expected = [image for image in document["images"] if image["split"] == split]
        assert table.unique_image_ids == [image["filename"] for image in expected]
        assert table.captions == [sentence["raw"] for image in expected for sentence in image["sentences"]]
        assert table.num_images == count
    listed = (tmp_path / "prepared" / "images.txt").read_text().splitlines()
    assert listed == sorted(image["filename"] for image in document["images"])
    check_images_present(tmp_path / "sample" / "images", listed)


def test_prepare_command(tmp_path: Path) -> None:
    dataset_json, images = _coco_like(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"dataset": "coco", "coco_restval_to_train": True}}))
    out = tmp_path / "prepared"
    args = ["prepare", "--dataset-json", str(dataset_json), "--images", str(images), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert read_captions(out / "train" / "captions.parquet").num_images == 2
    assert (out / "images.txt").read_text().splitlines()[0] == "train2014/t1.jpg"

    (images / "val2014" / "e1.jpg").unlink()
    result = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 1
    assert "1 of 4 images are missing: val2014/e1.jpg" in result.output
    assert "Traceback" not in result.output


def test_prepare_command_rejects_wrong_dataset_name(tmp_path: Path) -> None:
    dataset_json, images = _coco_like(tmp_path)
    out = tmp_path / "prepared"
    args = ["prepare", "--dataset-json", str(dataset_json), "--images", str(images), "--out", str(out)]
    result = CliRunner().invoke(app, args)  # schema default: dataset "sample"
    assert result.exit_code == 1
    assert "prepare.dataset" in result.output
    assert not out.exists()


def test_tokenize_command_builds_the_vocabulary_from_train_and_val(tmp_path: Path) -> None:
    from pipeline.vocab import Vocabulary, tokenize_words

    generate_sample(
        tmp_path / "sample", seed=2, num_train=6, num_val=2, num_test=2, image_size=48, show_progress=False
    )
    prepared = prepare_karpathy(tmp_path / "sample" / "dataset.json", dataset="sample")
    written = write_prepared(prepared, tmp_path / "prepared")
    out = tmp_path / "vocab.json"
    args = [
        "tokenize",
        "--captions",
        str(written["train"]),
        "--captions",
        str(written["val"]),
        "--out",
        str(out),
    ]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tokenize": {"min_count": 3}}))
    result = CliRunner().invoke(app, [*args, "--params", str(params)])
    assert result.exit_code == 0, result.output
    vocabulary = Vocabulary.load(out)
    assert f"vocabulary: {len(vocabulary)} tokens" in result.output
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        for caption in read_captions(written[split]).captions:
            for word in tokenize_words(caption):
                counts[word] = counts.get(word, 0) + 1
    frequent = {word for word, count in counts.items() if count >= 3}
    rare = {word for word, count in counts.items() if count < 3}
    assert frequent and rare
    assert all(word in vocabulary for word in frequent)
    assert not any(word in vocabulary for word in rare)

    result = CliRunner().invoke(
        app, ["tokenize", "--captions", str(tmp_path / "nope.parquet"), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "nope.parquet" in result.output
