"""Image decoding in DataLoader workers: a bad file becomes an error item, it never stops the run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from pipeline.images import ImageDecodeError, load_image
from pipeline.workers import worker_context


@dataclass
class ImageItem:
    """One image from a loader worker: either a decoded BGR array or the reason it cannot be used."""

    image_id: str
    image: np.ndarray | None = None
    conversion: str = ""
    error_kind: str = ""
    error_reason: str = ""
    exception: str = ""

    def refuse(self, error: ImageDecodeError) -> ImageItem:
        """This item as the failure `error` (e.g. a size the detector cannot take), without its pixels."""
        return ImageItem(
            self.image_id, error_kind=error.kind, error_reason=error.reason, exception=type(error).__name__
        )


class ImageFileDataset(Dataset):
    """Decodes images in loader workers; every failure is returned as an error item, never raised.

    Holds only paths and numbers, so it pickles cheaply into forkserver/spawn workers.
    """

    def __init__(self, images_root: Path, image_ids: Sequence[str], max_pixels: int) -> None:
        self.images_root = images_root
        self.image_ids = list(image_ids)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> ImageItem:
        image_id = self.image_ids[index]
        try:
            decoded = load_image(self.images_root / image_id, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            return ImageItem(image_id).refuse(exc)
        except Exception as exc:  # anything else must not kill the loader: record it and go on
            return ImageItem(
                image_id, error_kind="read_failed", error_reason=str(exc), exception=type(exc).__name__
            )
        return ImageItem(image_id, decoded.image, decoded.conversion)


def _collate_items(items: list[ImageItem]) -> list[ImageItem]:
    """Keep a batch as a list: images have different sizes and the detector pads them itself."""
    return items


def _worker_init(worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one decode per worker process; avoid oversubscribing the cores


def image_loader(dataset: ImageFileDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of `ImageItem`s in id order, decoded by `num_workers` processes (0: in this process)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_items,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # Not fork: a process that already ran OpenCV or torch thread pools can deadlock its forked children
        # (seen: a worker hung in cv2.setNumThreads). forkserver starts workers from a clean process.
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )
