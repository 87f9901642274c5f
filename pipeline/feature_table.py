"""The training-time view of a feature store: one memory-mapped Arrow IPC file with random access by row.

Parquet is the store's durable, streaming format; training and evaluation need random access to any image's
regions without holding them in memory, so the store is converted once into an Arrow IPC file (cached by
the store's path and part fingerprint) that the OS pages in on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.atomic import atomic_output
from pipeline.progress import progress_bar
from pipeline.store import (
    METADATA_KEY,
    FeatureStore,
    FeatureStoreError,
    arrow_float_type,
    list_offsets_values,
)


def build_feature_table(
    store: FeatureStore, cache_dir: str | Path, *, progress: bool = False
) -> RegionFeatureTable:
    """The memory-mapped table of `store`, converted once and cached in `cache_dir`.

    The cache file name carries a key of the store's path and a fingerprint of its parts; a stale cache of
    the same store is rebuilt (atomically) and the old file removed.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    store_key = hashlib.sha256(str(store.root.resolve()).encode()).hexdigest()[:12]
    target = cache_dir / f"regions-{store_key}-{store.fingerprint()[:16]}.arrow"
    if not target.exists():
        schema = pa.schema(
            [
                pa.field("image_id", pa.string(), nullable=False),
                pa.field("image_w", pa.int32(), nullable=False),
                pa.field("image_h", pa.int32(), nullable=False),
                pa.field("num_boxes", pa.int32(), nullable=False),
                pa.field("boxes", pa.list_(pa.float32()), nullable=False),
                pa.field("features", pa.list_(arrow_float_type(store.feature_dtype)), nullable=False),
            ],
            metadata={METADATA_KEY: json.dumps(store.metadata, sort_keys=True).encode()},
        )
        with (
            atomic_output(target) as tmp_path,
            pa.OSFile(str(tmp_path), "wb") as sink,
            pa.ipc.new_file(sink, schema) as writer,
            progress_bar("images", disable=not progress) as bar,
        ):
            task = bar.add_task("memory-map features", total=len(store))
            for batch in store.iter_batches(batch_rows=256):
                bar.update(task, advance=batch.num_rows)
                writer.write_batch(
                    pa.RecordBatch.from_arrays(batch.select(schema.names).columns, schema=schema)
                )
        for stale in cache_dir.glob(f"regions-{store_key}-*.arrow"):
            if stale != target:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
    return RegionFeatureTable(target)


class RegionFeatureTable:
    """Random access to region features through a memory-mapped Arrow IPC file.

    `features(idx)` returns a read-only (n, D) view into the map: no copy and no anonymous memory, the OS page
    cache holds what was touched. Pickles as its path, so DataLoader workers reopen the map themselves.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureStoreError(f"{self.path}: memory-mapped feature table not found")
        try:
            self._source = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._source)
        except (pa.ArrowException, OSError) as exc:
            raise FeatureStoreError(f"{self.path}: not a readable Arrow IPC file: {exc}") from exc
        metadata = json.loads((reader.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        self.metadata: dict[str, Any] = metadata
        self.feature_dim = int(metadata["feature_dim"])
        self.feature_dtype = str(metadata["feature_dtype"])
        self._feature_offsets: list[np.ndarray] = []
        self._feature_values: list[np.ndarray] = []
        self._box_offsets: list[np.ndarray] = []
        self._box_values: list[np.ndarray] = []
        image_ids: list[str] = []
        num_boxes: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        batch_rows: list[int] = []
        for k in range(reader.num_record_batches):
            batch = reader.get_batch(k)
            feat_offsets, feat_values = list_offsets_values(batch.column("features"))
            box_offsets, box_values = list_offsets_values(batch.column("boxes"))
            self._feature_offsets.append(feat_offsets)
            self._feature_values.append(feat_values)
            self._box_offsets.append(box_offsets)
            self._box_values.append(box_values)
            image_ids.extend(batch.column("image_id").to_pylist())
            num_boxes.append(batch.column("num_boxes").to_numpy())
            sizes.append(
                np.stack([batch.column("image_w").to_numpy(), batch.column("image_h").to_numpy()], 1)
            )
            batch_rows.append(batch.num_rows)
        self.image_ids: list[str] = image_ids
        self._num_boxes = np.concatenate(num_boxes) if num_boxes else np.zeros(0, dtype=np.int32)
        self._sizes = np.concatenate(sizes) if sizes else np.zeros((0, 2), dtype=np.int32)
        self._batch_starts = np.concatenate([[0], np.cumsum(batch_rows)]).astype(np.int64)
        self._index = {image_id: i for i, image_id in enumerate(image_ids)}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: str) -> int:
        """Row index of an image id (KeyError naming the id when absent)."""
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"{self.path}: image id {image_id!r} not in the feature table") from None

    def _locate(self, idx: int) -> tuple[int, int]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"row {idx} out of range for a table of {len(self)} images")
        idx %= len(self)
        batch = int(np.searchsorted(self._batch_starts, idx, side="right") - 1)
        return batch, idx - int(self._batch_starts[batch])

    def num_boxes(self, idx: int) -> int:
        """Number of regions of row `idx`."""
        return int(self._num_boxes[idx])

    def image_size(self, idx: int) -> tuple[int, int]:
        """(image_w, image_h) of row `idx`."""
        width, height = self._sizes[idx]
        return int(width), int(height)

    def features(self, idx: int) -> np.ndarray:
        """(n, D) features of row `idx`: a read-only view into the memory map, in the stored dtype."""
        batch, row = self._locate(idx)
        offsets = self._feature_offsets[batch]
        return self._feature_values[batch][offsets[row] : offsets[row + 1]].reshape(-1, self.feature_dim)

    def boxes(self, idx: int) -> np.ndarray:
        """(n, 4) boxes of row `idx`, a read-only view."""
        batch, row = self._locate(idx)
        offsets = self._box_offsets[batch]
        return self._box_values[batch][offsets[row] : offsets[row + 1]].reshape(-1, 4)

    def gather(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of several rows, zero-padded: ((B, max_n, D) float32, (B,) int64 lengths)."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        lengths = np.array([self.num_boxes(i) for i in indices], dtype=np.int64)
        max_n = int(lengths.max()) if len(indices) else 0
        padded = np.zeros((len(indices), max_n, self.feature_dim), dtype=np.float32)
        for slot, idx in enumerate(indices):
            padded[slot, : lengths[slot]] = self.features(idx)
        return padded, lengths
