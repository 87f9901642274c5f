"""Karpathy split files (Flickr30K, COCO, the embedded sample) to per-split caption lists and an image list.

The Karpathy JSONs (`dataset_flickr30k.json`, `dataset_coco.json`) are what SCAN's data was cut from: image
order within a split is file order, captions are the `raw` sentences, and COCO's 30,504 "restval" images join
the training split. COCO images with more than five captions were cut to five, as SCAN's data was; an image
with fewer captions than asked for is an error, because the `caption j -> image j // 5` layout would shift.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import atomic_output
from pipeline.captions import write_captions
from pipeline.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")
KNOWN_DATASETS: tuple[str, ...] = ("sample", "flickr30k", "coco")


class DatasetError(UserError):
    """A dataset description or its images folder is unusable; the message names the file, image or key."""


@dataclass(frozen=True)
class DatasetImage:
    """One image of a split: its id (path relative to the images root, POSIX) and its captions."""

    image_id: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class PreparedDataset:
    """Images per split, in Karpathy file order, each with exactly `captions_per_image` captions."""

    name: str
    splits: dict[str, list[DatasetImage]]
    captions_per_image: int
    truncated_images: int  # images that had more captions than kept (COCO has a few with 6 or 7)
    dropped_restval: int  # restval images left out because restval_to_train was off

    def all_image_ids(self) -> list[str]:
        """Sorted relative paths of every image of every split (the list `extract` runs over)."""
        return sorted({image.image_id for images in self.splits.values() for image in images})


def _image_id(entry: dict, index: int, source: Path) -> str:
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise DatasetError(f"{source}: images[{index}] has no 'filename' string")
    filepath = entry.get("filepath") or ""
    if not isinstance(filepath, str):
        raise DatasetError(f"{source}: images[{index}] ({filename}): 'filepath' must be a string")
    image_id = posixpath.normpath(posixpath.join(filepath.replace("\\", "/"), filename.replace("\\", "/")))
    if image_id.startswith("/") or image_id == ".." or image_id.startswith("../"):
        raise DatasetError(f"{source}: images[{index}]: path {image_id!r} leaves the images folder")
    return image_id


def _captions(entry: dict, image_id: str, source: Path) -> list[str]:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        raise DatasetError(f"{source}: image {image_id}: 'sentences' must be a list")
    captions = []
    for number, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            raise DatasetError(f"{source}: image {image_id}: sentences[{number}] has no 'raw' string")
        text = " ".join(raw.split())
        if not text:
            raise DatasetError(f"{source}: image {image_id}: sentences[{number}] is empty")
        captions.append(text)
    return captions


def read_karpathy_json(path: str | Path) -> dict:
    """Load a Karpathy split file, checking the top-level shape."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset JSON not found")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (Karpathy split format)")
    return document


def prepare_karpathy(
    path: str | Path,
    *,
    dataset: str,
    captions_per_image: int = 5,
    restval_to_train: bool = True,
) -> PreparedDataset:
    """Group a Karpathy split file into train/val/test, exactly `captions_per_image` captions per image."""
    path = Path(path)
    if dataset not in KNOWN_DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(KNOWN_DATASETS)}")
    if captions_per_image < 1:
        raise DatasetError(f"captions_per_image must be at least 1, got {captions_per_image}")
    document = read_karpathy_json(path)
    declared = document.get("dataset")
    if isinstance(declared, str) and declared != dataset:
        raise DatasetError(
            f"{path}: the file describes dataset {declared!r} but prepare.dataset is {dataset!r}; "
            "set prepare.dataset in params.yaml to match"
        )
    splits: dict[str, list[DatasetImage]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    truncated = 0
    dropped_restval = 0
    for index, entry in enumerate(document["images"]):
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: images[{index}] is not an object")
        image_id = _image_id(entry, index, path)
        split = entry.get("split")
        if split == "restval":
            if not restval_to_train:
                dropped_restval += 1
                continue
            split = "train"
        if split not in splits:
            raise DatasetError(
                f"{path}: image {image_id}: unknown split {split!r} (expected train, val, test or restval)"
            )
        if image_id in seen:
            raise DatasetError(f"{path}: image {image_id} is listed twice")
        seen.add(image_id)
        captions = _captions(entry, image_id, path)
        if len(captions) < captions_per_image:
            raise DatasetError(
                f"{path}: image {image_id} has {len(captions)} captions, fewer than "
                f"prepare.captions_per_image = {captions_per_image}"
            )
        if len(captions) > captions_per_image:
            truncated += 1
        splits[split].append(DatasetImage(image_id=image_id, captions=tuple(captions[:captions_per_image])))
    for split, images in splits.items():
        if not images:
            raise DatasetError(f"{path}: split {split!r} has no images")
    return PreparedDataset(
        name=dataset,
        splits=splits,
        captions_per_image=captions_per_image,
        truncated_images=truncated,
        dropped_restval=dropped_restval,
    )


def find_missing_images(images_root: str | Path, image_ids: Sequence[str]) -> list[str]:
    """Image ids with no file under `images_root` (in the order given)."""
    root = Path(images_root)
    return [image_id for image_id in image_ids if not (root / image_id).is_file()]


def check_images_present(images_root: str | Path, image_ids: Sequence[str], *, show: int = 5) -> None:
    """Raise a DatasetError naming the first few missing images, with the total count."""
    root = Path(images_root)
    if not root.is_dir():
        raise DatasetError(f"{root}: images folder not found")
    missing = find_missing_images(root, image_ids)
    if missing:
        listed = ", ".join(missing[:show])
        more = f" (and {len(missing) - show} more)" if len(missing) > show else ""
        raise DatasetError(f"{root}: {len(missing)} of {len(image_ids)} images are missing: {listed}{more}")


def write_prepared(prepared: PreparedDataset, out_dir: str | Path) -> dict[str, Path]:
    """Write `OUT/{split}/captions.parquet` per split and `OUT/images.txt`; returns the written paths."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for split, images in prepared.splits.items():
        image_ids = [image.image_id for image in images for _ in image.captions]
        captions = [caption for image in images for caption in image.captions]
        path = out_dir / split / "captions.parquet"
        write_captions(path, image_ids, captions, captions_per_image=prepared.captions_per_image)
        written[split] = path
    images_txt = out_dir / "images.txt"
    with atomic_output(images_txt) as tmp_path:
        tmp_path.write_text(
            "".join(f"{image_id}\n" for image_id in prepared.all_image_ids()), encoding="utf-8"
        )
    written["images"] = images_txt
    return written
