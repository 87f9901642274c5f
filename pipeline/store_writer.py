"""`FeatureStoreWriter`: buffers region records and publishes them as atomic, durable, never-overwritten
parts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import publish_new
from pipeline.store import (
    ARRAY_DTYPES,
    FEATURE_DTYPES,
    MAX_LIST_VALUES,
    METADATA_KEY,
    OPTIONAL_COLUMNS,
    PART_PATTERN,
    SHARD_PATTERN,
    STORE_FORMAT,
    FeatureDtype,
    RegionRecord,
    arrow_float_type,
    list_parts,
    part_name,
    store_schema,
)


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
        if int(counts.sum()) * dim >= MAX_LIST_VALUES:
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
        for name, arrow_type in OPTIONAL_COLUMNS:
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
