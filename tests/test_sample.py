"""The embedded sample generator: deterministic bytes, Karpathy format, captions that describe the images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.sample import COLOURS, SHAPES, caption_tokens, generate_sample
from stages.cli import app

SMALL = {"num_train": 6, "num_val": 2, "num_test": 2, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate_sample(tmp_path / "a", seed=7, show_progress=False, **SMALL)
    generate_sample(tmp_path / "b", seed=7, show_progress=False, **SMALL)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 11  # 10 JPEGs + dataset.json
    assert first == second


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    generate_sample(tmp_path / "a", seed=1, show_progress=False, **SMALL)
    generate_sample(tmp_path / "b", seed=2, show_progress=False, **SMALL)
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert len(differing) >= 9


def test_dataset_json_is_karpathy_format(tmp_path: Path) -> None:
    summary = generate_sample(tmp_path, seed=0, show_progress=False, **SMALL)
    document = json.loads(summary.dataset_json.read_text())
    assert document["dataset"] == "sample"
    images = document["images"]
    assert [image["split"] for image in images] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert [image["imgid"] for image in images] == list(range(10))
    sentence_ids = [sentence["sentid"] for image in images for sentence in image["sentences"]]
    assert sentence_ids == list(range(50))
    assert summary.num_captions == 50
    for image in images:
        assert (tmp_path / "images" / image["filepath"] / image["filename"]).is_file()
        raws = [sentence["raw"] for sentence in image["sentences"]]
        assert len(raws) == 5
        assert len(set(raws)) == 5, f"captions of {image['filename']} are not all different: {raws}"
        for sentence in image["sentences"]:
            assert sentence["tokens"] == caption_tokens(sentence["raw"])
            assert sentence["tokens"] and all(token.isalnum() for token in sentence["tokens"])
            assert sentence["imgid"] == image["imgid"]


def test_captions_name_the_drawn_colours_and_shapes(tmp_path: Path) -> None:
    generate_sample(tmp_path, seed=3, show_progress=False, num_train=20, num_val=1, num_test=1, image_size=96)
    document = json.loads((tmp_path / "dataset.json").read_text())
    for image in document["images"]:
        scene = image["scene"]
        raws = [sentence["raw"] for sentence in image["sentences"]]
        text = " ".join(raws)
        for obj in scene["objects"]:
            mentions = sum(obj["colour"] in raw for raw in raws)
            assert mentions >= 4, f"{image['filename']}: colour {obj['colour']} in only {mentions} captions"
            assert any(synonym in text for synonym in SHAPES[obj["shape"]])
        assert scene["background_colour"] in text
        # the number word of the count caption matches the number of objects drawn
        number_words = ("zero", "one", "two", "three")
        counts = [raw.split()[0] for raw in raws if raw.split()[0] in number_words]
        assert counts == [number_words[len(scene["objects"])]]


def test_images_show_the_described_colours(tmp_path: Path) -> None:
    generate_sample(tmp_path, seed=5, show_progress=False, num_train=12, num_val=1, num_test=1, image_size=96)
    document = json.loads((tmp_path / "dataset.json").read_text())
    for image in document["images"]:
        with Image.open(tmp_path / "images" / image["filename"]) as handle:
            assert handle.format == "JPEG"
            assert handle.size == (96, 96)
            pixels = np.asarray(handle.convert("RGB"), dtype=np.int32)
        for obj in image["scene"]["objects"]:
            x1, y1, x2, y2 = obj["box"]
            centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
            expected = np.asarray(COLOURS[obj["colour"]])
            assert np.abs(centre - expected).max() <= 40, (image["filename"], obj, centre.tolist())


def test_invalid_sizes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_val"):
        generate_sample(
            tmp_path, seed=0, num_train=1, num_val=0, num_test=1, image_size=64, show_progress=False
        )
    with pytest.raises(ValueError, match="max_objects"):
        generate_sample(
            tmp_path,
            seed=0,
            num_train=1,
            num_val=1,
            num_test=1,
            image_size=64,
            max_objects=4,
            show_progress=False,
        )


def test_sample_command_uses_params_section(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"sample": {"seed": 4, "num_train": 3, "num_val": 1, "num_test": 2, "image_size": 48}})
    )
    result = CliRunner().invoke(app, ["sample", "--out", str(tmp_path / "out"), "--params", str(params)])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [image["split"] for image in document["images"]] == ["train"] * 3 + ["val"] + ["test"] * 2
    assert document["seed"] == 4
    assert len(list((tmp_path / "out" / "images").glob("*.jpg"))) == 6


def test_sample_command_rejects_bad_params_before_writing(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sample": {"num_trian": 3}}))
    result = CliRunner().invoke(app, ["sample", "--out", str(tmp_path / "out"), "--params", str(params)])
    assert result.exit_code == 2
    assert "sample.num_trian" in result.output
    assert not (tmp_path / "out").exists()
