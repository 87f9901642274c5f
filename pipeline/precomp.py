"""Import SCAN's precomputed features (`{split}_ims.npy` + `{split}_caps.txt`) into a feature store.

The original data: `{split}_ims.npy` holds (rows, 36, 2048) region features, `{split}_caps.txt` one caption
per line, `captions_per_image` (5) consecutive lines per image. Caption lines are read as the official loader
reads them (`open(..., 'rb')`, `line.strip()`, then UTF-8): lines end at b"\n" only (a lone "\r" inside a
line stays in it), a last line without "\n" counts, and only ASCII whitespace is stripped (a trailing
U+00A0 stays).

Some splits store one image row per caption (rows equal to the caption count, each image's row repeated 5
times); like the official `evalrank` (which keeps rows 0, 5, 10, ...) we keep each image's first row. The
official training, though, feeds each caption its own row, so the repeated rows are checked against the
first one: every row is read once for that (chunk by chunk, before the import proper, so that the result
is already in the first part's metadata). Differing rows are not an error; the result and the store
metadata say how many images differ and by how much (`repeated_rows_checked`,
`images_with_differing_rows`, `repeated_rows_max_abs_diff`; inf, or the string "inf" in the JSON metadata,
when a repeated row holds NaN/inf where its first row does not), and the stage prints a warning.

The .npy is memory-mapped (`allow_pickle=False`) and copied chunk by chunk, so COCO's tens of GB never sit in
RAM. Outputs, kept apart so that a reader of the store directory (pandas, DuckDB, pyarrow.dataset) sees only
the store:

* `out_dir`: the feature store, and nothing else. Features are float32 by default, exactly the .npy's values;
  float16 is opt-in and the result reports its largest rounding error on the imported features.
* `captions_out` (default `<out_dir>.captions.parquet`, beside the store directory): the captions table.

Image ids come from `{split}_ids.txt` when the folder has one: one id per line, either one line per image or
one line per caption (then each image's `captions_per_image` lines must hold the same id). Without it the ids
are synthetic, `{split}/{index:06d}`. Which one was used is in the result and the store metadata
(`image_ids`).

Boxes and image sizes are not part of the precomputed data. The store keeps its schema (every image has
`regions` rows of boxes) with zero boxes and image size 0, and its metadata says `boxes_known: false` and
`image_size_known: false`: those zeros mean "unknown", not a box at the origin.

Non-finite values (NaN/inf in an imported row, or a value beyond the stored dtype's range, e.g. float16's
65504) refuse the whole import: every imported row is still checked, the PrecompError names each refused row
and image id (the first 20), and nothing is written (a store being replaced with `overwrite` stays as it was).
A store with holes would no longer line up with the captions (caption j belongs to image j // 5). Only the
imported rows are refused this way: in the one-row-per-caption layout, a non-finite value in a skipped
repeated row shows as a difference (inf) in the repeated-rows check instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.captions import write_captions
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.store import FeatureDtype, RegionRecord, list_parts
from pipeline.store_lock import store_lock
from pipeline.store_writer import FeatureStoreWriter
from pipeline.tsv import describe_nonfinite, listed

CAPTIONS_SUFFIX = ".captions.parquet"
SYNTHETIC_IDS = "synthetic"


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
    image_ids_source: str  # the ids file's name, or "synthetic"
    feature_dtype: str
    float16_max_abs_error: float | None  # largest |float16(x) - x| over the imported features (float16 only)
    # One-row-per-caption layout only (False / 0 / None otherwise): images whose repeated rows are not all
    # equal to their first (kept) row, and the largest |row - first row| over them (0.0 when all are equal).
    repeated_rows_checked: bool = False
    images_with_differing_rows: int = 0
    repeated_rows_max_abs_diff: float | None = None


def precomp_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(`{split}_ims.npy`, `{split}_caps.txt`) inside `data_dir`."""
    data_dir = Path(data_dir)
    return data_dir / f"{split}_ims.npy", data_dir / f"{split}_caps.txt"


def ids_path(data_dir: str | Path, split: str) -> Path:
    """`{split}_ids.txt` inside `data_dir` (optional)."""
    return Path(data_dir) / f"{split}_ids.txt"


def default_captions_path(out_dir: str | Path) -> Path:
    """`<out_dir>.captions.parquet`: beside the store directory, never inside it."""
    absolute = Path(os.path.abspath(out_dir))
    if not absolute.name:
        raise PrecompError(f"{out_dir}: cannot derive a captions file name from this directory; give one")
    return absolute.with_name(absolute.name + CAPTIONS_SUFFIX)


def read_caption_lines(path: Path) -> list[str]:
    """One caption per line, exactly as the official loader reads them (see the module docstring).

    Binary lines (split on b"\n" only), `bytes.strip()` (ASCII whitespace), then UTF-8: the official tokens
    and ids depend on these details. Also used for `{split}_ids.txt`.
    """
    if not path.is_file():
        raise PrecompError(f"{path}: captions file not found")
    lines: list[str] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):  # binary iteration splits on b"\n" only
            try:
                lines.append(raw.strip().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise PrecompError(f"{path}:{number}: not UTF-8 text: {exc}") from None
    return lines


def read_image_ids(path: Path, num_images: int, captions_per_image: int) -> list[str]:
    """The image ids of `{split}_ids.txt`: one line per image, or one per caption (equal within an image).

    Ids are stripped; an empty id, a line count that fits neither layout, differing ids within one image's
    caption lines, or one id for two images is an error naming the file and lines.
    """
    lines = read_caption_lines(path)
    num_captions = num_images * captions_per_image
    if len(lines) == num_images:
        step = 1
    elif len(lines) == num_captions:
        step = captions_per_image
    else:
        raise PrecompError(
            f"{path}: {len(lines)} ids, expected {num_images} (one per image) or {num_captions} "
            "(one per caption)"
        )
    for index, image_id in enumerate(lines):
        if not image_id:
            raise PrecompError(f"{path}:{index + 1}: empty image id")
    image_ids = lines[::step]
    if step > 1:
        for index, image_id in enumerate(lines):
            first = index - index % step
            if image_id != lines[first]:
                raise PrecompError(
                    f"{path}:{index + 1}: id {image_id!r} differs from {lines[first]!r} on line {first + 1}; "
                    f"with one id per caption, the {step} lines of an image must hold the same id"
                )
    first_line: dict[str, int] = {}
    for index, image_id in enumerate(image_ids):
        line = index * step + 1
        if image_id in first_line:
            raise PrecompError(
                f"{path}:{line}: image id {image_id!r} is also the id of another image (line "
                f"{first_line[image_id]}); every image needs its own id"
            )
        first_line[image_id] = line
    return image_ids


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


def check_repeated_rows(
    features: np.ndarray, row_step: int, *, chunk_images: int = 256, progress: bool = False
) -> tuple[int, float]:
    """(images whose `row_step` rows are not all equal to their first row, largest |row - first row|).

    One-row-per-caption layout: image i's rows are `i * row_step ...`. Read chunk by chunk from the memory
    map (about `chunk_images` rows at a time, whatever `row_step`), vectorised; a NaN/inf in a repeated row
    that its first row lacks counts as a difference of inf.
    """
    num_images = features.shape[0] // row_step
    images_per_chunk = max(1, chunk_images // row_step)  # the kept rows alone are read `chunk_images` at once
    differing = 0
    max_diff = 0.0
    with progress_bar("images", disable=not progress) as bar:
        task = bar.add_task("check repeated rows", total=num_images)
        for start in range(0, num_images, images_per_chunk):
            stop = min(start + images_per_chunk, num_images)
            block = np.asarray(features[start * row_step : stop * row_step])
            block = block.reshape(stop - start, row_step, *features.shape[1:])
            first = block[:, 0]
            per_image = np.zeros(stop - start, dtype=np.float64)
            for repeat in range(1, row_step):
                with np.errstate(over="ignore", invalid="ignore"):
                    diff = np.abs(block[:, repeat] - first).max(axis=(1, 2)).astype(np.float64)
                    # equal non-finite values (inf == inf, or NaN in both) are the same row, not a difference
                    same = (block[:, repeat] == first) | (np.isnan(block[:, repeat]) & np.isnan(first))
                diff[same.all(axis=(1, 2))] = 0.0
                per_image = np.maximum(per_image, np.where(np.isnan(diff), np.inf, diff))
            differing += int(np.count_nonzero(per_image > 0))
            max_diff = max(max_diff, float(per_image.max(initial=0.0)))
            bar.update(task, advance=stop - start)
    return differing, max_diff


def _check_outputs(out_dir: Path, captions_path: Path, overwrite: bool) -> list[Path]:
    """Refuse outputs that would mix captions into the store or replace files without `overwrite`.

    Returns the store's existing part files (to be replaced once the new store is complete).
    """
    store_abs = Path(os.path.abspath(out_dir))
    captions_abs = Path(os.path.abspath(captions_path))
    if captions_abs == store_abs or store_abs in captions_abs.parents:
        raise PrecompError(
            f"{captions_path}: the captions file must not be inside the feature store directory {out_dir} "
            "(the store directory holds only the store)"
        )
    if captions_abs.is_dir():
        raise PrecompError(f"{captions_path}: is a directory; give a captions file name")
    if out_dir.exists() and not out_dir.is_dir():
        raise PrecompError(f"{out_dir}: exists and is not a directory")
    existing = list_parts(out_dir) if out_dir.is_dir() else []
    if out_dir.is_dir():
        part_names = {path.name for path in existing}
        strays = sorted(
            entry.name
            for entry in os.scandir(out_dir)
            if entry.name.endswith(".parquet") and entry.name not in part_names
        )
        if strays:
            raise PrecompError(
                f"{out_dir}: holds Parquet files that are not feature-store parts ({', '.join(strays)}); "
                "the store directory must hold only the store, so readers of the directory do not mix "
                f"other tables in (older imports wrote captions.parquet there: move it, e.g. to "
                f"{captions_path})"
            )
    if existing and not overwrite:
        raise PrecompError(f"{out_dir}: already holds a feature store ({len(existing)} parts); use overwrite")
    if captions_abs.exists() and not overwrite:
        raise PrecompError(f"{captions_path}: already exists; use overwrite")
    return existing


def import_precomp(
    data_dir: str | Path,
    split: str,
    out_dir: str | Path,
    *,
    captions_out: str | Path | None = None,
    feature_dtype: FeatureDtype = "float32",
    captions_per_image: int = 5,
    rows_per_part: int = 512,
    chunk_images: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> PrecompImport:
    """Convert one split of SCAN's precomputed data into a feature store (`out_dir`) and a captions table
    (`captions_out`, default `<out_dir>.captions.parquet`), all or nothing (see the module docstring)."""
    with store_lock(out_dir, command=f"import-precomp {data_dir} {split}"):  # one writer at a time
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
        id_file = ids_path(data_dir, split)
        if id_file.is_file():
            image_ids = read_image_ids(id_file, num_images, captions_per_image)
            ids_source = id_file.name
        else:
            image_ids = [f"{split}/{index:06d}" for index in range(num_images)]
            ids_source = SYNTHETIC_IDS

        out_dir = Path(out_dir)
        captions_path = Path(captions_out) if captions_out is not None else default_captions_path(out_dir)
        old_parts = _check_outputs(out_dir, captions_path, overwrite)

        _, regions, feature_dim = features.shape
        differing_images, max_row_diff = (
            check_repeated_rows(features, row_step, chunk_images=chunk_images, progress=progress)
            if row_step != 1
            else (0, None)
        )
        metadata = {
            "source": "scan_precomp",
            "split": split,
            "features_file": ims_path.name,
            "captions_file": caps_path.name,
            "image_ids": ids_source,
            "rows_per_caption": row_step != 1,
            "repeated_rows_checked": row_step != 1,
            "images_with_differing_rows": differing_images,
            # JSON has no inf: a non-finite difference is written as the string "inf"
            "repeated_rows_max_abs_diff": (
                max_row_diff if max_row_diff is None or np.isfinite(max_row_diff) else "inf"
            ),
            "boxes_known": False,  # boxes are zeros standing for "unknown"
            "image_size_known": False,  # image_w = image_h = 0 standing for "unknown"
            "untrained": False,
        }
        # New parts are numbered after any old ones, which are removed only once the new store is complete.
        writer = FeatureStoreWriter(
            out_dir, feature_dtype=feature_dtype, rows_per_part=rows_per_part, metadata=metadata
        )
        unknown_boxes = np.zeros((regions, 4), dtype=np.float32)
        max_error: float | None = 0.0 if feature_dtype == "float16" else None
        refused: list[str] = []
        try:
            with progress_bar("images", disable=not progress) as bar:
                task = bar.add_task(f"import {split}", total=num_images)
                for start in range(0, num_images, chunk_images):
                    stop = min(start + chunk_images, num_images)
                    # One contiguous read per chunk from the memory map (strided: rows repeated per caption).
                    source = np.asarray(features[start * row_step : stop * row_step : row_step])
                    with np.errstate(over="ignore"):  # overflow becomes inf: refused just below
                        chunk = source.astype(feature_dtype, copy=False)
                    finite = np.isfinite(source).all(axis=(1, 2))
                    fits = np.isfinite(chunk).all(axis=(1, 2)) if chunk is not source else finite
                    for offset in np.flatnonzero(~(finite & fits)):
                        index = start + int(offset)
                        problem = describe_nonfinite({"features": source[offset]}) or (
                            f"values up to |x| = {float(np.max(np.abs(source[offset]))):.6g} exceed the "
                            f"{feature_dtype} range"
                            + (" (import as float32)" if feature_dtype == "float16" else "")
                        )
                        refused.append(f"row {index * row_step}, image {image_ids[index]!r}: {problem}")
                    if not refused:
                        if max_error is not None:
                            error = np.abs(chunk.astype(source.dtype) - source)
                            max_error = max(max_error, float(error.max(initial=0.0)))
                        for offset, image_features in enumerate(chunk):
                            writer.add(
                                RegionRecord(
                                    image_id=image_ids[start + offset],
                                    image_w=0,
                                    image_h=0,
                                    boxes=unknown_boxes,
                                    features=image_features,
                                )
                            )
                    bar.update(task, advance=stop - start)
            if refused:
                raise PrecompError(
                    f"{ims_path}: {len(refused)} of {num_images} images hold non-finite values (NaN/inf); "
                    f"nothing was imported:\n{listed(refused)}"
                )
            writer.close()
            write_captions(
                captions_path,
                [image_id for image_id in image_ids for _ in range(captions_per_image)],
                captions,
                captions_per_image=captions_per_image,
            )
        except BaseException:
            writer.discard()
            raise
        for path in old_parts:
            os.remove(path)
        return PrecompImport(
            num_images=num_images,
            num_captions=num_captions,
            regions=int(regions),
            feature_dim=int(feature_dim),
            rows_per_caption=row_step != 1,
            store_dir=out_dir,
            captions_path=captions_path,
            image_ids_source=ids_source,
            feature_dtype=feature_dtype,
            float16_max_abs_error=max_error,
            repeated_rows_checked=row_step != 1,
            images_with_differing_rows=differing_images,
            repeated_rows_max_abs_diff=max_row_diff,
        )
