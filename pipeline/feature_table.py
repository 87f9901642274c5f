"""The training-time view of a feature store: a memory-mapped Arrow IPC file with random access by row.

Why a second copy on disk: training draws images in random order, and Parquet decodes whole (compressed,
encoded) column chunks, so one image read straight from the store costs the decode of its row group
(`benchmarks/store_scale.py` measures both: milliseconds per image from Parquet, microseconds from the map).
The IPC file holds the same columns uncompressed, so `features(idx)` is a view into the page cache at
memory speed. It is a cache, keyed by the store's path and part fingerprint (`SCAN_PIPE_CACHE_DIR`, see
`pipeline.loaders.default_cache_dir`): rebuilt when a part changes, safe to delete, about the store's size.

Nothing in it grows per row in a process's own memory: beside the table, an index file holds every image id
as one Arrow string array plus the ids' sorted order, both memory-mapped, so `index_of` is a binary search
and `indices_of` one hash pass; record batches are looked up on first touch. Opening the table, as every
DataLoader worker does (it pickles as its path), reads two file footers.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.atomic import atomic_output
from pipeline.progress import progress_bar
from pipeline.store import (
    METADATA_KEY,
    DuplicatePolicy,
    FeatureStore,
    FeatureStoreError,
    list_parts,
    lookup_positions,
    parts_fingerprint,
    region_arrays,
)

# Rows are grouped into IPC record batches of about this size: few batches (little per-batch state to look
# up), while the build holds only one batch in memory.
CACHE_BATCH_BYTES = 64 << 20
_INDEX_KEY = b"scan_pipe_index"
_TABLE_COLUMNS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# Below this many asked ids a binary search each beats one hash pass over all stored ids.
_FEW_IDS = 64


def _store_key(root: Path) -> str:
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def cache_path(root: str | Path, parts: Sequence[Path], cache_dir: str | Path) -> Path:
    """Where the table of the store at `root` with these parts lives in `cache_dir`."""
    root = Path(root)
    return Path(cache_dir) / f"regions-{_store_key(root)}-{parts_fingerprint(parts)[:16]}.arrow"


def index_path(table_path: str | Path) -> Path:
    """The id index beside a table file."""
    table_path = Path(table_path)
    return table_path.with_name(table_path.name.removesuffix(".arrow") + ".index.arrow")


def cached_feature_table(
    features_dir: str | Path,
    cache_dir: str | Path,
    *,
    duplicates: DuplicatePolicy = "error",
    progress: bool = False,
) -> RegionFeatureTable:
    """The table of the store at `features_dir`: straight from the cache while its parts are unchanged (the
    parts are listed and stat'ed, none is opened), else converted once through `FeatureStore`."""
    root = Path(features_dir)
    parts = list_parts(root) if root.is_dir() else []
    if parts:
        target = cache_path(root, parts, cache_dir)
        if target.is_file() and index_path(target).is_file():
            table = RegionFeatureTable(target)
            if duplicates == "keep_first" or table.duplicates_dropped == 0:
                return table
    # Opening the store validates it; under duplicates="error" a store with duplicates fails here, by name.
    return FeatureStore(root, duplicates=duplicates).to_mmap(cache_dir, progress=progress)


def build_feature_table(
    store: FeatureStore, cache_dir: str | Path, *, progress: bool = False
) -> RegionFeatureTable:
    """The memory-mapped table of `store`, converted once and cached in `cache_dir`.

    The cache file name carries a key of the store's path and a fingerprint of its parts; a stale cache of
    the same store is rebuilt (atomically) and the old files removed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_path(store.root, store.parts, cache_dir)
    index = index_path(target)
    if not (target.is_file() and index.is_file()):
        _write_table(store, target, index, progress=progress)
        for stale in cache_dir.glob(f"regions-{_store_key(store.root)}-*.arrow"):
            if stale not in (target, index):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
    return RegionFeatureTable(target)


def _write_table(store: FeatureStore, target: Path, index: Path, *, progress: bool) -> None:
    """The table (store columns in store order, batches of ~CACHE_BATCH_BYTES), then its id index."""
    schema = pa.schema(
        [store.schema.field(name) for name in _TABLE_COLUMNS],
        metadata={METADATA_KEY: json.dumps(store.metadata, sort_keys=True).encode()},
    )
    batch_rows: list[int] = []
    ids: list[pa.Array] = []
    pending: list[pa.RecordBatch] = []
    pending_bytes = 0
    with (
        atomic_output(target) as tmp_path,
        pa.OSFile(str(tmp_path), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
        progress_bar("images", disable=not progress) as bar,
    ):

        def write_pending() -> None:
            if pending:
                combined = pa.Table.from_batches(pending, schema).combine_chunks()
                for batch in combined.to_batches():
                    writer.write_batch(batch)
                    batch_rows.append(batch.num_rows)
                pending.clear()

        task = bar.add_task("memory-map features", total=len(store))
        for batch in store.iter_batches(batch_rows=1024):
            bar.update(task, advance=batch.num_rows)
            selected = pa.RecordBatch.from_arrays(batch.select(schema.names).columns, schema=schema)
            ids.append(selected.column("image_id").cast(pa.large_string()))
            pending.append(selected)
            pending_bytes += selected.nbytes
            if pending_bytes >= CACHE_BATCH_BYTES:
                write_pending()
                pending_bytes = 0
        write_pending()
    all_ids = pa.concat_arrays(ids) if ids else pa.array([], type=pa.large_string())
    info = {"batch_rows": batch_rows, "duplicates_dropped": store.duplicates_dropped}
    index_schema = pa.schema(
        [pa.field("image_id", pa.large_string(), nullable=False), pa.field("sorted_row", pa.int64())],
        metadata={_INDEX_KEY: json.dumps(info).encode()},
    )
    sorted_rows = pc.array_sort_indices(all_ids).cast(pa.int64())
    with (
        atomic_output(index) as tmp_path,
        pa.OSFile(str(tmp_path), "wb") as sink,
        pa.ipc.new_file(sink, index_schema) as writer,
    ):
        writer.write_batch(pa.RecordBatch.from_arrays([all_ids, sorted_rows], schema=index_schema))


class _Batch(NamedTuple):
    """Views of one record batch of the map."""

    feature_offsets: np.ndarray
    features: np.ndarray  # (regions, D)
    box_offsets: np.ndarray
    boxes: np.ndarray  # (regions, 4)
    num_boxes: np.ndarray
    image_w: np.ndarray
    image_h: np.ndarray


class RegionFeatureTable:
    """Random access to region features through a memory-mapped Arrow IPC file and its id index.

    `features(idx)` returns a read-only (n, D) view into the map: no copy and no anonymous memory, the OS page
    cache holds what was touched. Pickles as its path, so DataLoader workers reopen the map themselves.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_file = index_path(self.path)
        for required in (self.path, index_file):
            if not required.is_file():
                raise FeatureStoreError(f"{required}: memory-mapped feature table not found")
        try:
            self._source = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._source)
            self._index_source = pa.memory_map(str(index_file), "r")
            index_reader = pa.ipc.open_file(self._index_source)
            index = index_reader.get_batch(0)
            info = json.loads((index_reader.schema.metadata or {})[_INDEX_KEY])
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            raise FeatureStoreError(
                f"{self.path}: not a readable feature table ({exc}); delete it and its index to rebuild"
            ) from exc
        self.metadata: dict[str, Any] = json.loads(
            (self._reader.schema.metadata or {}).get(METADATA_KEY, b"{}")
        )
        self.feature_dim = int(self.metadata["feature_dim"])
        self.feature_dtype = str(self.metadata["feature_dtype"])
        self.duplicates_dropped = int(info.get("duplicates_dropped", 0))
        self._ids: pa.Array = index.column("image_id")
        self._sorted_rows = index.column("sorted_row").to_numpy()
        _, offsets, data = self._ids.buffers()
        if offsets is None:  # an empty array may have no offsets buffer
            self._id_offsets = np.zeros(1, dtype=np.int64)
        else:
            self._id_offsets = np.frombuffer(offsets, dtype=np.int64)[
                self._ids.offset : self._ids.offset + len(self._ids) + 1
            ]
        self._id_data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        self._batch_starts = np.concatenate([[0], np.cumsum(info["batch_rows"])]).astype(np.int64)
        self._batches: dict[int, _Batch] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def image_ids(self) -> list[str]:
        """Every image id in row order as Python strings, built on each call (tests, small tables)."""
        return self._ids.to_pylist()

    def _id_bytes(self, row: int) -> bytes:
        return self._id_data[self._id_offsets[row] : self._id_offsets[row + 1]].tobytes()

    def image_id(self, idx: int) -> str:
        """The image id of row `idx`."""
        return self._id_bytes(self._locate_row(idx)).decode("utf-8")

    def index_of(self, image_id: str) -> int:
        """Row index of an image id (KeyError naming the id when absent): a binary search of the mapped ids.

        Arrow sorts strings by their UTF-8 bytes, which is how Python compares the `bytes` searched here.
        """
        key = image_id.encode("utf-8")
        at = bisect.bisect_left(self._sorted_rows, key, key=self._id_bytes)
        if at < len(self._sorted_rows) and self._id_bytes(self._sorted_rows[at]) == key:
            return int(self._sorted_rows[at])
        raise KeyError(f"{self.path}: image id {image_id!r} not in the feature table")

    def indices_of(self, image_ids: Iterable[str]) -> np.ndarray:
        """Row index of each id (int64, -1 where absent); many ids at once by one hash pass over the map."""
        wanted = list(image_ids)
        if len(wanted) > _FEW_IDS:
            return lookup_positions(self._ids, wanted)
        rows = np.empty(len(wanted), dtype=np.int64)
        for slot, image_id in enumerate(wanted):
            try:
                rows[slot] = self.index_of(image_id)
            except KeyError:
                rows[slot] = -1
        return rows

    def _locate_row(self, idx: int) -> int:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"row {idx} out of range for a table of {len(self)} images")
        return idx % len(self)

    def _locate(self, idx: int) -> tuple[_Batch, int]:
        idx = self._locate_row(idx)
        k = int(np.searchsorted(self._batch_starts, idx, side="right")) - 1
        batch = self._batches.get(k)
        if batch is None:
            record_batch = self._reader.get_batch(k)
            feature_offsets, features = region_arrays(record_batch.column("features"))
            box_offsets, boxes = region_arrays(record_batch.column("boxes"))
            batch = _Batch(
                feature_offsets,
                features,
                box_offsets,
                boxes,
                record_batch.column("num_boxes").to_numpy(),
                record_batch.column("image_w").to_numpy(),
                record_batch.column("image_h").to_numpy(),
            )
            self._batches[k] = batch
        return batch, idx - int(self._batch_starts[k])

    def num_boxes(self, idx: int) -> int:
        """Number of regions of row `idx`."""
        batch, row = self._locate(idx)
        return int(batch.num_boxes[row])

    def image_size(self, idx: int) -> tuple[int, int]:
        """(image_w, image_h) of row `idx`."""
        batch, row = self._locate(idx)
        return int(batch.image_w[row]), int(batch.image_h[row])

    def features(self, idx: int) -> np.ndarray:
        """(n, D) features of row `idx`: a read-only view into the memory map, in the stored dtype."""
        batch, row = self._locate(idx)
        return batch.features[batch.feature_offsets[row] : batch.feature_offsets[row + 1]]

    def boxes(self, idx: int) -> np.ndarray:
        """(n, 4) boxes of row `idx`, a read-only view."""
        batch, row = self._locate(idx)
        return batch.boxes[batch.box_offsets[row] : batch.box_offsets[row + 1]]

    def gather(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of several rows, zero-padded: ((B, max_n, D) float32, (B,) int64 lengths)."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        lengths = np.array([self.num_boxes(i) for i in indices], dtype=np.int64)
        max_n = int(lengths.max()) if len(indices) else 0
        padded = np.zeros((len(indices), max_n, self.feature_dim), dtype=np.float32)
        for slot, idx in enumerate(indices):
            padded[slot, : lengths[slot]] = self.features(idx)
        return padded, lengths
