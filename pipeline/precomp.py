"""Import SCAN's precomputed features (`{split}_ims.npy` + `{split}_caps.txt`) into a feature store.

The original data: `{split}_ims.npy` holds (rows, 36, 2048) region features, `{split}_caps.txt` one caption
per line, `captions_per_image` (5) consecutive lines per image. Some splits store one image row per caption
(rows equal to the caption count, each image's row repeated 5 times); like the original (which divides the
caption index by 5 to find the image, and keeps every 5th row at evaluation) we keep rows 0, 5, 10, ...

The .npy is memory-mapped (`allow_pickle=False`) and copied chunk by chunk, so COCO's tens of GB never sit in
RAM. Output: a feature store in `out_dir` (image ids `{split}/{index:06d}`, zero boxes, image size 0, no class
ids) and `out_dir/captions.parquet`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.captions import write_captions
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.store import FeatureDtype, FeatureStoreWriter, RegionRecord, list_parts

CAPTIONS_FILE = "captions.parquet"


class PrecompError(UserError):
    """The precomputed files are missing or inconsistent; the message names the file."""


@dataclass(frozen=True)
class PrecompImport:
    """What an import wrote."""

    num_images: int
    num_captions: int
    regions: int
    feature_dim: int
    rows_per_caption: bool  # True when the .npy held one (repeated) row per caption
    store_dir: Path
    captions_path: Path


def precomp_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(`{split}_ims.npy`, `{split}_caps.txt`) inside `data_dir`."""
    data_dir = Path(data_dir)
    return data_dir / f"{split}_ims.npy", data_dir / f"{split}_caps.txt"


def read_caption_lines(path: Path) -> list[str]:
    """One caption per line, stripped, as the original reads them."""
    if not path.is_file():
        raise PrecompError(f"{path}: captions file not found")
    try:
        with path.open(encoding="utf-8") as handle:
            return [line.strip() for line in handle]
    except UnicodeDecodeError as exc:
        raise PrecompError(f"{path}: not UTF-8 text: {exc}") from exc


def open_features(path: Path) -> np.ndarray:
    """Memory-map the features array and check it is (rows, regions, D) floating point."""
    if not path.is_file():
        raise PrecompError(f"{path}: features file not found")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # pickled object arrays, or a damaged header
        raise PrecompError(f"{path}: not a plain numeric .npy array: {exc}") from exc
    except OSError as exc:
        raise PrecompError(f"{path}: cannot read as .npy: {exc}") from exc
    if not isinstance(features, np.ndarray):
        raise PrecompError(f"{path}: expected one .npy array, got {type(features).__name__}")
    if features.ndim != 3:
        raise PrecompError(
            f"{path}: expected a 3-D array (images, regions, feature_dim), got shape {features.shape}"
        )
    if min(features.shape) == 0:
        raise PrecompError(f"{path}: empty axis in shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise PrecompError(f"{path}: features must be floating point, got {features.dtype}")
    return features


def import_precomp(
    data_dir: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    feature_dtype: FeatureDtype = "float16",
    captions_per_image: int = 5,
    rows_per_part: int = 512,
    chunk_images: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> PrecompImport:
    """Convert one split of SCAN's precomputed data into a feature store plus `captions.parquet`."""
    if captions_per_image < 1:
        raise PrecompError(f"captions_per_image must be at least 1, got {captions_per_image}")
    ims_path, caps_path = precomp_paths(data_dir, split)
    features = open_features(ims_path)
    captions = read_caption_lines(caps_path)
    num_captions = len(captions)
    if num_captions == 0:
        raise PrecompError(f"{caps_path}: no captions")
    if num_captions % captions_per_image:
        raise PrecompError(
            f"{caps_path}: {num_captions} captions is not a multiple of "
            f"{captions_per_image} captions per image"
        )
    num_images = num_captions // captions_per_image
    rows = features.shape[0]
    if rows == num_images:
        row_step = 1
    elif rows == num_captions:
        row_step = captions_per_image  # one repeated row per caption: keep the first of each image's rows
    else:
        raise PrecompError(
            f"{ims_path}: {rows} image rows do not match {caps_path} ({num_captions} captions): expected "
            f"{num_images} (one row per image) or {num_captions} (one row per caption)"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = list_parts(out_dir)
    if existing:
        if not overwrite:
            raise PrecompError(
                f"{out_dir}: already holds a feature store ({len(existing)} parts); use overwrite"
            )
        for path in existing:
            os.remove(path)

    _, regions, feature_dim = features.shape
    metadata = {
        "source": "scan_precomp",
        "split": split,
        "features_file": ims_path.name,
        "captions_file": caps_path.name,
        "rows_per_caption": row_step != 1,
        "untrained": False,
    }
    writer = FeatureStoreWriter(
        out_dir, feature_dtype=feature_dtype, rows_per_part=rows_per_part, metadata=metadata
    )
    image_ids = [f"{split}/{index:06d}" for index in range(num_images)]
    zero_boxes = np.zeros((regions, 4), dtype=np.float32)
    try:
        with progress_bar("images", disable=not progress) as bar:
            task = bar.add_task(f"import {split}", total=num_images)
            for start in range(0, num_images, chunk_images):
                stop = min(start + chunk_images, num_images)
                # One contiguous read per chunk from the memory map (strided when rows repeat per caption).
                chunk = np.asarray(
                    features[start * row_step : stop * row_step : row_step], dtype=feature_dtype
                )
                for offset, image_features in enumerate(chunk):
                    writer.add(
                        RegionRecord(
                            image_id=image_ids[start + offset],
                            image_w=0,
                            image_h=0,
                            boxes=zero_boxes,
                            features=image_features,
                        )
                    )
                bar.update(task, advance=stop - start)
        writer.close()
        captions_path = write_captions(
            out_dir / CAPTIONS_FILE,
            [image_id for image_id in image_ids for _ in range(captions_per_image)],
            captions,
            captions_per_image=captions_per_image,
        )
    except BaseException:
        writer.discard()
        raise
    return PrecompImport(
        num_images=num_images,
        num_captions=num_captions,
        regions=int(regions),
        feature_dim=int(feature_dim),
        rows_per_caption=row_step != 1,
        store_dir=out_dir,
        captions_path=captions_path,
    )
