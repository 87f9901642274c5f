"""Parquet feature store: one row per image, region boxes and features, written in atomic part files.

Why this layout: COCO's 36 x 2048 features are 18-36 GB, far more than training should hold in RAM, and DVC
hashes files, so the store is a directory of tens to hundreds of Parquet parts (never one file per image) with
row groups of a few hundred rows. Readers stream row group by row group and hand out numpy views of the Arrow
buffers; `FeatureStore.to_mmap` converts once to an uncompressed Arrow IPC file that is memory-mapped, so
random access during training costs page cache (reclaimable) rather than anonymous memory.

Part files are named `part-<shard>-<index:05d>.parquet`. Each writer owns a shard name (one per rank/process),
so several processes can write into one directory; a writer reopened on an existing directory continues
after the highest index of its shard, so resuming never overwrites a part. Parts are written to a hidden
temporary file in the same directory and renamed with `os.replace`: a killed writer leaves either a whole
part or nothing.

Duplicate image ids across parts: the reader refuses them by default (`duplicates="error"`, the message names
the id and both part files), because a duplicate means two runs were mixed into one directory. With
`duplicates="keep_first"` it keeps the first occurrence in part order (parts sorted by shard, then index) and
ignores the later rows, deterministically.
"""

from __future__ import annotations

import contextlib
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
import pyarrow.parquet as pq

from pipeline.atomic import atomic_output
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.feature_table import RegionFeatureTable

METADATA_KEY = b"scan_pipe"
PART_PATTERN = re.compile(r"^part-(?P<shard>[A-Za-z0-9_.]+)-(?P<index>\d{5,})\.parquet$")
SHARD_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")
FEATURE_DTYPES = ("float16", "float32")
MMAP_FORMAT_VERSION = 1
# Arrow `list<>` offsets are int32: the flat features of one part must stay below this many values.
_MAX_LIST_VALUES = 2**31 - 1


FeatureDtype = Literal["float16", "float32"]
DuplicatePolicy = Literal["error", "keep_first"]


class FeatureStoreError(UserError):
    """A feature store directory or part file is missing or invalid; the message names the path."""


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
_OPTIONAL_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("object_ids", pa.int32()),
    ("object_conf", pa.float32()),
    ("attribute_ids", pa.int32()),
    ("attribute_conf", pa.float32()),
)
_FLOAT_LIST_COLUMNS = ("boxes", "features", "object_conf", "attribute_conf")


def arrow_float_type(feature_dtype: str) -> pa.DataType:
    return pa.float16() if feature_dtype == "float16" else pa.float32()


def store_schema(feature_dtype: FeatureDtype = "float16") -> pa.Schema:
    """The Arrow schema of a part file (without the `scan_pipe` metadata)."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_w", pa.int32(), nullable=False),
        pa.field("image_h", pa.int32(), nullable=False),
        pa.field("num_boxes", pa.int32(), nullable=False),
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("features", pa.list_(arrow_float_type(feature_dtype)), nullable=False),
    ]
    fields += [pa.field(name, pa.list_(arrow_type)) for name, arrow_type in _OPTIONAL_COLUMNS]
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


class FeatureStoreWriter:
    """Buffers `RegionRecord`s and writes them as atomic Parquet parts of `rows_per_part` rows.

    Use as a context manager; `close()` flushes the last, possibly shorter, part. Several writers may share a
    directory if each has its own `shard` name; a writer on a directory that already has parts of its shard
    continues numbering after them.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        shard: str = "0",
        feature_dtype: FeatureDtype = "float16",
        rows_per_part: int = 512,
        row_group_size: int = 256,
        metadata: dict[str, Any] | None = None,
        compression: str = "lz4",  # float features barely compress; lz4 reads and writes fastest
    ) -> None:
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        if not SHARD_PATTERN.match(shard):
            raise ValueError(f"shard name {shard!r} may only contain letters, digits, '_' and '.'")
        if rows_per_part < 1 or row_group_size < 1:
            raise ValueError("rows_per_part and row_group_size must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self.feature_dtype: FeatureDtype = feature_dtype
        self.rows_per_part = rows_per_part
        self.row_group_size = row_group_size
        self.compression = compression
        self.user_metadata: dict[str, Any] = dict(metadata or {})
        self.feature_dim: int | None = None
        self.parts_written: list[Path] = []
        self.rows_written = 0
        self._buffer: list[RegionRecord] = []
        self._next_index = self._first_free_index()
        self._closed = False

    def _first_free_index(self) -> int:
        indices = [
            int(match["index"])
            for path in list_parts(self.root)
            if (match := PART_PATTERN.match(path.name)) and match["shard"] == self.shard
        ]
        return max(indices) + 1 if indices else 0

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # On an exception the buffered rows are still flushed: they are complete records, and a resumed run
        # skips them instead of recomputing them.
        self.close()

    def add(self, record: RegionRecord) -> None:
        """Validate and buffer one image; writes a part when the buffer holds `rows_per_part` rows."""
        if self._closed:
            raise RuntimeError("FeatureStoreWriter.add() after close()")
        self._buffer.append(self._validated(record))
        if len(self._buffer) >= self.rows_per_part:
            self.flush()

    def _validated(self, record: RegionRecord) -> RegionRecord:
        """Check shapes and dtypes; the one conversion done here is the features' to the store's dtype.

        Importers hand float32 features to a float16 store, so features may come as either float width; every
        other array must already have its `ARRAY_DTYPES` dtype (a mismatch is a producer's bug, not data).
        """
        features = np.asarray(record.features)
        if features.ndim != 2:
            raise ValueError(f"{record.image_id}: features must be (n, D), got shape {features.shape}")
        if features.dtype.name not in FEATURE_DTYPES:
            raise ValueError(f"{record.image_id}: features must be float16 or float32, got {features.dtype}")
        n, dim = features.shape
        if self.feature_dim is None:
            self.feature_dim = int(dim)
        elif dim != self.feature_dim:
            raise ValueError(f"{record.image_id}: feature dimension {dim} differs from {self.feature_dim}")
        arrays: dict[str, np.ndarray | None] = {}
        for name, dtype in ARRAY_DTYPES.items():
            value = getattr(record, name)
            if value is None:
                if name == "boxes":
                    raise ValueError(f"{record.image_id}: boxes are required")
                arrays[name] = None
                continue
            value = np.asarray(value)
            if value.dtype != dtype:
                raise ValueError(f"{record.image_id}: {name} must be {dtype}, got {value.dtype}")
            expected = (n, 4) if name == "boxes" else (n,)
            if value.shape != expected:
                raise ValueError(f"{record.image_id}: {name} must have shape {expected}, got {value.shape}")
            arrays[name] = value
        return RegionRecord(
            image_id=str(record.image_id),
            image_w=int(record.image_w),
            image_h=int(record.image_h),
            features=features.astype(self.feature_dtype, copy=False),
            **arrays,  # type: ignore[arg-type]
        )

    def _metadata_json(self) -> bytes:
        payload = dict(self.user_metadata)
        payload["feature_dim"] = self.feature_dim
        payload["feature_dtype"] = self.feature_dtype
        payload.setdefault("store_format", 1)
        return json.dumps(payload, sort_keys=True).encode()

    def _build_table(self, records: Sequence[RegionRecord]) -> pa.Table:
        counts = np.array([r.num_boxes for r in records], dtype=np.int64)
        dim = self.feature_dim or 0
        if int(counts.sum()) * dim >= _MAX_LIST_VALUES:
            raise ValueError(
                f"part too large for int32 list offsets ({int(counts.sum())} regions x {dim}); "
                "lower rows_per_part"
            )

        def flat_list(values: list[np.ndarray], per_row: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
            # The records are validated: their arrays already have the column's dtype.
            offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
            np.cumsum(per_row, out=offsets[1:])
            flat = np.concatenate([v.reshape(-1) for v in values])
            return pa.ListArray.from_arrays(
                pa.array(offsets, type=pa.int32()), pa.array(flat, type=arrow_type)
            )

        columns: dict[str, pa.Array] = {
            "image_id": pa.array([r.image_id for r in records], type=pa.string()),
            "image_w": pa.array([r.image_w for r in records], type=pa.int32()),
            "image_h": pa.array([r.image_h for r in records], type=pa.int32()),
            "num_boxes": pa.array(counts.astype(np.int32), type=pa.int32()),
            "boxes": flat_list([r.boxes for r in records], counts * 4, pa.float32()),
            "features": flat_list(
                [r.features for r in records], counts * dim, arrow_float_type(self.feature_dtype)
            ),
        }
        for name, arrow_type in _OPTIONAL_COLUMNS:
            values = [getattr(r, name) for r in records]
            if all(v is None for v in values):
                columns[name] = pa.nulls(len(records), type=pa.list_(arrow_type))
            else:
                columns[name] = pa.array(values, type=pa.list_(arrow_type))
        schema = store_schema(self.feature_dtype).with_metadata({METADATA_KEY: self._metadata_json()})
        return pa.Table.from_pydict(columns, schema=schema)

    def flush(self) -> None:
        """Write the buffered records as one part (no-op when the buffer is empty)."""
        if not self._buffer:
            return
        table = self._build_table(self._buffer)
        while (self.root / part_name(self.shard, self._next_index)).exists():
            self._next_index += 1  # a part of this shard appeared meanwhile: never overwrite one
        target = self.root / part_name(self.shard, self._next_index)
        with atomic_output(target) as tmp_path:
            pq.write_table(
                table,
                tmp_path,
                row_group_size=self.row_group_size,
                use_dictionary=["image_id"],
                write_statistics=["image_id", "image_w", "image_h", "num_boxes"],
                compression=self.compression,
            )
        self.parts_written.append(target)
        self.rows_written += len(self._buffer)
        self._next_index += 1
        self._buffer = []

    def discard(self) -> None:
        """Abandon the write: drop buffered rows and delete the parts this writer wrote (failed imports)."""
        self._buffer = []
        for path in self.parts_written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.parts_written = []
        self.rows_written = 0
        self._closed = True

    def close(self) -> None:
        """Flush the last part; further `add` calls fail."""
        if not self._closed:
            self.flush()
            self._closed = True


def list_offsets_values(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list array as numpy arrays without copying the values."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = array.values.to_numpy(zero_copy_only=True) if len(array.values) else np.zeros(0)
    return offsets, values


def _optional_rows(array: pa.Array, np_dtype: np.dtype) -> list[np.ndarray | None]:
    if array.null_count == len(array):
        return [None] * len(array)
    offsets, values = list_offsets_values(array)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return [
        values[offsets[i] : offsets[i + 1]].astype(np_dtype, copy=False) if valid[i] else None
        for i in range(len(array))
    ]


def records_from_batch(batch: pa.RecordBatch, feature_dim: int) -> list[RegionRecord]:
    """Records of a store-schema record batch; their arrays are views of the batch's buffers."""
    image_ids = batch.column("image_id").to_pylist()
    widths = batch.column("image_w").to_numpy()
    heights = batch.column("image_h").to_numpy()
    box_offsets, box_values = list_offsets_values(batch.column("boxes"))
    feat_offsets, feat_values = list_offsets_values(batch.column("features"))
    optional = {
        name: _optional_rows(batch.column(name), ARRAY_DTYPES[name])
        for name, _ in _OPTIONAL_COLUMNS
        if name in batch.schema.names
    }
    records = []
    for i, image_id in enumerate(image_ids):
        records.append(
            RegionRecord(
                image_id=image_id,
                image_w=int(widths[i]),
                image_h=int(heights[i]),
                boxes=box_values[box_offsets[i] : box_offsets[i + 1]].reshape(-1, 4),
                features=feat_values[feat_offsets[i] : feat_offsets[i + 1]].reshape(-1, feature_dim),
                **{name: rows[i] for name, rows in optional.items()},
            )
        )
    return records


def _check_schema(path: Path, schema: pa.Schema) -> dict[str, Any]:
    """Validate one part's schema; return its `scan_pipe` metadata."""
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
    expected = store_schema(feature_dtype)
    for field in expected:
        if field.name not in schema.names:
            raise FeatureStoreError(f"{path}: missing column {field.name!r}")
        actual = schema.field(field.name).type
        if actual != field.type:
            raise FeatureStoreError(f"{path}: column {field.name!r} has type {actual}, expected {field.type}")
    return metadata


class FeatureStore:
    """Read access to a store directory: ids, metadata, streaming records, a few rows by id, an mmap table."""

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
        self._files: list[pq.ParquetFile] = []
        part_metadata: list[dict[str, Any]] = []
        for path in self.parts:
            try:
                parquet_file = pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as exc:
                raise FeatureStoreError(f"{path}: not a readable Parquet file: {exc}") from exc
            self._files.append(parquet_file)
            part_metadata.append(_check_schema(path, parquet_file.schema_arrow))
        first = part_metadata[0]
        for path, meta in zip(self.parts, part_metadata, strict=True):
            for key in ("feature_dim", "feature_dtype"):
                if meta[key] != first[key]:
                    raise FeatureStoreError(
                        f"{path}: {key} {meta[key]!r} differs from {first[key]!r} in {self.parts[0]}"
                    )
        self.metadata: dict[str, Any] = first
        self.feature_dim: int = int(first["feature_dim"])
        self.feature_dtype: str = str(first["feature_dtype"])
        self._load_ids(duplicates)

    def _load_ids(self, duplicates: DuplicatePolicy) -> None:
        first_seen: dict[str, int] = {}
        self._keep: list[np.ndarray] = []  # per part: bool mask of rows that belong to the store
        self._locations: dict[str, tuple[int, int]] = {}  # image_id -> (part, row within part)
        image_ids: list[str] = []
        for part_index, (path, parquet_file) in enumerate(zip(self.parts, self._files, strict=True)):
            ids = parquet_file.read(columns=["image_id"]).column("image_id").to_pylist()
            keep = np.ones(len(ids), dtype=bool)
            for row, image_id in enumerate(ids):
                if image_id in first_seen:
                    if duplicates == "error":
                        raise FeatureStoreError(
                            f"{path}: image_id {image_id!r} is also stored in "
                            f"{self.parts[first_seen[image_id]]}; "
                            "remove one of the parts or open the store with duplicates='keep_first'"
                        )
                    keep[row] = False
                    continue
                first_seen[image_id] = part_index
                self._locations[image_id] = (part_index, row)
                image_ids.append(image_id)
            self._keep.append(keep)
        self.image_ids: list[str] = image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._locations

    def existing_ids(self) -> set[str]:
        """The stored image ids as a set."""
        return set(self.image_ids)

    def iter_batches(self, batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
        """Stream the store as Arrow record batches (duplicate rows dropped under `keep_first`)."""
        for parquet_file, keep in zip(self._files, self._keep, strict=True):
            start = 0
            for batch in parquet_file.iter_batches(batch_size=batch_rows):
                mask = keep[start : start + batch.num_rows]
                start += batch.num_rows
                yield batch if mask.all() else batch.filter(pa.array(mask))

    def iter_records(self, batch_rows: int = 256) -> Iterator[RegionRecord]:
        """Stream every image in store order; arrays are views of the current batch's buffers."""
        for batch in self.iter_batches(batch_rows):
            yield from records_from_batch(batch, self.feature_dim)

    def read(self, image_ids: Iterable[str]) -> list[RegionRecord]:
        """Records of a few specific images, in the order asked; reads only the row groups that hold them."""
        wanted = list(image_ids)
        missing = [i for i in wanted if i not in self._locations]
        if missing:
            raise KeyError(f"{self.root}: image ids not in the feature store: {missing[:5]}")
        by_group: dict[tuple[int, int], list[tuple[int, str]]] = {}
        for image_id in wanted:
            part_index, row = self._locations[image_id]
            metadata = self._files[part_index].metadata
            group, first_row = 0, 0
            while first_row + metadata.row_group(group).num_rows <= row:
                first_row += metadata.row_group(group).num_rows
                group += 1
            by_group.setdefault((part_index, group), []).append((row - first_row, image_id))
        found: dict[str, RegionRecord] = {}
        for (part_index, group), rows in by_group.items():
            table = self._files[part_index].read_row_group(group)
            subset = table.take(pa.array([r for r, _ in rows], type=pa.int64()))
            for batch in subset.combine_chunks().to_batches():
                for record in records_from_batch(batch, self.feature_dim):
                    found[record.image_id] = record
        return [found[i] for i in wanted]

    def fingerprint(self) -> str:
        """Hash of part names, sizes and modification times: changes when a part is added or rewritten."""
        digest = hashlib.sha256(f"scan-pipe-mmap-v{MMAP_FORMAT_VERSION}".encode())
        for path in self.parts:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return digest.hexdigest()

    def to_mmap(self, cache_dir: str | Path, *, progress: bool = False) -> RegionFeatureTable:
        """A memory-mapped random-access table of this store, converted once and cached in `cache_dir`
        (see `pipeline.feature_table`)."""
        from pipeline.feature_table import build_feature_table

        return build_feature_table(self, cache_dir, progress=progress)


def column_types(store: FeatureStore) -> dict[str, str]:
    """Column name -> Arrow type of the first part (every part has the store schema), for manifests."""
    schema = store._files[0].schema_arrow
    return {name: str(schema.field(name).type) for name in schema.names}
