"""Training and evaluation data: (image, caption) pairs over a memory-mapped region table.

Memory is the point here. Region features stay in the memory-mapped Arrow table (`RegionFeatureTable`): an
item reads its (n, D) view and casts it to float32, so a worker's anonymous memory is one batch, whatever the
dataset size. Captions are tokenised once up front into one int32 array plus offsets (a few bytes per token)
instead of millions of Python lists.

Epoch order is a pure function of (seed, epoch): a resumed run replays exactly the batches an uninterrupted
run would have seen. With several ranks each rank takes a disjoint, deterministic slice of every global
batch (see `pipeline.distributed` for the batch semantics). Training drops the last incomplete global batch of
an epoch: every step then has the full batch on every rank, and the pairs left out differ from epoch to epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.captions import CaptionTable
from pipeline.errors import UserError
from pipeline.feature_table import RegionFeatureTable, cached_feature_table
from pipeline.workers import worker_context


class DataError(UserError):
    """Captions and features do not fit together; the message names the file and what is wrong."""


class Tokenizer(Protocol):
    """What the data path needs from `pipeline.vocab.Vocabulary`."""

    def encode(self, caption: str) -> list[int]: ...


def default_cache_dir() -> Path:
    """Where memory-mapped copies of feature stores go: $SCAN_PIPE_CACHE_DIR, else ~/.cache/scan-pipe/mmap."""
    explicit = os.environ.get("SCAN_PIPE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scan-pipe" / "mmap"


def open_feature_table(features_dir: str | Path, cache_dir: str | Path | None = None) -> RegionFeatureTable:
    """The memory-mapped table of a feature store directory (converted once, then reused from the cache
    without opening the store's parts)."""
    return cached_feature_table(features_dir, cache_dir if cache_dir is not None else default_cache_dir())


# --------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class TokenizedCaptions:
    """All captions of a split as one flat int32 array; caption i is `token_ids[offsets[i]:offsets[i+1]]`."""

    token_ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n_captions + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per caption, `<start>` and `<end>` included."""
        return np.diff(self.offsets)

    def tokens(self, index: int) -> np.ndarray:
        """Token ids of caption `index` (a view)."""
        return self.token_ids[self.offsets[index] : self.offsets[index + 1]]

    def item(self, index: int) -> torch.Tensor:
        """What the text encoder reads for caption `index`: its token ids, int64 `(n,)`."""
        return torch.from_numpy(self.tokens(index).astype(np.int64))


class CaptionInputs(Protocol):
    """A split's captions as the model's text side reads them: token ids, or cached BERT word features."""

    @property
    def lengths(self) -> np.ndarray: ...  # (n_captions,) rows per caption

    def __len__(self) -> int: ...

    def item(self, index: int) -> torch.Tensor: ...  # (n,) int64 ids or (n, D) float32 features


class WordFeatureRows(Protocol):
    """What `BertCaptions` needs from a cached text-feature table (`pipeline.text_features`)."""

    @property
    def lengths(self) -> np.ndarray: ...

    def word_features(self, row: int) -> np.ndarray: ...


@dataclass(frozen=True)
class BertCaptions:
    """Captions of a split as rows of a frozen BERT's cached outputs (MMCA's text input, mmca.md §2.3)."""

    table: WordFeatureRows
    rows: np.ndarray  # (n_captions,) int64: caption i is row rows[i] of the cache

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        """Word rows per caption, [CLS] and [SEP] included."""
        return np.asarray(self.table.lengths)[self.rows]

    def item(self, index: int) -> torch.Tensor:
        """Caption `index`'s BERT rows as float32 `(n, D)`, copied out of the read-only map."""
        return torch.from_numpy(np.array(self.table.word_features(int(self.rows[index])), dtype=np.float32))


def tokenize_captions(
    captions: Sequence[str], vocab: Tokenizer, *, source: str | Path = "captions", chunk_size: int = 8192
) -> TokenizedCaptions:
    """Encode every caption once with the vocabulary (wrapped in `<start> ... <end>`).

    Works in chunks: the tokenizer's per-caption encoding objects are large (ids, tokens, offsets, masks),
    so encoding 600k COCO captions at once would cost hundreds of MB of transient memory.
    """
    encode_batch = getattr(vocab, "encode_batch", None)
    lengths_parts: list[np.ndarray] = []
    token_parts: list[np.ndarray] = []
    for start in range(0, len(captions), chunk_size):
        chunk = list(captions[start : start + chunk_size])
        encoded = encode_batch(chunk) if callable(encode_batch) else [vocab.encode(c) for c in chunk]
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        if len(lengths) and lengths.min() == 0:
            raise DataError(f"{source}: caption {start + int(np.argmin(lengths))} encodes to no tokens")
        lengths_parts.append(lengths)
        token_parts.append(
            np.fromiter((t for ids in encoded for t in ids), dtype=np.int32, count=int(lengths.sum()))
        )
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    token_ids = np.concatenate(token_parts) if token_parts else np.zeros(0, dtype=np.int32)
    return TokenizedCaptions(token_ids=token_ids, offsets=offsets)


def map_image_ids(
    table: RegionFeatureTable,
    image_ids: Sequence[str],
    *,
    captions_source: str | Path,
    features_source: str | Path,
) -> np.ndarray:
    """Row index in `table` of each caption's image; an error naming both files lists ids the store lacks.

    One vectorised lookup (`indices_of`: a hash pass over the mapped ids), not a dict of every stored id.
    """
    rows = table.indices_of(image_ids)
    absent = np.flatnonzero(rows < 0)
    if len(absent):
        unique_missing = list(dict.fromkeys(image_ids[int(i)] for i in absent))
        raise DataError(
            f"{captions_source}: {len(unique_missing)} image id(s) have no features in {features_source}, "
            f"e.g. {unique_missing[:5]}"
        )
    return rows


@dataclass(frozen=True)
class EvaluationLayout:
    """An evaluation split: images in caption order, each with `captions_per_image` consecutive captions.

    Caption j belongs to image j // captions_per_image (SCAN's layout), which the metrics rely on.
    """

    image_ids: list[str]
    image_rows: np.ndarray  # (n_images,) rows of the feature table
    captions: list[str]  # (n_images * captions_per_image,)
    captions_per_image: int
    source: Path

    @property
    def num_images(self) -> int:
        """Number of images (score-matrix rows)."""
        return len(self.image_ids)


def evaluation_layout(
    table: RegionFeatureTable,
    captions: CaptionTable,
    *,
    captions_source: str | Path,
    features_source: str | Path,
    max_images: int | None = None,
) -> EvaluationLayout:
    """The split's images (first `max_images` of them) mapped to feature rows, with their captions.

    `read_captions` has already checked the consecutive layout (equally many captions per image); images
    missing from the feature store are an error naming both files.
    """
    per_image = captions.captions_per_image
    image_ids = captions.unique_image_ids
    if max_images is not None:
        image_ids = image_ids[:max_images]
    selected = captions.captions[: len(image_ids) * per_image]
    rows = map_image_ids(table, image_ids, captions_source=captions_source, features_source=features_source)
    return EvaluationLayout(
        image_ids=list(image_ids),
        image_rows=rows,
        captions=list(selected),
        captions_per_image=per_image,
        source=Path(captions_source),
    )


# --------------------------------------------------------------------------------------------- datasets


def _region_tensor(table: RegionFeatureTable, row: int) -> torch.Tensor:
    """One image's regions as a float32 tensor, copied out of the read-only map (torch wants it writable)."""
    return torch.from_numpy(np.array(table.features(row), dtype=np.float32))


class PairDataset(Dataset):
    """One item per caption: (its image's regions, its text input). Training uses all 5 pairs of an image."""

    def __init__(self, table: RegionFeatureTable, caption_rows: np.ndarray, captions: CaptionInputs) -> None:
        if len(caption_rows) != len(captions):
            raise ValueError(f"{len(caption_rows)} caption image rows for {len(captions)} captions")
        self.table = table
        self.caption_rows = np.asarray(caption_rows, dtype=np.int64)
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        regions = _region_tensor(self.table, int(self.caption_rows[index]))
        return regions, self.captions.item(index), index


class ImageDataset(Dataset):
    """Each listed image once (evaluation encodes every image a single time, not once per caption)."""

    def __init__(self, table: RegionFeatureTable, image_rows: np.ndarray) -> None:
        self.table = table
        self.image_rows = np.asarray(image_rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _region_tensor(self.table, int(self.image_rows[index])), index


class CaptionDataset(Dataset):
    """Captions' text inputs by position (evaluation encodes them separately from the images)."""

    def __init__(self, captions: CaptionInputs) -> None:
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.captions.item(index), index


# --------------------------------------------------------------------------------------------- batches


@dataclass
class PairBatch:
    """A padded training batch; padding is masked downstream through the two length vectors."""

    region_features: torch.Tensor  # (B, R, D) float32
    region_lengths: torch.Tensor  # (B,) int64
    caption_inputs: torch.Tensor  # (B, L) int64 token ids, 0 = <pad>; or (B, L, D) float32 BERT rows
    caption_lengths: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64 dataset positions

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The batch on `device` (lengths stay int64)."""
        return PairBatch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> PairBatch:
        """Pinned copy for asynchronous host-to-GPU transfer (called by DataLoader with pin_memory)."""
        return PairBatch(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (
            self.region_features,
            self.region_lengths,
            self.caption_inputs,
            self.caption_lengths,
            self.indices,
        )

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass
class ImageBatch:
    """Padded regions of several images."""

    region_features: torch.Tensor
    region_lengths: torch.Tensor
    indices: torch.Tensor

    def pin_memory(self) -> ImageBatch:
        """Pinned copy (DataLoader pin_memory)."""
        return ImageBatch(
            self.region_features.pin_memory(), self.region_lengths.pin_memory(), self.indices.pin_memory()
        )


@dataclass
class CaptionBatch:
    """Padded text inputs of several captions (token ids, or BERT rows)."""

    caption_inputs: torch.Tensor
    caption_lengths: torch.Tensor
    indices: torch.Tensor

    def pin_memory(self) -> CaptionBatch:
        """Pinned copy (DataLoader pin_memory)."""
        return CaptionBatch(
            self.caption_inputs.pin_memory(), self.caption_lengths.pin_memory(), self.indices.pin_memory()
        )


def pad_regions(regions: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_i, D) region tensors zero-padded to the largest n: ((B, R, D), (B,) lengths)."""
    lengths = torch.tensor([r.shape[0] for r in regions], dtype=torch.int64)
    longest = int(lengths.max()) if len(regions) else 0
    dim = regions[0].shape[1] if regions else 0
    padded = torch.zeros(len(regions), longest, dim, dtype=torch.float32)
    for slot, region in enumerate(regions):
        padded[slot, : region.shape[0]] = region
    return padded, lengths


def pad_tokens(token_lists: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `(n,)` token ids (or `(n, D)` BERT rows) right-padded with 0 (`<pad>`): ((B, L[, D]), (B,))."""
    lengths = torch.tensor([t.shape[0] for t in token_lists], dtype=torch.int64)
    longest = int(lengths.max()) if len(token_lists) else 0
    first = token_lists[0] if len(token_lists) else torch.zeros(0, dtype=torch.int64)
    padded = torch.zeros(len(token_lists), longest, *first.shape[1:], dtype=first.dtype)
    for slot, tokens in enumerate(token_lists):
        padded[slot, : tokens.shape[0]] = tokens
    return padded, lengths


def collate_pairs(items: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> PairBatch:
    """Pad a list of `PairDataset` items into one `PairBatch`."""
    regions, lengths = pad_regions([item[0] for item in items])
    tokens, caption_lengths = pad_tokens([item[1] for item in items])
    indices = torch.tensor([item[2] for item in items], dtype=torch.int64)
    return PairBatch(regions, lengths, tokens, caption_lengths, indices)


def collate_images(items: Sequence[tuple[torch.Tensor, int]]) -> ImageBatch:
    """Pad a list of `ImageDataset` items."""
    regions, lengths = pad_regions([item[0] for item in items])
    return ImageBatch(regions, lengths, torch.tensor([item[1] for item in items], dtype=torch.int64))


def collate_captions(items: Sequence[tuple[torch.Tensor, int]]) -> CaptionBatch:
    """Pad a list of `CaptionDataset` items."""
    tokens, lengths = pad_tokens([item[0] for item in items])
    return CaptionBatch(tokens, lengths, torch.tensor([item[1] for item in items], dtype=torch.int64))


# --------------------------------------------------------------------------------------------- sampling


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a function of (seed, epoch) only, so resuming replays it exactly."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % 2**63, epoch])))
    return generator.permutation(num_items)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch of a seeded shuffle; with several ranks each takes a slice of every global batch.

    `global_batch_size` is the batch over all ranks; rank r gets positions [r*b, (r+1)*b) of each global
    batch, b = global_batch_size // world_size. The incomplete last global batch is dropped.
    """

    def __init__(
        self,
        num_items: int,
        global_batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of size {world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by the {world_size} processes")
        if global_batch_size > num_items:
            raise ValueError(f"batch size {global_batch_size} is larger than the {num_items} training pairs")
        self.num_items = num_items
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.num_items, self.seed, self.epoch)
        start_in_batch = self.rank * self.local_batch_size
        for batch in range(len(self)):
            first = batch * self.global_batch_size + start_in_batch
            yield order[first : first + self.local_batch_size].tolist()


def pair_loader(
    dataset: PairDataset, sampler: EpochBatchSampler, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Training loader: the sampler decides the order, workers read and cast features."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=num_workers,
        pin_memory=pin_memory,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )


def image_loader(
    dataset: ImageDataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Evaluation loader over images, in order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_images,
        num_workers=num_workers,
        pin_memory=pin_memory,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )


def caption_loader(
    dataset: CaptionDataset,
    batch_size: int,
    *,
    sort_by_length: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Evaluation loader over captions; sorted by length so each batch carries little padding.

    Batches carry the caption positions (`indices`), so callers put results back in caption order.
    """
    order = np.arange(len(dataset))
    if sort_by_length:
        order = np.argsort(dataset.captions.lengths, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_captions,
        num_workers=num_workers,
        pin_memory=pin_memory,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )
