"""Interop with the bottom-up-attention TSV format, so existing feature dumps and other tools can be used.

One image per line, tab separated, no header: `image_id, image_w, image_h, num_boxes, boxes, features`, where
`boxes` (n x 4) and `features` (n x D) are base64 of little-endian float32 bytes. Lines are megabytes long, so
the csv field size limit is raised. The feature dimension D is inferred from the first row.

Image ids. The original `read_tsv.py` of bottom-up-attention (and SCAN's converter built on it) calls
`int(image_id)`, while our stores keep path-style ids (`val2014/COCO_val2014_000000391895.jpg`). `export_tsv`
therefore converts ids by a rule (`ID_RULES`): `keep` writes them as stored; `coco` writes the integer of a
COCO file name (`COCO_val2014_000000391895.jpg` or `000000391895.jpg` -> 391895); `flickr` the numeric
Flickr30K file stem (`1000092795.jpg` -> 1000092795); `mapping` looks each id up in a two-column file
(`image_id<TAB>int`, or comma separated for a `.csv` file). Every id is converted before anything is written:
an id the rule cannot convert, or two images given the same integer, is an error naming them.

Non-finite values. A NaN or inf in a line's boxes or features (or a feature beyond float16's range when
importing as float16) refuses the whole import: the file is read to the end, the error names every refused
line and image id (the first `MAX_LISTED`), and no part is left behind. A store with a hole in it would
silently disagree with the captions and lists that were made for the full dump.
"""

from __future__ import annotations

import base64
import binascii
import csv
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.atomic import atomic_output
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.store import FeatureDtype, FeatureStore, RegionRecord
from pipeline.store_lock import store_lock
from pipeline.store_writer import FeatureStoreWriter

TSV_FIELDS: tuple[str, ...] = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
IdRule = Literal["keep", "coco", "flickr", "mapping"]
ID_RULES: tuple[str, ...] = ("keep", "coco", "flickr", "mapping")
MAX_LISTED = 20  # refused images / unconvertible ids named in one error message

_BASENAME_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    # COCO file names carry the image id zero-padded to 12 digits, with or without the COCO_<split>_ prefix.
    "coco": (
        re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})(?:\.[A-Za-z0-9]+)?"),
        "a COCO file name such as COCO_val2014_000000391895.jpg or 000000391895.jpg",
    ),
    "flickr": (
        re.compile(r"(\d+)(?:\.[A-Za-z0-9]+)?"),
        "a Flickr30K file name such as 1000092795.jpg (digits only)",
    ),
}
_INTEGER = re.compile(r"\d+")


class TsvError(UserError):
    """A TSV line is malformed, or an id cannot be converted; the message names the file and line or id."""


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


def describe_nonfinite(arrays: dict[str, np.ndarray | None]) -> str | None:
    """`"features: 2 NaN, 1 inf"` for the arrays holding NaN or inf, or None when every value is finite."""
    problems = []
    for name, array in arrays.items():
        if array is None:
            continue
        values = np.asarray(array)
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            nan = int(np.isnan(values).sum())
            problems.append(f"{name}: {nan} NaN, {int(bad.sum()) - nan} inf")
    return "; ".join(problems) if problems else None


def listed(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """The first `limit` items, one per indented line, and how many more there are."""
    lines = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def is_integer_id(image_id: str) -> bool:
    """Whether `image_id` is a plain non-negative integer, as the original readers' `int(image_id)` needs."""
    return _INTEGER.fullmatch(image_id) is not None


def read_id_map(path: str | Path) -> dict[str, int]:
    """A two-column `image_id<TAB>int` file (comma separated when it ends in `.csv`) as a dict.

    Blank lines are skipped; a first line `image_id<TAB><not an integer>` is taken as a header. A line without
    exactly two fields, a value that is not a non-negative integer, or an id given two different values is an
    error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise TsvError(f"{path}: id map file not found")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    mapping: dict[str, int] = {}
    first_line: dict[str, int] = {}
    seen_row = False
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for line, row in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
                if not row or all(not field.strip() for field in row):
                    continue
                if len(row) != 2:
                    kind = "comma" if delimiter == "," else "tab"
                    raise TsvError(
                        f"{path}:{line}: expected 2 {kind}-separated fields (image_id, integer id), "
                        f"got {len(row)}"
                    )
                image_id, value = row[0].strip(), row[1].strip()
                is_header = not seen_row and image_id == "image_id" and not is_integer_id(value)
                seen_row = True
                if is_header:
                    continue
                if not image_id:
                    raise TsvError(f"{path}:{line}: empty image_id")
                if not is_integer_id(value):
                    raise TsvError(f"{path}:{line}: {value!r} is not a non-negative integer id")
                number = int(value)
                if image_id in mapping and mapping[image_id] != number:
                    raise TsvError(
                        f"{path}:{line}: image_id {image_id!r} maps to {number} here but to "
                        f"{mapping[image_id]} on line {first_line[image_id]}"
                    )
                mapping.setdefault(image_id, number)
                first_line.setdefault(image_id, line)
    except UnicodeDecodeError as exc:
        raise TsvError(f"{path}: not UTF-8 text: {exc}") from exc
    if not mapping:
        raise TsvError(f"{path}: id map holds no ids")
    return mapping


def convert_ids(
    image_ids: Iterable[str], rule: IdRule = "keep", id_map: dict[str, int] | None = None
) -> list[str]:
    """The TSV `image_id` of each store id under `rule` (see the module docstring), in order.

    Raises TsvError naming the ids the rule cannot convert, or two ids converted to the same integer.
    """
    if rule not in ID_RULES:
        raise ValueError(f"id rule must be one of {ID_RULES}, got {rule!r}")
    ids = list(image_ids)
    if rule == "keep":
        return ids
    if rule == "mapping" and id_map is None:
        raise ValueError("the mapping id rule needs an id map")
    converted: list[int | None] = []
    for image_id in ids:
        if rule == "mapping":
            assert id_map is not None
            converted.append(id_map.get(image_id))
        else:
            pattern, _ = _BASENAME_RULES[rule]
            match = pattern.fullmatch(image_id.rsplit("/", 1)[-1])
            converted.append(int(match[1]) if match else None)
    failed = [repr(image_id) for image_id, number in zip(ids, converted, strict=True) if number is None]
    if failed:
        expected = "an entry in the id map" if rule == "mapping" else _BASENAME_RULES[rule][1]
        raise TsvError(
            f"--ids {rule}: {len(failed)} of {len(ids)} image ids cannot be converted (expected {expected}); "
            f"nothing was written:\n{listed(failed)}"
        )
    owner: dict[int, str] = {}
    clashes = []
    for image_id, number in zip(ids, converted, strict=True):
        assert number is not None
        if number in owner:
            clashes.append(f"{owner[number]!r} and {image_id!r} -> {number}")
        else:
            owner[number] = image_id
    if clashes:
        raise TsvError(
            f"--ids {rule}: {len(clashes)} image ids convert to an integer already taken by another image; "
            f"nothing was written:\n{listed(clashes)}"
        )
    return [str(number) for number in converted]


def export_tsv(
    store: FeatureStore | str | Path,
    path: str | Path,
    *,
    ids: IdRule = "keep",
    id_map: dict[str, int] | str | Path | None = None,
    progress: bool = True,
) -> int:
    """Write every image of a store as a TSV line (features as float32), atomically; returns the line count.

    `ids` converts the image ids (`keep`, `coco`, `flickr`, `mapping` with `id_map` a dict or a map file).
    Every id is converted before the file is opened, so an unconvertible id leaves no output behind.
    """
    if not isinstance(store, FeatureStore):
        store = FeatureStore(store)
    if isinstance(id_map, (str, Path)):
        id_map = read_id_map(id_map)
    tsv_ids = dict(zip(store.image_ids, convert_ids(store.image_ids, ids, id_map), strict=True))
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
                    tsv_ids[record.image_id],
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


def _parse_tsv(path: Path) -> Iterator[tuple[int, RegionRecord]]:
    """(line number, record) of every line, validating the format (not the values)."""
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
            yield (
                line,
                RegionRecord(
                    image_id=image_id,
                    image_w=image_w,
                    image_h=image_h,
                    boxes=boxes.reshape(n, 4),
                    features=features.reshape(n, dim),
                ),
            )


def read_tsv(path: str | Path) -> Iterator[RegionRecord]:
    """Parse a bottom-up-attention TSV file into records (float32 features), validating every line.

    A line whose boxes or features hold NaN or inf is an error naming the file, line and image id.
    """
    path = Path(path)
    for line, record in _parse_tsv(path):
        problem = describe_nonfinite({"boxes": record.boxes, "features": record.features})
        if problem:
            raise TsvError(f"{path}:{line}: image {record.image_id!r} holds non-finite values ({problem})")
        yield record


@dataclass(frozen=True)
class TsvImport:
    """What a TSV import wrote."""

    num_images: int
    feature_dim: int
    feature_dtype: str
    float16_max_abs_error: float | None  # largest |float16(x) - x| over the imported features (float16 only)


def import_tsv_file(
    path: str | Path,
    out_root: str | Path,
    *,
    feature_dtype: FeatureDtype = "float32",
    rows_per_part: int = 512,
    shard: str = "0",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> TsvImport:
    """Convert a TSV file into a feature store under `out_root`, all or nothing.

    Features are stored as float32 by default, exactly as the TSV holds them; with float16 the result reports
    the largest rounding error. A line with NaN/inf values (or a feature beyond float16's range) refuses the
    whole import after the file has been read to the end: the TsvError names every such line and id, and the
    parts written so far are deleted. A malformed line fails at once, also deleting them.
    """
    with store_lock(out_root, command=f"import-tsv {path}"):  # one writer at a time
        path = Path(path)
        info = {"source": "tsv", "tsv_file": path.name, **(metadata or {})}
        writer = FeatureStoreWriter(
            out_root, shard=shard, feature_dtype=feature_dtype, rows_per_part=rows_per_part, metadata=info
        )
        count = 0
        feature_dim = 0
        max_error: float | None = 0.0 if feature_dtype == "float16" else None
        refused: list[str] = []
        try:
            with progress_bar("images", disable=not progress) as bar:
                task = bar.add_task(f"import {path.name}", total=None)
                for line, record in _parse_tsv(path):
                    count += 1
                    feature_dim = int(record.features.shape[1])
                    bar.update(task, advance=1)
                    problem = describe_nonfinite({"boxes": record.boxes, "features": record.features})
                    with np.errstate(over="ignore"):  # overflow becomes inf: refused just below
                        features = record.features.astype(feature_dtype)
                    if problem is None and feature_dtype == "float16" and not np.isfinite(features).all():
                        peak = float(np.max(np.abs(record.features)))
                        problem = f"features up to |x| = {peak:.6g} exceed the float16 range (use float32)"
                    if problem:
                        refused.append(f"line {line}, image {record.image_id!r}: {problem}")
                    if refused:
                        continue  # the import is refused: keep reading only to name every bad line
                    if max_error is not None:
                        error = np.abs(features.astype(np.float32) - record.features)
                        max_error = max(max_error, float(error.max(initial=0.0)))
                    record.features = features
                    writer.add(record)
            if refused:
                raise TsvError(
                    f"{path}: {len(refused)} of {count} images hold non-finite values (NaN/inf); "
                    f"nothing was imported:\n{listed(refused)}"
                )
            writer.close()
        except BaseException:
            writer.discard()
            raise
        return TsvImport(
            num_images=count,
            feature_dim=feature_dim,
            feature_dtype=feature_dtype,
            float16_max_abs_error=max_error,
        )


def import_tsv(
    path: str | Path,
    out_root: str | Path,
    *,
    feature_dtype: FeatureDtype = "float32",
    rows_per_part: int = 512,
    shard: str = "0",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> int:
    """`import_tsv_file`, returning only the number of images imported."""
    return import_tsv_file(
        path,
        out_root,
        feature_dtype=feature_dtype,
        rows_per_part=rows_per_part,
        shard=shard,
        metadata=metadata,
        progress=progress,
    ).num_images
