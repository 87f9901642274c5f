"""Open a built index for search: check it is complete, non-empty and fits the checkpoint and store.

The checkpoint and store default to the folders recorded at build time; either can be given explicitly
(a moved folder), and either way its identity must match the recorded one, else the error names both. The
store is optional for a SCAN text search (it only supplies boxes for the page): when its recorded folder is
gone and none is given, results come without boxes and say so.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.checkpoint import CheckpointInfo, read_checkpoint_info
from pipeline.index.build import CAPTIONS, GLOBAL_DIR, IMAGES
from pipeline.index.globals import GlobalIndex, index_file
from pipeline.index.meta import (
    IndexMeta,
    SearchIndexError,
    check_checkpoint,
    check_store,
    checkpoint_identity,
    read_meta,
    store_identity,
)
from pipeline.index.shards import ShardSet
from pipeline.index.tokens import TOKENS_DIR, CaptionTokenCodes, ImageTokenLists
from pipeline.store import FeatureStore


class SearchIndex:
    """A complete index directory with its checked checkpoint and (when reachable) feature store."""

    def __init__(self, root: Path, meta: IndexMeta, info: CheckpointInfo, features: Path | None) -> None:
        self.root = root
        self.meta = meta
        self.info = info
        self.features = features  # None: the store is not reachable (boxes unavailable)
        self._global_indexes: dict[str, GlobalIndex] = {}

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        checkpoint: str | Path | None = None,
        features: str | Path | None = None,
    ) -> SearchIndex:
        """Read and check `index_dir` (see the module docstring)."""
        root = Path(index_dir)
        meta = read_meta(root)
        if not meta.complete:
            raise SearchIndexError(
                f"{root}: index build did not finish; rerun `scan-pipe index build` with the same options "
                "to resume it"
            )
        if meta.num_images == 0:
            raise SearchIndexError(f"{root}: index holds no images (built from an empty feature store)")
        checkpoint_path = Path(checkpoint) if checkpoint is not None else Path(meta.checkpoint.path)
        if checkpoint is None and not checkpoint_path.exists():
            raise SearchIndexError(
                f"{root}: {meta.checkpoint.describe()} recorded at build time is gone; pass its new folder"
            )
        info = read_checkpoint_info(checkpoint_path)
        check_checkpoint(meta, checkpoint_identity(info), root)
        store_path = Path(features) if features is not None else Path(meta.features.path)
        if features is not None and not store_path.is_dir():
            raise SearchIndexError(f"{features}: feature store directory not found")
        store: Path | None = None
        if store_path.is_dir():
            check_store(meta, store_identity(store_path), root)
            store = store_path
        return cls(root, meta, info, store)

    @property
    def kind(self) -> str:
        """`tokens` (SCAN) or `global` (MMCA)."""
        return self.meta.kind

    @cached_property
    def images(self) -> ShardSet:
        """The image embedding shards."""
        return ShardSet(self.root / IMAGES, self.meta.num_images, self.meta.shard_size)

    @cached_property
    def captions(self) -> ShardSet:
        """The caption embedding shards (an error when the index was built without captions)."""
        if not self.meta.num_captions:
            raise SearchIndexError(
                f"{self.root}: index holds no captions to search; rebuild it with --captions FILE"
            )
        return ShardSet(self.root / CAPTIONS, self.meta.num_captions, self.meta.shard_size)

    @cached_property
    def image_lists(self) -> ImageTokenLists:
        """SCAN: centroids, region codes and inverted lists of the images."""
        return ImageTokenLists(self.root / TOKENS_DIR)

    @cached_property
    def caption_codes(self) -> CaptionTokenCodes:
        """SCAN: centroids and word codes of the captions."""
        return CaptionTokenCodes(self.root / TOKENS_DIR, self.captions.lengths)

    def global_index(self, side: str) -> GlobalIndex:
        """MMCA: the FAISS index of one side, read once (not per query)."""
        if side == CAPTIONS:
            _ = self.captions  # the no-captions error
        if side not in self._global_indexes:
            self._global_indexes[side] = GlobalIndex(index_file(self.root / GLOBAL_DIR, side))
        return self._global_indexes[side]

    @cached_property
    def store(self) -> FeatureStore:
        """The feature store the images come from (an error when it is not reachable)."""
        if self.features is None:
            raise SearchIndexError(
                f"{self.root}: {self.meta.features.describe()} recorded at build time is gone; "
                "pass its new folder (--features)"
            )
        return FeatureStore(self.features)

    def image_ids(self, positions: np.ndarray) -> list[str]:
        """Image ids of gallery positions."""
        return self.images.item_field("ids", positions)
