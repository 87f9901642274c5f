"""What an extraction run takes as input: every file name accounted for (names that cannot be stored and
symlinks leading out of the images root become error records, the run goes on), ids kept byte-for-byte
(no Unicode normalisation, no `\\` rewriting), and bounded time per image (a stalled decode becomes a
"timeout" record)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.extraction.decode as decode_module
import pipeline.extraction.run as run_module
from pipeline.extraction import ERRORS_FILE, ExtractError, extract_images
from pipeline.extraction.decode import ImageFileDataset, ImageItem
from pipeline.extraction.plan import plan_image_ids
from pipeline.image_files import check_listed, list_images, name_problem, printable_id, scan_images
from pipeline.params import ExtractParams
from pipeline.store import FeatureStore

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SETTINGS = ExtractParams(batch_size=2, num_workers=0, feature_dtype="float32", rows_per_part=2)


def _jpeg(seed: int, height: int = 40, width: int = 50) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _write(path: str | bytes | Path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)


@dataclass
class SizeRegions:
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray
    attribute_ids: np.ndarray | None = None
    attribute_conf: np.ndarray | None = None


class SizeDetector:
    """One region per image: the whole image, its mean colour as the feature."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> SizeDetector:
        return self

    def detect(self, images_bgr: Sequence[np.ndarray], *, precision: str) -> list[SizeRegions]:
        return [
            SizeRegions(
                boxes=np.array([[0, 0, image.shape[1] - 1, image.shape[0] - 1]], dtype=np.float32),
                features=image.reshape(-1, 3).mean(axis=0, keepdims=True).astype(np.float32),
                object_ids=np.array([1], dtype=np.int32),
                object_conf=np.array([1.0], dtype=np.float32),
            )
            for image in images_bgr
        ]

    def image_size_problem(self, height: int, width: int) -> str | None:
        return None


def _extract(images: Path, out: Path, **changes: object) -> tuple[object, dict[str, dict[str, str]]]:
    list_file = changes.pop("list_file", None)
    settings = SETTINGS.model_copy(update=changes)
    summary = extract_images(
        SizeDetector(), images, out, settings, metadata={"extractor": "size"}, list_file=list_file
    )
    lines = (out / ERRORS_FILE).read_bytes().decode("utf-8").splitlines()  # errors file: valid UTF-8
    return summary, {e["image_id"]: e for e in map(json.loads, lines)}


# --------------------------------------------------------------------------------------------- names


def test_names_that_cannot_be_stored_become_records_and_the_run_goes_on(tmp_path: Path) -> None:
    images = tmp_path / "images"
    root = os.fsencode(images)
    _write(root + b"/good.jpg", _jpeg(0))
    _write(root + b"/z_last.jpg", _jpeg(1))
    _write(root + b"/bad\xff\xfename.jpg", _jpeg(2))  # not UTF-8: os.walk gave a surrogate-escaped id
    _write(root + b"/dir\xe9/inside.jpg", _jpeg(3))  # Latin-1 folder name
    _write(root + b"/new\nline.jpg", _jpeg(4))  # valid UTF-8, but no line-based list could name it
    out = tmp_path / "out"
    summary, errors = _extract(images, out)
    assert (summary.total, summary.done, summary.failed) == (5, 2, 3)
    assert sorted(FeatureStore(out).image_ids) == ["good.jpg", "z_last.jpg"]
    assert {image_id: e["error_type"] for image_id, e in errors.items()} == {
        "bad\\xff\\xfename.jpg": "invalid_name",
        "dir\\xe9/inside.jpg": "invalid_name",
        "new\\nline.jpg": "invalid_name",
    }
    assert "not valid UTF-8" in errors["bad\\xff\\xfename.jpg"]["reason"]
    assert "control characters" in errors["new\\nline.jpg"]["reason"]
    # A rerun meets them again (never stored), and does not die on them either.
    again, errors_again = _extract(images, out)
    assert (again.done, again.skipped, again.failed) == (0, 2, 3) and errors_again == errors


def test_printable_id_escapes_what_cannot_be_stored() -> None:
    name = os.fsdecode(b"a\xff/b\x1b\tc.jpg")
    assert printable_id(name) == "a\\xff/b\\x1b\\tc.jpg"
    assert printable_id("déjà/图像 ñ.jpg") == "déjà/图像 ñ.jpg"
    assert name_problem("déjà/图像 ñ.jpg") is None and name_problem(name) is not None


def test_only_refused_files_is_not_an_empty_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _write(os.fsencode(images) + b"/\xff.jpg", _jpeg(0))
    listing = plan_image_ids(images, None)
    assert listing.image_ids == [] and [r.image_id for r in listing.refused] == ["\\xff.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractError, match=r"no \.jpg/\.jpeg/\.png images found"):
        plan_image_ids(tmp_path / "empty", None)


# ------------------------------------------------------------------------------------------ symlinks


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """images/ with a file, a symlink to it, symlinks to a file and a folder outside, and a loop."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    _write(images / "good.jpg", _jpeg(0))
    _write(images / "sub" / "deep.jpg", _jpeg(1))
    _write(outside / "secret.jpg", b"not an image, and not to be echoed anywhere")
    _write(outside / "folder" / "photo.jpg", _jpeg(2))
    (images / "alias.jpg").symlink_to(images / "good.jpg")  # inside the root: followed
    (images / "linked_sub").symlink_to(images / "sub", target_is_directory=True)  # inside: followed
    (images / "escape.jpg").symlink_to(outside / "secret.jpg")
    (images / "escape_dir").symlink_to(outside / "folder", target_is_directory=True)
    (images / "sub" / "loop").symlink_to(images, target_is_directory=True)
    (images / "dangling.jpg").symlink_to(tmp_path / "images" / "gone.jpg")  # inside, missing: not found
    return images


def test_symlinks_outside_the_root_are_refused(linked: Path) -> None:
    listing = scan_images(linked)
    assert listing.image_ids == [
        "alias.jpg",
        "dangling.jpg",
        "good.jpg",
        "linked_sub/deep.jpg",
        "sub/deep.jpg",
    ]
    refused = {r.image_id: r for r in listing.refused}
    assert {image_id: r.kind for image_id, r in refused.items()} == {
        "escape.jpg": "symlink_outside_root",
        "escape_dir": "symlink_outside_root",
        "linked_sub/loop": "symlink_loop",
        "sub/loop": "symlink_loop",
    }
    assert refused["escape.jpg"].reason.startswith("symlink outside images root")
    # Followed on request; a loop is still a loop.
    followed = scan_images(linked, follow_symlinks=True)
    assert "escape.jpg" in followed.image_ids and "escape_dir/photo.jpg" in followed.image_ids
    assert [r.kind for r in followed.refused] == ["symlink_loop", "symlink_loop"]


def test_listed_paths_through_symlinks_out_of_the_root_are_refused(linked: Path) -> None:
    listed = ["good.jpg", "escape_dir/photo.jpg", "linked_sub/deep.jpg", "missing.jpg"]
    listing = check_listed(linked, listed)
    assert listing.image_ids == ["good.jpg", "linked_sub/deep.jpg", "missing.jpg"]
    assert [(r.image_id, r.kind) for r in listing.refused] == [
        ("escape_dir/photo.jpg", "symlink_outside_root")
    ]
    assert check_listed(linked, listed, follow_symlinks=True).image_ids == listed


def test_symlink_records_in_a_run_and_no_file_bytes_in_errors(linked: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary, errors = _extract(linked, out)
    assert sorted(FeatureStore(out).image_ids) == [
        "alias.jpg",
        "good.jpg",
        "linked_sub/deep.jpg",
        "sub/deep.jpg",
    ]
    assert {i: e["error_type"] for i, e in errors.items()} == {
        "dangling.jpg": "not_found",
        "escape.jpg": "symlink_outside_root",
        "escape_dir": "symlink_outside_root",
        "linked_sub/loop": "symlink_loop",
        "sub/loop": "symlink_loop",
    }
    assert summary.failed == 5
    # Followed, the outside non-image is read; its error describes it, never quotes it.
    summary, errors = _extract(linked, tmp_path / "followed", follow_symlinks=True)
    assert errors["escape.jpg"]["error_type"] == "not_image"
    assert "looks like text" in errors["escape.jpg"]["reason"]
    text = (tmp_path / "followed" / ERRORS_FILE).read_text()
    assert "echoed" not in text and b"not an".hex() not in text and "6e 6f 74" not in text


# --------------------------------------------------------------------------- list entries, Unicode


def test_ids_are_kept_byte_for_byte_not_normalised(tmp_path: Path) -> None:
    images = tmp_path / "images"
    nfd = unicodedata.normalize("NFD", "café.jpg")
    nfc = unicodedata.normalize("NFC", "café.jpg")
    assert nfd != nfc
    _write(images / nfd, _jpeg(0))
    _write(images / "sub\\c.jpg", _jpeg(1))  # a backslash is part of a POSIX file name
    assert list_images(images) == sorted([nfd, "sub\\c.jpg"])

    list_file = tmp_path / "list.txt"
    list_file.write_text(f"sub\\c.jpg\n{nfc}\n{nfd}\n", encoding="utf-8")
    out = tmp_path / "out"
    summary, errors = _extract(images, out, list_file=list_file)
    assert sorted(FeatureStore(out).image_ids) == sorted([nfd, "sub\\c.jpg"])
    assert list(errors) == [nfc]
    assert errors[nfc]["error_type"] == "not_found"
    reason = errors[nfc]["reason"]
    assert "NFD" in reason and "not normalised" in reason
    assert (summary.total, summary.done, summary.failed) == (3, 2, 1)


# -------------------------------------------------------------------------------------------- time


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of the test: lets an abandoned decode thread finish."""
    event = threading.Event()
    yield event
    event.set()


def test_a_stalled_decode_is_a_timeout_record_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> None:
    images = tmp_path / "images"
    for index, name in enumerate(["a.jpg", "b_stall.jpg", "c.jpg", "d.jpg"]):
        _write(images / name, _jpeg(index))
    original = decode_module.load_image

    def stalling_load(path: Path, **kwargs: object) -> object:
        if "stall" in Path(path).name:
            release.wait(120)  # a decode that never ends (for the test: until it is over)
        return original(path, **kwargs)

    monkeypatch.setattr(decode_module, "load_image", stalling_load)
    out = tmp_path / "out"
    started = time.monotonic()
    summary, errors = _extract(images, out, decode_timeout_s=0.5)
    assert time.monotonic() - started < 60
    assert (summary.done, summary.failed) == (3, 1)
    assert sorted(FeatureStore(out).image_ids) == ["a.jpg", "c.jpg", "d.jpg"]
    record = errors["b_stall.jpg"]
    assert record["error_type"] == "timeout" and record["reason"].startswith("timeout")
    assert "decode_timeout_s" in record["reason"]


class StallingDataset(ImageFileDataset):
    """Decodes like ImageFileDataset, but never finishes an image whose name holds "stall". Module level, so
    that loader workers (forkserver) import it."""

    def __getitem__(self, index: int) -> ImageItem:
        if "stall" in self.image_ids[index]:
            time.sleep(600)
        return super().__getitem__(index)


@pytest.mark.slow
def test_a_stalled_decode_in_a_worker_is_killed_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    names = ["a.jpg", "b_stall.jpg", "c.jpg", "d_stall.jpg", "e.jpg", "f.jpg"]
    for index, name in enumerate(names):
        _write(images / name, _jpeg(index))
    monkeypatch.setattr(run_module, "ImageFileDataset", StallingDataset)
    out = tmp_path / "out"
    started = time.monotonic()
    summary, errors = _extract(images, out, decode_timeout_s=3.0, num_workers=2, batch_size=1)
    assert time.monotonic() - started < 120
    assert sorted(FeatureStore(out).image_ids) == ["a.jpg", "c.jpg", "e.jpg", "f.jpg"]
    assert {i: e["error_type"] for i, e in errors.items()} == {
        "b_stall.jpg": "timeout",
        "d_stall.jpg": "timeout",
    }
    assert "worker was stopped" in errors["b_stall.jpg"]["reason"]
    assert (summary.done, summary.failed) == (4, 2)
