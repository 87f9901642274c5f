"""Stores that need fixing: parts a killed write left unreadable (moved aside on resume, their images redone)
and stores of the first layout (converted by `migrate_store`)."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import fsync_directory, publish_new, write_bytes_atomic
from pipeline.store import (
    LOCK_FILE,
    METADATA_KEY,
    QUARANTINE_DIR,
    STORE_FORMAT,
    FeatureStoreError,
    check_part_schema,
    is_first_format,
    list_parts,
    open_part,
    part_metadata,
    store_schema,
)


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
            check_part_schema(path, parquet_file.schema_arrow)
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
        with open_part(path) as parquet_file:
            schema = parquet_file.schema_arrow
            metadata = part_metadata(path, schema)
            if not is_first_format(schema):
                check_part_schema(path, schema)
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
