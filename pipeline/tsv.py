"""Interop with the bottom-up-attention TSV format, so existing feature dumps and other tools can be used.

One image per line, tab separated, no header: `image_id, image_w, image_h, num_boxes, boxes, features`, where
`boxes` (n x 4) and `features` (n x D) are base64 of little-endian float32 bytes. Lines are megabytes long, so
the csv field size limit is raised. The feature dimension D is inferred from the first row.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_output
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.store import (
    FeatureDtype,
    FeatureStore,
    FeatureStoreWriter,
    RegionRecord,
)

TSV_FIELDS: tuple[str, ...] = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


class TsvError(UserError):
    """A TSV line is malformed; the message names the file and line."""


def _raise_field_size_limit() -> None:
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 10


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def export_tsv(store: FeatureStore | str | Path, path: str | Path, *, progress: bool = True) -> int:
    """Write every image of a store as a TSV line (features as float32); returns the number of lines."""
    if not isinstance(store, FeatureStore):
        store = FeatureStore(store)
    path = Path(path)
    count = 0
    with (
        atomic_output(path) as tmp_path,
        tmp_path.open("w", newline="") as handle,
        progress_bar("images", disable=not progress) as bar,
    ):
        task = bar.add_task(f"export {path.name}", total=len(store))
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for record in store.iter_records():
            writer.writerow(
                [
                    record.image_id,
                    record.image_w,
                    record.image_h,
                    record.num_boxes,
                    _encode(record.boxes),
                    _encode(record.features),
                ]
            )
            count += 1
            bar.update(task, advance=1)
    return count


def _decode(path: Path, line: int, field: str, text: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TsvError(f"{path}:{line}: field {field!r} is not valid base64: {exc}") from exc
    if len(raw) % 4:
        raise TsvError(
            f"{path}:{line}: field {field!r} holds {len(raw)} bytes, not a whole number of float32"
        )
    return np.frombuffer(raw, dtype="<f4")


def read_tsv(path: str | Path) -> Iterator[RegionRecord]:
    """Parse a bottom-up-attention TSV file into records (float32 features), validating every line."""
    path = Path(path)
    if not path.is_file():
        raise TsvError(f"{path}: TSV file not found")
    _raise_field_size_limit()
    feature_dim: int | None = None
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row:
                continue
            if len(row) != len(TSV_FIELDS):
                raise TsvError(
                    f"{path}:{line}: expected {len(TSV_FIELDS)} tab-separated fields {TSV_FIELDS}, "
                    f"got {len(row)}"
                )
            image_id, width, height, num_boxes, boxes_b64, features_b64 = row
            try:
                image_w, image_h, n = int(width), int(height), int(num_boxes)
            except ValueError:
                raise TsvError(f"{path}:{line}: image_w, image_h and num_boxes must be integers") from None
            if n < 0:
                raise TsvError(f"{path}:{line}: negative num_boxes {n}")
            boxes = _decode(path, line, "boxes", boxes_b64)
            if boxes.size != n * 4:
                raise TsvError(
                    f"{path}:{line}: boxes hold {boxes.size} floats, expected num_boxes * 4 = {n * 4}"
                )
            features = _decode(path, line, "features", features_b64)
            if n == 0 or features.size % n:
                raise TsvError(f"{path}:{line}: {features.size} feature floats do not split into {n} regions")
            dim = features.size // n
            if feature_dim is None:
                feature_dim = dim
            elif dim != feature_dim:
                raise TsvError(
                    f"{path}:{line}: feature dimension {dim} differs from {feature_dim} on earlier lines"
                )
            yield RegionRecord(
                image_id=image_id,
                image_w=image_w,
                image_h=image_h,
                boxes=boxes.reshape(n, 4),
                features=features.reshape(n, dim),
            )


def import_tsv(
    path: str | Path,
    out_root: str | Path,
    *,
    feature_dtype: FeatureDtype = "float16",
    rows_per_part: int = 512,
    shard: str = "0",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> int:
    """Convert a TSV file into a feature store under `out_root`; returns the number of images imported."""
    path = Path(path)
    info = {"source": "tsv", "tsv_file": path.name, **(metadata or {})}
    count = 0
    with (
        FeatureStoreWriter(
            out_root, shard=shard, feature_dtype=feature_dtype, rows_per_part=rows_per_part, metadata=info
        ) as writer,
        progress_bar("images", disable=not progress) as bar,
    ):
        task = bar.add_task(f"import {path.name}", total=None)
        for record in read_tsv(path):
            writer.add(record)
            count += 1
            bar.update(task, advance=1)
    return count
