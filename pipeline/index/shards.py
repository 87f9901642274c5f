"""Embedding shards: the encoders' outputs of every indexed item as float16, one directory per N items.

Why shards: encoding a large gallery takes hours, so the build writes one shard directory per `shard_size`
items, each atomically (written under a hidden name, fsynced, renamed into place): a killed build leaves
whole shards or none, and the next run starts at the first missing one. Each shard holds

    embeddings.npy   (rows, d) float16: the valid rows of its items, item after item (regions of an image,
                     words of a caption; one row per item for global embeddings)
    lengths.npy      (n,) int32: rows per item
    items.json       {"ids": [...]} (image ids), plus "captions": [...] for caption shards

`.npy` so that any numpy reads them; memory-mapped on search, so a query touches only the rows it gathers.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_output, fsync_file, replace_directory

EMBEDDINGS_FILE = "embeddings.npy"
LENGTHS_FILE = "lengths.npy"
ITEMS_FILE = "items.json"


def shard_dir(root: str | Path, shard: int) -> Path:
    """The directory of shard number `shard` under a shard set's root."""
    return Path(root) / f"shard-{shard:05d}"


def shard_count(items: int, shard_size: int) -> int:
    """Shards needed for `items` items."""
    return math.ceil(items / shard_size) if items else 0


def shard_exists(root: str | Path, shard: int) -> bool:
    """Whether a shard was completely written (a directory appears only by its final rename)."""
    return shard_dir(root, shard).is_dir()


def write_shard(
    root: str | Path,
    shard: int,
    embeddings: np.ndarray,
    lengths: np.ndarray,
    items: dict[str, Sequence[str]],
) -> Path:
    """Write one shard atomically: its files go to a hidden staging directory, fsynced, then renamed."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float16)
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    if embeddings.ndim != 2 or int(lengths.sum()) != embeddings.shape[0]:
        raise ValueError(f"shard {shard}: {embeddings.shape} embeddings, lengths sum to {lengths.sum()}")
    destination = shard_dir(root, shard)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        np.save(staging / EMBEDDINGS_FILE, embeddings)
        np.save(staging / LENGTHS_FILE, lengths)
        (staging / ITEMS_FILE).write_text(json.dumps({key: list(value) for key, value in items.items()}))
        for name in (EMBEDDINGS_FILE, LENGTHS_FILE, ITEMS_FILE):
            fsync_file(staging / name)
        replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def save_array(path: Path, array: np.ndarray) -> Path:
    """`np.save` atomically (a killed build never leaves a truncated array under the final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp_path, tmp_path.open("wb") as handle:
        np.save(handle, array)
    return path


def arrays_per_shard(
    num_shards: int,
    path_of: Callable[[int], Path],
    compute: Callable[[int], np.ndarray],
    on_shard: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Each shard's array: read back where a killed build saved it, else computed and saved (the resume)."""
    parts: list[np.ndarray] = []
    for shard in range(num_shards):
        path = path_of(shard)
        if path.is_file():
            parts.append(np.load(path))
        else:
            parts.append(compute(shard))
            save_array(path, parts[-1])
        if on_shard is not None:
            on_shard(shard)
    return parts


def remove_stale_staging(root: str | Path) -> None:
    """Staging directories a killed build left behind (never renamed, so never read)."""
    root = Path(root)
    if root.is_dir():
        for stale in root.glob(".shard-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


class ShardSet:
    """Read access to the shards of `count` items: lengths up front, embeddings memory-mapped on first use."""

    def __init__(self, root: str | Path, count: int, shard_size: int) -> None:
        self.root = Path(root)
        self.count = count
        self.shard_size = shard_size
        self.num_shards = shard_count(count, shard_size)
        parts = [np.load(shard_dir(self.root, s) / LENGTHS_FILE) for s in range(self.num_shards)]
        self.lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if len(self.lengths) != count:
            raise ValueError(f"{self.root}: shards hold {len(self.lengths)} items, expected {count}")
        # Row offset of each item inside its own shard's embeddings.
        self._local_start = np.zeros(count, dtype=np.int64)
        for s in range(self.num_shards):
            lo, hi = s * shard_size, min((s + 1) * shard_size, count)
            self._local_start[lo:hi] = np.concatenate([[0], np.cumsum(self.lengths[lo:hi])[:-1]])
        self._maps: dict[int, np.ndarray] = {}
        self._items: dict[int, dict[str, Any]] = {}

    @property
    def max_length(self) -> int:
        """The most rows any item has (regions per image, words per caption)."""
        return int(self.lengths.max()) if self.count else 0

    def embeddings(self, shard: int) -> np.ndarray:
        """Shard `shard`'s (rows, d) float16 embeddings, memory-mapped."""
        mapped = self._maps.get(shard)
        if mapped is None:
            mapped = np.load(shard_dir(self.root, shard) / EMBEDDINGS_FILE, mmap_mode="r")
            self._maps[shard] = mapped
        return mapped

    def items(self, shard: int) -> dict[str, Any]:
        """Shard `shard`'s items.json."""
        found = self._items.get(shard)
        if found is None:
            found = json.loads((shard_dir(self.root, shard) / ITEMS_FILE).read_text())
            self._items[shard] = found
        return found

    def item_field(self, name: str, positions: Sequence[int] | np.ndarray) -> list[str]:
        """Field `name` (`ids`, `captions`) of the items at global `positions`."""
        return [
            self.items(int(p) // self.shard_size)[name][int(p) % self.shard_size]
            for p in np.asarray(positions).reshape(-1)
        ]

    def rows(self, position: int) -> np.ndarray:
        """The (n, d) float16 rows of the item at global `position` (a view of the map)."""
        shard = position // self.shard_size
        start = int(self._local_start[position])
        return self.embeddings(shard)[start : start + int(self.lengths[position])]

    def gather(self, positions: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items at `positions` zero-padded: ((n, max_rows, d) float32, (n,) int64 lengths)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        lengths = self.lengths[positions]
        longest = int(lengths.max()) if len(positions) else 0
        dim = self.embeddings(0).shape[1] if self.num_shards else 0
        out = np.zeros((len(positions), longest, dim), dtype=np.float32)
        for slot, position in enumerate(positions):
            out[slot, : lengths[slot]] = self.rows(int(position))
        return out, lengths

    def sample_rows(self, count: int, seed: int) -> np.ndarray:
        """`count` rows drawn uniformly without replacement over every shard, as float32 (k-means input)."""
        total = int(self.lengths.sum())
        count = min(count, total)
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
        shard_rows = [self.embeddings(s).shape[0] for s in range(self.num_shards)]
        starts = np.concatenate([[0], np.cumsum(shard_rows)])
        out = np.empty((count, self.embeddings(0).shape[1] if count else 0), dtype=np.float32)
        for s in range(self.num_shards):
            lo, hi = np.searchsorted(chosen, [starts[s], starts[s + 1]])
            if hi > lo:
                out[lo:hi] = self.embeddings(s)[chosen[lo:hi] - starts[s]]
        return out
