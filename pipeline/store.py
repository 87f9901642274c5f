"""Parquet feature store: one row per image, region boxes and features, written in atomic part files.

Why this layout: COCO's 36 x 2048 features are 18-36 GB, far more than training should hold in RAM, and DVC
hashes files, so the store is a directory of tens to hundreds of Parquet parts (never one file per image) with
row groups of a few hundred rows. Readers stream row group by row group and hand out numpy views of the Arrow
buffers; `FeatureStore.to_mmap` converts once to an uncompressed Arrow IPC file that is memory-mapped, so
random access during training costs page cache (reclaimable) rather than anonymous memory.

The columns describe themselves, so pandas, pyarrow and DuckDB read the directory without scan-pipe:
`features` is `list<fixed_size_list<float16|float32, D>>` and `boxes` `list<fixed_size_list<float32, 4>>`,
one fixed-size list per region (`np.stack(row)` is the (n, D) array); the run records beside the parts are
`_`-prefixed, which those readers skip. Stores of the first layout (store_format 1: flat lists reshaped with
`feature_dim` from the metadata) are refused with `StoreFormatError`; `migrate_store` converts them.

`FeatureStore` opens one part at a time and closes it after reading (a store of thousands of parts needs a
handful of descriptors) and keeps the ids as one Arrow string array, not a Python object per image.

Part files are named `part-<shard>-<index:05d>.parquet`. Each writer owns a shard name (one per rank/process),
so several processes can write into one directory; a writer reopened on an existing directory continues
after the highest index of its shard. Parts are written to a hidden temporary file in the same directory,
fsynced, and hard-linked to their name (`pipeline.atomic.publish_new`), which fails rather than replace an
existing file: a killed writer or a power loss leaves either a whole part or nothing, and no part is ever
overwritten (a taken name sends the writer to the next index).

A run that writes a store holds its lock (`store_lock`: `_scan_pipe.lock`, flock); a resuming writer moves
unreadable parts into `_quarantine/` (`quarantine_unreadable_parts`) and redoes their images, while readers
refuse such a part and name it. The underscore names keep Parquet readers and `list_parts` away from both.

Duplicate image ids across parts: the reader refuses them by default (`duplicates="error"`, the message names
the id and both part files), because a duplicate means two runs were mixed into one directory. With
`duplicates="keep_first"` it keeps the first occurrence in part order (parts sorted by shard, then index) and
ignores the later rows, deterministically.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import itertools
import json
import os
import re
import shlex
import socket
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import fsync_directory, publish_new, write_bytes_atomic
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
_MAX_LIST_VALUES = 2**31 - 1


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
_OPTIONAL_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
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


# ------------------------------------------------------------------------------ lock and quarantine (writers)

LOCK_FILE = "_scan_pipe.lock"
QUARANTINE_DIR = "_quarantine"
UNREADABLE_PART_HINT = (
    "a killed or crashed write can truncate a part: rerun `scan-pipe extract` with this folder as --out, "
    f"which moves unreadable parts to {QUARANTINE_DIR}/ and redoes their images"
)


class StoreLockedError(FeatureStoreError):
    """Another run holds the store directory's lock; the message names that run."""


# Descriptors of the store locks this process holds. A forked child (a DataLoader worker) inherits them and
# would keep the lock after its parent is killed; it closes its copies at once, which leaves the parent's
# lock as it is (a flock belongs to the open file and ends when its last descriptor closes).
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock_holder(fd: int) -> str:
    """The run a lock file names, as words for an error message."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except ValueError:
        holder = None
    if not isinstance(holder, dict):
        return "a run that is just starting"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
        f"{holder.get('command')}"
    )


@contextlib.contextmanager
def store_lock(root: str | Path, *, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock of the store directory `root` (created if missing) for one run.

    A second run fails at once with StoreLockedError naming the holder (host, pid, start time, command)
    rather than waiting or mixing its parts and clean-up into a live run. The lock is a `flock` on
    `root/_scan_pipe.lock`, which the operating system releases when the holder ends, killed or not: a
    crash never blocks a rerun. The file holds the holder's JSON while locked and is empty otherwise, so
    the directory's content does not depend on who wrote it last.

    The ranks of one torchrun job are one run: rank 0 takes the lock and the other ranks, which would be
    refused, do not; they wait at a barrier until rank 0 holds it. Yields the holder record.
    """
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(
                f"{root} is in use by another run ({_lock_holder(fd)}); wait for it to end, or write to "
                "another directory"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join((command if command is not None else shlex.join(sys.argv)).split()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder, sort_keys=True).encode(), 0)
        _HELD_LOCKS.add(fd)
        try:
            yield holder
        finally:
            _HELD_LOCKS.discard(fd)
            os.ftruncate(fd, 0)
            if created and [entry.name for entry in os.scandir(root)] == [LOCK_FILE]:
                # A run that made the directory and wrote nothing leaves nothing behind (still locked here).
                os.unlink(root / LOCK_FILE)
                os.rmdir(root)
    finally:
        os.close(fd)  # the last descriptor of the open file: the lock goes with it


@dataclass(frozen=True)
class QuarantinedPart:
    """A part moved out of the store because it cannot be read, where it went, and why."""

    name: str
    moved_to: Path
    reason: str


def part_problem(path: Path) -> str | None:
    """Why the part at `path` cannot be read as a store part (zero bytes, no valid footer, a foreign schema,
    an unreadable image_id column); None when it can."""
    try:
        if path.stat().st_size == 0:
            return "zero bytes"
        with pq.ParquetFile(path) as parquet_file:
            _check_schema(path, parquet_file.schema_arrow)
            parquet_file.read(columns=["image_id"])
    except FeatureStoreError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except PermissionError:
        raise  # not the part's fault: moving it aside would hide the real problem
    except (pa.ArrowException, OSError) as exc:
        return f"not a readable Parquet file: {exc}"
    return None


def quarantine_unreadable_parts(root: str | Path) -> list[QuarantinedPart]:
    """Move every part of `root` that cannot be read into `root/_quarantine/`; the rest of the store opens.

    For a writer resuming the store, while it holds `store_lock`: a power loss, a full disk or an older
    version can leave a truncated part, and moving it aside (its images are then missing, so the resumed run
    redoes them) beats refusing the whole store. Readers never call this: `FeatureStore` refuses such a part
    and names it. A quarantined file of the same name from an earlier run is kept (the new one gets `.1`...).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    folder = root / QUARANTINE_DIR
    moved: list[QuarantinedPart] = []
    for path in list_parts(root):
        reason = part_problem(path)
        if reason is None:
            continue
        folder.mkdir(exist_ok=True)
        for n in itertools.count():
            target = folder / (path.name if n == 0 else f"{path.stem}.{n}{path.suffix}")
            if not target.exists():  # no race: the caller holds the store lock
                break
        os.rename(path, target)
        moved.append(QuarantinedPart(name=path.name, moved_to=target, reason=reason))
    if moved:
        fsync_directory(folder)
        fsync_directory(root)
    return moved


class FeatureStoreWriter:
    """Buffers `RegionRecord`s and writes them as atomic, durable Parquet parts of `rows_per_part` rows.

    Use as a context manager; `close()` flushes the last, possibly shorter, part. Several writers may share a
    directory (one shard name each keeps the numbering tidy); a writer on a directory that already has parts
    of its shard continues numbering after them, and a part is never replaced, whatever the shard names.
    The writer takes no lock: a run that plans from the store's content holds `store_lock` around it.
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
        payload["store_format"] = STORE_FORMAT  # the layout these parts have, whatever the caller passed
        return json.dumps(payload, sort_keys=True).encode()

    def _build_table(self, records: Sequence[RegionRecord]) -> pa.Table:
        counts = np.array([r.num_boxes for r in records], dtype=np.int64)
        dim = self.feature_dim or 0
        if int(counts.sum()) * dim >= _MAX_LIST_VALUES:
            raise ValueError(
                f"part too large for int32 list offsets ({int(counts.sum())} regions x {dim}); "
                "lower rows_per_part"
            )

        region_offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), type=pa.int32())

        def region_list(values: list[np.ndarray], width: int, arrow_type: pa.DataType) -> pa.Array:
            # One fixed-size list per region; the list offsets count regions. The records are validated:
            # their arrays already have the column's dtype.
            flat = pa.array(np.concatenate([v.reshape(-1) for v in values]), type=arrow_type)
            return pa.ListArray.from_arrays(region_offsets, pa.FixedSizeListArray.from_arrays(flat, width))

        columns: dict[str, pa.Array] = {
            "image_id": pa.array([r.image_id for r in records], type=pa.string()),
            "image_w": pa.array([r.image_w for r in records], type=pa.int32()),
            "image_h": pa.array([r.image_h for r in records], type=pa.int32()),
            "num_boxes": pa.array(counts.astype(np.int32), type=pa.int32()),
            "boxes": region_list([r.boxes for r in records], 4, pa.float32()),
            "features": region_list([r.features for r in records], dim, arrow_float_type(self.feature_dtype)),
        }
        for name, arrow_type in _OPTIONAL_COLUMNS:
            values = [getattr(r, name) for r in records]
            if all(v is None for v in values):
                columns[name] = pa.nulls(len(records), type=pa.list_(arrow_type))
            else:
                columns[name] = pa.array(values, type=pa.list_(arrow_type))
        schema = store_schema(self.feature_dtype, dim).with_metadata({METADATA_KEY: self._metadata_json()})
        return pa.Table.from_pydict(columns, schema=schema)

    def flush(self) -> None:
        """Write the buffered records as one new part (no-op when the buffer is empty).

        The rows count as written only once the part is fsynced and linked to a name no file had
        (`publish_new`); when another writer takes the name first, the part goes to the next index.
        """
        if not self._buffer:
            return
        table = self._build_table(self._buffer)
        while True:
            while (self.root / part_name(self.shard, self._next_index)).exists():
                self._next_index += 1  # a part of this shard appeared meanwhile: never overwrite one
            target = self.root / part_name(self.shard, self._next_index)
            try:
                with publish_new(target) as tmp_path:
                    pq.write_table(
                        table,
                        tmp_path,
                        row_group_size=self.row_group_size,
                        use_dictionary=["image_id"],
                        write_statistics=["image_id", "image_w", "image_h", "num_boxes"],
                        compression=self.compression,
                    )
                break
            except FileExistsError:
                if not target.exists():
                    raise
                self._next_index += 1  # taken between the check and the link: write it again, one further
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
        for name, _ in _OPTIONAL_COLUMNS
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


def _part_metadata(path: Path, schema: pa.Schema) -> dict[str, Any]:
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


def _is_first_format(schema: pa.Schema) -> bool:
    """Store format 1 kept features and boxes as flat lists (`list<float>`), reshaped with feature_dim."""
    if "features" not in schema.names:
        return False
    features = schema.field("features").type
    return pa.types.is_list(features) and pa.types.is_floating(features.value_type)


def _check_schema(path: Path, schema: pa.Schema) -> dict[str, Any]:
    """Validate one part's schema; return its `scan_pipe` metadata."""
    metadata = _part_metadata(path, schema)
    if _is_first_format(schema):
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


def _open_part(path: Path) -> pq.ParquetFile:
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
        with _open_part(self.parts[0]) as first:
            self.schema: pa.Schema = first.schema_arrow
        self.metadata: dict[str, Any] = _check_schema(self.parts[0], self.schema)
        self.feature_dim: int = int(self.metadata["feature_dim"])
        self.feature_dtype: str = str(self.metadata["feature_dtype"])
        self._load_ids(duplicates)

    def _check_part(self, path: Path, schema: pa.Schema) -> None:
        """A part agrees with the first one (D and dtype are in the column types: one comparison)."""
        if schema.equals(self.schema) and METADATA_KEY in (schema.metadata or {}):
            return
        metadata = _check_schema(path, schema)
        for key in ("feature_dim", "feature_dtype"):
            if metadata[key] != self.metadata[key]:
                raise FeatureStoreError(
                    f"{path}: {key} {metadata[key]!r} differs from {self.metadata[key]!r} in {self.parts[0]}"
                )

    def _load_ids(self, duplicates: DuplicatePolicy) -> None:
        chunks: list[pa.Array] = []
        counts: list[int] = []
        for path in self.parts:
            with _open_part(path) as parquet_file:
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
            with _open_part(path) as parquet_file:
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
            with _open_part(self.parts[part_index]) as parquet_file:
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


# --------------------------------------------------------------------------- migration from store format 1

# What a first-format run left beside its parts, and the names plain Parquet readers skip.
_FIRST_FORMAT_RUN_RECORDS = {"errors.jsonl": "_errors.jsonl", "summary.json": "_summary.json"}


@dataclass(frozen=True)
class MigrationResult:
    """What `migrate_store` wrote, and the files of the old directory it left where they are."""

    images: int
    parts: int
    left_behind: list[str]


def _regions_from_flat(column: pa.ChunkedArray, width: int, path: Path, name: str) -> pa.Array:
    """A first-format flat list column (n*width values per row) as one fixed-size list per region."""
    array = column.combine_chunks()
    offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    counts = np.diff(offsets)
    if width == 0 or np.any(counts % width):
        raise FeatureStoreError(f"{path}: column {name!r} has rows that are not whole regions of {width}")
    region_offsets = pa.array(((offsets - offsets[0]) // width).astype(np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(region_offsets, pa.FixedSizeListArray.from_arrays(array.flatten(), width))


def migrate_store(old_root: str | Path, new_root: str | Path) -> MigrationResult:
    """Rewrite a first-format store (flat lists) in the current layout under `new_root`, part by part.

    Column data is reinterpreted, not recomputed: the same part names, row groups and values, one part in
    memory at a time. `errors.jsonl` and `summary.json` are copied under their new `_` names; any other file
    is left behind and listed (e.g. an imported `captions.parquet`, which belongs outside the store).
    """
    old_root, new_root = Path(old_root), Path(new_root)
    if not old_root.is_dir():
        raise FeatureStoreError(f"{old_root}: feature store directory not found")
    parts = list_parts(old_root)
    if not parts:
        raise FeatureStoreError(f"{old_root}: no part files (part-<shard>-<index>.parquet) to migrate")
    if new_root.resolve() == old_root.resolve():
        raise FeatureStoreError(f"{new_root}: migrate into another directory, not the store itself")
    if new_root.is_dir() and any(new_root.iterdir()):
        raise FeatureStoreError(f"{new_root}: not empty; migrate into a new directory")
    images = 0
    for path in parts:
        with _open_part(path) as parquet_file:
            schema = parquet_file.schema_arrow
            metadata = _part_metadata(path, schema)
            if not _is_first_format(schema):
                _check_schema(path, schema)
                raise FeatureStoreError(f"{path}: already in the current layout; nothing to migrate")
            row_group_size = parquet_file.metadata.row_group(0).num_rows if parquet_file.num_row_groups else 1
            table = parquet_file.read()
        dim, dtype = int(metadata["feature_dim"]), metadata["feature_dtype"]
        metadata["store_format"] = STORE_FORMAT
        target_schema = store_schema(dtype, dim).with_metadata(
            {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        )
        columns = {name: table.column(name) for name in target_schema.names}
        columns["boxes"] = _regions_from_flat(table.column("boxes"), 4, path, "boxes")
        columns["features"] = _regions_from_flat(table.column("features"), dim, path, "features")
        migrated = pa.Table.from_pydict(columns, schema=target_schema)
        with publish_new(new_root / path.name) as tmp_path:
            pq.write_table(
                migrated,
                tmp_path,
                row_group_size=row_group_size,
                use_dictionary=["image_id"],
                write_statistics=["image_id", "image_w", "image_h", "num_boxes"],
                compression="lz4",
            )
        images += migrated.num_rows
    part_names = {path.name for path in parts}
    left_behind = []
    for entry in sorted(old_root.iterdir()):
        if entry.name in part_names:
            continue
        if entry.name in _FIRST_FORMAT_RUN_RECORDS and entry.is_file():
            write_bytes_atomic(new_root / _FIRST_FORMAT_RUN_RECORDS[entry.name], entry.read_bytes())
        elif not entry.name.startswith(".") and entry.name != LOCK_FILE:
            left_behind.append(entry.name)
    return MigrationResult(images=images, parts=len(parts), left_behind=left_behind)
