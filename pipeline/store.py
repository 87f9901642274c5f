"""Parquet feature store: one row per image, region boxes and features, written in atomic part files.

Why this layout: COCO's 36 x 2048 features are 18-36 GB, far more than training should hold in RAM, and DVC
hashes files, so the store is a directory of tens to hundreds of Parquet parts (never one file per image) with
row groups of a few hundred rows. Readers stream row group by row group and hand out numpy views of the Arrow
buffers; `FeatureStore.to_mmap` converts once to an uncompressed Arrow IPC file that is memory-mapped, so
random access during training costs page cache (reclaimable) rather than anonymous memory.

The columns describe themselves, so pandas, pyarrow and DuckDB read the directory without scan-pipe:
`features` is `list<fixed_size_list<float16|float32, D>>` and `boxes` `list<fixed_size_list<float32, 4>>`,
one fixed-size list per region (`np.stack(row)` is the (n, D) array); the run records beside the parts are
`_`-prefixed, which those readers skip. Stores of the first layout (store_format 1: flat lists reshaped
with `feature_dim` from the metadata) are refused with `StoreFormatError`; `store_repair.migrate_store`
converts them.

`FeatureStore` opens one part at a time and closes it after reading (a store of thousands of parts needs a
handful of descriptors) and keeps the ids as one Arrow string array, not a Python object per image.

Part files are named `part-<shard>-<index:05d>.parquet` and written by `store_writer.FeatureStoreWriter`:
each writer owns a shard name (one per rank/process), so several processes can write into one directory; a
writer reopened on an existing directory continues after the highest index of its shard. Parts are written
to a hidden temporary file in the same directory, fsynced, and hard-linked to their name
(`pipeline.atomic.publish_new`), which fails rather than replace an existing file: a killed writer or a
power loss leaves either a whole part or nothing, and no part is ever overwritten (a taken name sends the
writer to the next index).

A run that writes a store holds its lock (`store_lock.store_lock`: `_scan_pipe.lock`, flock); a resuming
writer moves unreadable parts into `_quarantine/` (`store_repair.quarantine_unreadable_parts`) and redoes
their images, while readers refuse such a part and name it. The underscore names keep Parquet readers and
`list_parts` away from both.

Duplicate image ids across parts: the reader refuses them by default (`duplicates="error"`, the message names
the id and both part files), because a duplicate means two runs were mixed into one directory. With
`duplicates="keep_first"` it keeps the first occurrence in part order (parts sorted by shard, then index) and
ignores the later rows, deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.feature_table import RegionFeatureTable

METADATA_KEY = b"scan_pipe"
PART_PATTERN = re.compile(r"^part-(?P<shard>[A-Za-z0-9_.]+)-(?P<index>\d{5,})\.parquet$")
SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")
FEATURE_DTYPES = ("float16", "float32")
# 2: features and boxes as list<fixed_size_list<...>>; 1 (flat lists) is read by `migrate_store` only.
STORE_FORMAT = 2
MMAP_FORMAT_VERSION = 2
# A part's feature values stay below this many (int32 offsets in the first layout; a bound on a part's size).
MAX_LIST_VALUES = 2**31 - 1


FeatureDtype = Literal["float16", "float32"]
DuplicatePolicy = Literal["error", "keep_first"]


class FeatureStoreError(UserError):
    """A feature store directory or part file is missing or invalid; the message names the path."""


class StoreFormatError(UserError):
    """A store in an older layout: valid, readable by `migrate_store` only; the message says how to convert.

    Deliberately not a `FeatureStoreError`: code that sets damaged parts aside (quarantine on resume) must
    stop here instead of treating every part of an old store as damaged.
    """


@dataclass
class RegionRecord:
    """The regions of one image: boxes in original-image pixels and their features.

    The arrays carry their stored dtypes (`ARRAY_DTYPES`; features float16 or float32): whoever makes a record
    converts once, and the writer checks instead of converting again.
    """

    image_id: str
    image_w: int
    image_h: int
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2
    features: np.ndarray  # (n, D) float16 or float32
    object_ids: np.ndarray | None = None  # (n,) int32, 0-based vocabulary line numbers
    object_conf: np.ndarray | None = None  # (n,) float32
    attribute_ids: np.ndarray | None = None  # (n,) int32
    attribute_conf: np.ndarray | None = None  # (n,) float32

    @property
    def num_boxes(self) -> int:
        """Number of regions n."""
        return int(self.features.shape[0])


# The stored dtype of every per-region array except the features (whose dtype is the store's feature_dtype).
ARRAY_DTYPES: dict[str, np.dtype] = {
    "boxes": np.dtype(np.float32),
    "object_ids": np.dtype(np.int32),
    "object_conf": np.dtype(np.float32),
    "attribute_ids": np.dtype(np.int32),
    "attribute_conf": np.dtype(np.float32),
}
OPTIONAL_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("object_ids", pa.int32()),
    ("object_conf", pa.float32()),
    ("attribute_ids", pa.int32()),
    ("attribute_conf", pa.float32()),
)
_FLOAT_LIST_COLUMNS = ("boxes", "features", "object_conf", "attribute_conf")


def arrow_float_type(feature_dtype: str) -> pa.DataType:
    return pa.float16() if feature_dtype == "float16" else pa.float32()


def region_list_type(value_type: pa.DataType, width: int) -> pa.DataType:
    """`list<fixed_size_list<value_type, width>>`: one fixed-size list per region, the width in the type."""
    return pa.list_(pa.list_(value_type, width))


def store_schema(feature_dtype: FeatureDtype, feature_dim: int) -> pa.Schema:
    """The Arrow schema of a part file (without the `scan_pipe` metadata); D is part of the features type."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_w", pa.int32(), nullable=False),
        pa.field("image_h", pa.int32(), nullable=False),
        pa.field("num_boxes", pa.int32(), nullable=False),
        pa.field("boxes", region_list_type(pa.float32(), 4), nullable=False),
        pa.field("features", region_list_type(arrow_float_type(feature_dtype), feature_dim), nullable=False),
    ]
    fields += [pa.field(name, pa.list_(arrow_type)) for name, arrow_type in OPTIONAL_COLUMNS]
    return pa.schema(fields)


def part_name(shard: str, index: int) -> str:
    """File name of part `index` of `shard`."""
    return f"part-{shard}-{index:05d}.parquet"


def list_parts(root: str | Path) -> list[Path]:
    """Part files of a store directory, sorted by shard name then index (hidden temporary files ignored)."""
    root = Path(root)
    found: list[tuple[str, int, Path]] = []
    for entry in os.scandir(root):
        match = PART_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((match["shard"], int(match["index"]), Path(entry.path)))
    found.sort(key=lambda item: (item[0], item[1]))
    return [path for _, _, path in found]


def existing_ids(root: str | Path) -> set[str]:
    """Image ids already stored under `root` (empty when the directory or its parts do not exist yet).

    Reads only the `image_id` column of each part: a cheap check of what a directory already holds.
    """
    root = Path(root)
    if not root.is_dir():
        return set()
    ids: set[str] = set()
    for path in list_parts(root):
        try:
            column = pq.read_table(path, columns=["image_id"]).column("image_id")
        except (pa.ArrowException, OSError) as exc:
            raise FeatureStoreError(f"{path}: cannot read the image_id column: {exc}") from exc
        ids.update(column.to_pylist())
    return ids


# ------------------------------------------------------------------------------ lock and quarantine (writers)

LOCK_FILE = "_scan_pipe.lock"
QUARANTINE_DIR = "_quarantine"
UNREADABLE_PART_HINT = (
    "a killed or crashed write can truncate a part: rerun `scan-pipe extract` with this folder as --out, "
    f"which moves unreadable parts to {QUARANTINE_DIR}/ and redoes their images"
)


def list_offsets_values(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a flat list array as numpy arrays without copying the values."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = array.values.to_numpy(zero_copy_only=True) if len(array.values) else np.zeros(0)
    return offsets, values


def region_arrays(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, regions) of a `list<fixed_size_list<T, W>>` column, without copying.

    Row i is `regions[offsets[i]:offsets[i + 1]]`, an (n, W) read-only view of the Arrow buffer. The offsets
    stay the int32 Arrow buffer too: a table of millions of rows gets no per-row copy.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = array.offsets.to_numpy()
    fixed = array.values  # may carry an offset of its own; `.values` below ignores it
    width = fixed.type.list_size
    if len(fixed) and width:
        flat = fixed.values.to_numpy(zero_copy_only=True)
        flat = flat[fixed.offset * width : (fixed.offset + len(fixed)) * width]
    else:
        flat = np.zeros(0, dtype=fixed.type.value_type.to_pandas_dtype())
    return offsets, flat.reshape(len(fixed), width)


def _optional_rows(array: pa.Array, np_dtype: np.dtype) -> list[np.ndarray | None]:
    if array.null_count == len(array):
        return [None] * len(array)
    offsets, values = list_offsets_values(array)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [
        values[offsets[i] : offsets[i + 1]].astype(np_dtype, copy=False) if valid[i] else None
        for i in range(len(array))
    ]


def records_from_batch(batch: pa.RecordBatch, feature_dim: int | None = None) -> list[RegionRecord]:
    """Records of a store-schema record batch; their arrays are views of the batch's buffers.

    The shapes come from the column types; `feature_dim`, when given, is checked against them.
    """
    box_offsets, boxes = region_arrays(batch.column("boxes"))
    feature_offsets, features = region_arrays(batch.column("features"))
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise ValueError(f"features have dimension {features.shape[1]}, expected {feature_dim}")
    image_ids = batch.column("image_id").to_pylist()
    widths = batch.column("image_w").to_numpy()
    heights = batch.column("image_h").to_numpy()
    optional = {
        name: _optional_rows(batch.column(name), ARRAY_DTYPES[name])
        for name, _ in OPTIONAL_COLUMNS
        if name in batch.schema.names
    }
    return [
        RegionRecord(
            image_id=image_id,
            image_w=int(widths[i]),
            image_h=int(heights[i]),
            boxes=boxes[box_offsets[i] : box_offsets[i + 1]],
            features=features[feature_offsets[i] : feature_offsets[i + 1]],
            **{name: rows[i] for name, rows in optional.items()},
        )
        for i, image_id in enumerate(image_ids)
    ]


def part_metadata(path: Path, schema: pa.Schema) -> dict[str, Any]:
    """The `scan_pipe` metadata of one part, with a valid feature_dim and feature_dtype."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise FeatureStoreError(f"{path}: not a scan-pipe feature part (no 'scan_pipe' key-value metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FeatureStoreError(f"{path}: 'scan_pipe' metadata is not valid JSON: {exc}") from exc
    feature_dtype = metadata.get("feature_dtype")
    if feature_dtype not in FEATURE_DTYPES or not isinstance(metadata.get("feature_dim"), int):
        raise FeatureStoreError(f"{path}: 'scan_pipe' metadata lacks a valid feature_dim / feature_dtype")
    return metadata


def is_first_format(schema: pa.Schema) -> bool:
    """Store format 1 kept features and boxes as flat lists (`list<float>`), reshaped with feature_dim."""
    if "features" not in schema.names:
        return False
    features = schema.field("features").type
    return pa.types.is_list(features) and pa.types.is_floating(features.value_type)


def check_part_schema(path: Path, schema: pa.Schema) -> dict[str, Any]:
    """Validate one part's schema; return its `scan_pipe` metadata."""
    metadata = part_metadata(path, schema)
    if is_first_format(schema):
        raise StoreFormatError(
            f"{path}: a store in scan-pipe's first layout (features as one flat list per image, reshaped "
            f"with feature_dim); convert it once with `scan-pipe features migrate {path.parent} NEW_DIR`"
        )
    expected = store_schema(metadata["feature_dtype"], metadata["feature_dim"])
    for field in expected:
        if field.name not in schema.names:
            raise FeatureStoreError(f"{path}: missing column {field.name!r}")
        actual = schema.field(field.name).type
        if actual != field.type:
            raise FeatureStoreError(f"{path}: column {field.name!r} has type {actual}, expected {field.type}")
    return metadata


def open_part(path: Path) -> pq.ParquetFile:
    """One part, opened for as long as the caller's `with` block: never all parts at once."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise FeatureStoreError(
            f"{path}: not a readable Parquet file ({exc}); {UNREADABLE_PART_HINT}"
        ) from exc


def lookup_positions(haystack: pa.Array, wanted: Iterable[str] | pa.Array) -> np.ndarray:
    """Position of each wanted id in `haystack` (int64; -1 where absent; the first one if repeated).

    One pass of Arrow's hash kernel over the haystack against a hash table of the (usually few) distinct
    wanted ids: no Python object per stored id, whatever the store's size.
    """
    queries = wanted if isinstance(wanted, pa.Array) else pa.array(list(wanted), type=pa.large_string())
    queries = queries.cast(pa.large_string())
    if len(queries) == 0:
        return np.zeros(0, dtype=np.int64)
    distinct = pc.unique(queries)
    slot = pc.index_in(queries, value_set=distinct).to_numpy()
    hit = pc.fill_null(pc.index_in(haystack.cast(pa.large_string()), value_set=distinct), -1).to_numpy()
    found = np.flatnonzero(hit >= 0)
    position = np.full(len(distinct), -1, dtype=np.int64)
    position[hit[found][::-1]] = found[::-1]  # reversed: the first occurrence is written last and wins
    return position[slot]


def first_occurrences(ids: pa.Array) -> np.ndarray | None:
    """Mask of the rows whose id is seen for the first time; None when every id is unique (the usual case)."""
    if len(pc.unique(ids)) == len(ids):
        return None
    order = pc.array_sort_indices(ids).to_numpy()  # stable: equal ids stay in row order
    ordered = ids.take(pa.array(order))
    repeats = pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)
    keep = np.ones(len(ids), dtype=bool)
    keep[order[1:][repeats]] = False
    return keep


def parts_fingerprint(parts: Sequence[Path]) -> str:
    """Hash of part names, sizes and modification times: changes when a part is added or rewritten."""
    digest = hashlib.sha256(f"scan-pipe-mmap-v{MMAP_FORMAT_VERSION}".encode())
    for path in parts:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


class FeatureStore:
    """Read access to a store directory: ids, metadata, streaming records, a few rows by id, an mmap table.

    Opening reads every part's schema and image_id column, one part open at a time, and checks the ids for
    duplicates; the ids stay as one Arrow string array (`ids`, ~50 bytes per image) and lookups hash the
    asked ids against it (`indices_of`).
    """

    def __init__(self, root: str | Path, *, duplicates: DuplicatePolicy = "error") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FeatureStoreError(f"{self.root}: feature store directory not found")
        if duplicates not in ("error", "keep_first"):
            raise ValueError(f"duplicates must be 'error' or 'keep_first', got {duplicates!r}")
        self.parts = list_parts(self.root)
        if not self.parts:
            raise FeatureStoreError(
                f"{self.root}: no part files (part-<shard>-<index>.parquet) in the feature store directory"
            )
        with open_part(self.parts[0]) as first:
            self.schema: pa.Schema = first.schema_arrow
        self.metadata: dict[str, Any] = check_part_schema(self.parts[0], self.schema)
        self.feature_dim: int = int(self.metadata["feature_dim"])
        self.feature_dtype: str = str(self.metadata["feature_dtype"])
        self._load_ids(duplicates)

    def _check_part(self, path: Path, schema: pa.Schema) -> None:
        """A part agrees with the first one (D and dtype are in the column types: one comparison)."""
        if schema.equals(self.schema) and METADATA_KEY in (schema.metadata or {}):
            return
        metadata = check_part_schema(path, schema)
        for key in ("feature_dim", "feature_dtype"):
            if metadata[key] != self.metadata[key]:
                raise FeatureStoreError(
                    f"{path}: {key} {metadata[key]!r} differs from {self.metadata[key]!r} in {self.parts[0]}"
                )

    def _load_ids(self, duplicates: DuplicatePolicy) -> None:
        chunks: list[pa.Array] = []
        counts: list[int] = []
        for path in self.parts:
            with open_part(path) as parquet_file:
                self._check_part(path, parquet_file.schema_arrow)
                try:
                    column = parquet_file.read(columns=["image_id"]).column("image_id")
                except (pa.ArrowException, OSError) as exc:
                    raise FeatureStoreError(
                        f"{path}: cannot read the image_id column ({exc}); {UNREADABLE_PART_HINT}"
                    ) from exc
            chunks.extend(chunk.cast(pa.large_string()) for chunk in column.chunks)
            counts.append(len(column))
        # Rows of part k are part_starts[k]:part_starts[k + 1] of the concatenated parts ("raw rows").
        self._part_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        raw_ids = pa.concat_arrays(chunks) if chunks else pa.array([], type=pa.large_string())
        del chunks
        self._keep = first_occurrences(raw_ids)  # None: no duplicates
        # The per-part reads and the hash table are freed; hand their pages back (mimalloc keeps ~5x the ids).
        pa.default_memory_pool().release_unused()
        self._rows: np.ndarray | None = None  # raw row of each store row, when duplicates are dropped
        if self._keep is None:
            self._ids = raw_ids
            return
        if duplicates == "error":
            row = int(np.flatnonzero(~self._keep)[0])
            image_id = raw_ids[row].as_py()
            first = int(pc.index(raw_ids, image_id).as_py())
            raise FeatureStoreError(
                f"{self._part_of(row)}: image_id {image_id!r} is also stored in {self._part_of(first)}; "
                "remove one of the parts or open the store with duplicates='keep_first'"
            )
        self._rows = np.flatnonzero(self._keep)
        self._ids = raw_ids.filter(pa.array(self._keep))

    def _part_of(self, raw_row: int) -> Path:
        return self.parts[int(np.searchsorted(self._part_starts, raw_row, side="right")) - 1]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(self.indices_of([image_id])[0] >= 0)

    @property
    def ids(self) -> pa.Array:
        """The stored image ids in store order, as one Arrow (large_string) array."""
        return self._ids

    @property
    def image_ids(self) -> list[str]:
        """The stored image ids as Python strings, built on each call (`ids` avoids that for big stores)."""
        return self._ids.to_pylist()

    @property
    def duplicates_dropped(self) -> int:
        """Rows left out because their id was stored earlier (only under `duplicates="keep_first"`)."""
        return 0 if self._keep is None else int((~self._keep).sum())

    def existing_ids(self) -> set[str]:
        """The stored image ids as a set."""
        return set(self._ids.to_pylist())

    def indices_of(self, image_ids: Iterable[str]) -> np.ndarray:
        """Store position of each id (int64, -1 where absent), by one hash pass over the stored ids."""
        return lookup_positions(self._ids, image_ids)

    def iter_batches(self, batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
        """Stream the store as Arrow record batches (duplicate rows dropped under `keep_first`)."""
        for index, path in enumerate(self.parts):
            keep = None
            if self._keep is not None:
                keep = self._keep[self._part_starts[index] : self._part_starts[index + 1]]
            with open_part(path) as parquet_file:
                start = 0
                for batch in parquet_file.iter_batches(batch_size=batch_rows):
                    if keep is None:
                        yield batch
                        continue
                    mask = keep[start : start + batch.num_rows]
                    start += batch.num_rows
                    yield batch if mask.all() else batch.filter(pa.array(mask))

    def iter_records(self, batch_rows: int = 256) -> Iterator[RegionRecord]:
        """Stream every image in store order; arrays are views of the current batch's buffers."""
        for batch in self.iter_batches(batch_rows):
            yield from records_from_batch(batch)

    def read(self, image_ids: Iterable[str]) -> list[RegionRecord]:
        """Records of a few specific images, in the order asked; reads only the row groups that hold them."""
        wanted = list(image_ids)
        positions = self.indices_of(wanted)
        missing = [image_id for image_id, position in zip(wanted, positions, strict=True) if position < 0]
        if missing:
            raise KeyError(f"{self.root}: image ids not in the feature store: {missing[:5]}")
        raw_rows = positions if self._rows is None else self._rows[positions]
        part_of_row = np.searchsorted(self._part_starts, raw_rows, side="right") - 1
        found: dict[str, RegionRecord] = {}
        for part_index in np.unique(part_of_row):
            rows = raw_rows[part_of_row == part_index] - self._part_starts[part_index]
            with open_part(self.parts[part_index]) as parquet_file:
                metadata = parquet_file.metadata
                sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
                group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
                group_of_row = np.searchsorted(group_starts, rows, side="right") - 1
                for group in np.unique(group_of_row):
                    in_group = rows[group_of_row == group] - group_starts[group]
                    table = parquet_file.read_row_group(int(group)).take(pa.array(in_group))
                    for batch in table.combine_chunks().to_batches():
                        for record in records_from_batch(batch):
                            found[record.image_id] = record
        return [found[image_id] for image_id in wanted]

    def fingerprint(self) -> str:
        """Hash of part names, sizes and modification times: changes when a part is added or rewritten."""
        return parts_fingerprint(self.parts)

    def to_mmap(self, cache_dir: str | Path, *, progress: bool = False) -> RegionFeatureTable:
        """A memory-mapped random-access table of this store, converted once and cached in `cache_dir`
        (see `pipeline.feature_table`)."""
        from pipeline.feature_table import build_feature_table

        return build_feature_table(self, cache_dir, progress=progress)


def column_types(store: FeatureStore) -> dict[str, str]:
    """Column name -> Arrow type of the first part (every part has the store schema), for manifests."""
    return {name: str(store.schema.field(name).type) for name in store.schema.names}
