"""Image decoding off the main thread: a bad file becomes an error item, it never stops the run, and neither
does a decode that never ends.

Every image has `timeout_s` seconds: with loader workers (`num_workers` > 0) the DataLoader waits that long
for each image (in order, once the workers have started), and on a timeout the pending image becomes a
"timeout" error item, the workers are stopped (the stuck one killed) and a new loader carries on past it.
In-process (`num_workers` 0) each image is decoded in a daemon thread that is abandoned on a timeout: the
run goes on, but a thread stuck for good keeps its memory and CPU until the process ends (use workers to
have it killed).
"""

from __future__ import annotations

import copy
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from pipeline.images import ImageDecodeError, load_image
from pipeline.workers import worker_context

# Loader workers start in a few seconds (a fresh interpreter importing torch and OpenCV); far more means the
# machine is in trouble, and the image waits begin anyway.
_STARTUP_TIMEOUT_S = 300.0


@dataclass
class ImageItem:
    """One image from a loader worker: either a decoded BGR array or the reason it cannot be used."""

    image_id: str
    image: np.ndarray | None = None
    conversion: str = ""
    error_kind: str = ""
    error_reason: str = ""
    exception: str = ""
    orientation: int = 1  # the file's EXIF orientation tag (1 when absent), whichever the EXIF policy
    warnings: tuple[str, ...] = ()  # accepted oddities (a JPEG without its end marker)
    prepared: object | None = None  # the detector's device-ready form of `image`, made in the worker

    def refuse(self, error: ImageDecodeError) -> ImageItem:
        """This item as the failure `error` (e.g. a size the detector cannot take), without its pixels."""
        return ImageItem(
            self.image_id, error_kind=error.kind, error_reason=error.reason, exception=type(error).__name__
        )


def timeout_item(image_id: str, timeout_s: float, *, stopped: bool) -> ImageItem:
    """The error item of an image whose decode outlasted `timeout_s`."""
    fate = "its worker was stopped" if stopped else "the decode was abandoned"
    return ImageItem(
        image_id,
        error_kind="timeout",
        error_reason=f"timeout: decoding took longer than {timeout_s:g} s (extract.decode_timeout_s); {fate}",
        exception="TimeoutError",
    )


class ImageFileDataset(Dataset):
    """Decodes images in loader workers; every failure is returned as an error item, never raised.

    Holds only paths, numbers and the detector's small picklable `prepare` callable, so it pickles cheaply
    into forkserver/spawn workers. `prepare` (e.g. the Caffe blob construction) runs in the worker after the
    decode, off the main process's critical path; its ValueError makes the image an "unsupported" item.
    """

    def __init__(
        self,
        images_root: Path,
        image_ids: Sequence[str],
        max_pixels: int,
        exif: str = "ignore",
        prepare: Callable[[np.ndarray], object] | None = None,
    ) -> None:
        self.images_root = images_root
        self.image_ids = list(image_ids)
        self.max_pixels = max_pixels
        self.exif = exif
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> ImageItem:
        image_id = self.image_ids[index]
        try:
            decoded = load_image(self.images_root / image_id, max_pixels=self.max_pixels, exif=self.exif)
        except ImageDecodeError as exc:
            return ImageItem(image_id).refuse(exc)
        except Exception as exc:  # anything else must not kill the loader: record it and go on
            return ImageItem(
                image_id, error_kind="read_failed", error_reason=str(exc), exception=type(exc).__name__
            )
        prepared = None
        if self.prepare is not None:
            try:
                prepared = self.prepare(decoded.image)
            except ValueError as exc:  # a size the detector cannot take: this image only
                return ImageItem(image_id).refuse(ImageDecodeError(str(exc), "unsupported"))
        return ImageItem(
            image_id,
            decoded.image,
            decoded.conversion,
            orientation=decoded.header.orientation,
            warnings=decoded.warnings,
            prepared=prepared,
        )

    def tail(self, start: int) -> ImageFileDataset:
        """The same dataset from image `start` on."""
        part = copy.copy(self)
        part.image_ids = self.image_ids[start:]
        return part


def _identity(item: ImageItem) -> ImageItem:
    """Items travel as they are: images have different sizes and the detector pads them itself."""
    return item


def _worker_init(ready: Queue | None, worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one decode per worker process; avoid oversubscribing the cores
    if ready is not None:
        ready.put(worker_id)


def image_loader(
    dataset: ImageFileDataset,
    num_workers: int,
    timeout_s: float,
    prefetch: int,
    ready: Queue | None = None,
) -> DataLoader:
    """`ImageItem`s one by one in id order, decoded by `num_workers` (>= 1) processes, `prefetch` images
    ahead per worker; waiting longer than `timeout_s` for the next one raises RuntimeError. Each worker puts
    its id into `ready` (a queue of `worker_context()`) once it has started."""
    return DataLoader(
        dataset,
        batch_size=None,  # one image per fetch, so that a timeout names one image
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        worker_init_fn=functools.partial(_worker_init, ready),
        prefetch_factor=max(1, prefetch),
        timeout=timeout_s,
        # Not fork: a process that already ran OpenCV or torch thread pools can deadlock its forked children
        # (seen: a worker hung in cv2.setNumThreads). forkserver starts workers from a clean process.
        multiprocessing_context=worker_context(),
    )


def decoded_items(
    dataset: ImageFileDataset, *, num_workers: int, timeout_s: float, prefetch: int = 2
) -> Iterator[ImageItem]:
    """Every image of `dataset` as an `ImageItem`, in order; one whose decode outlasts `timeout_s` becomes a
    "timeout" error item and the others carry on (see the module docstring)."""
    if num_workers == 0:
        yield from _thread_items(dataset, timeout_s)
    else:
        yield from _worker_items(dataset, num_workers, timeout_s, prefetch)


def _thread_items(dataset: ImageFileDataset, timeout_s: float) -> Iterator[ImageItem]:
    for index in range(len(dataset)):
        box: list[ImageItem] = []
        thread = threading.Thread(
            target=lambda i=index, out=box: out.append(dataset[i]), name="scan-pipe-decode", daemon=True
        )
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            yield timeout_item(dataset.image_ids[index], timeout_s, stopped=False)
        elif box:
            yield box[0]
        else:  # the thread died of a BaseException
            yield ImageItem(
                dataset.image_ids[index], error_kind="read_failed", error_reason="decoding thread died"
            )


def _worker_items(
    dataset: ImageFileDataset, num_workers: int, timeout_s: float, prefetch: int
) -> Iterator[ImageItem]:
    start = 0
    while start < len(dataset):
        part = dataset.tail(start)
        workers = min(num_workers, len(part))
        ready = worker_context().Queue()
        iterator = iter(image_loader(part, workers, timeout_s, prefetch, ready))
        index = 0
        try:
            _wait_until_started(ready, workers)  # start-up is not decode time: it does not count
            while index < len(part):
                try:
                    item = next(iterator)
                except StopIteration:  # cannot happen (the loader yields every index), but never drop one
                    for image_id in part.image_ids[index:]:
                        yield ImageItem(image_id, error_kind="read_failed", error_reason="loader ended early")
                    return
                except RuntimeError as exc:
                    if "timed out" not in str(exc):
                        raise
                    # Items arrive in order and each worker decodes its share in order, so the one waited
                    # for is the one its worker is stuck on (never one queued behind it).
                    yield timeout_item(part.image_ids[index], timeout_s, stopped=True)
                    index += 1
                    break
                yield item
                index += 1
        finally:
            _stop_workers(iterator)
            ready.close()
        start += index


def _wait_until_started(ready: Queue, workers: int) -> None:
    """Wait (up to `_STARTUP_TIMEOUT_S` in all) until every worker has started; a worker that never does
    shows up as a timeout or as the DataLoader's own error."""
    deadline = time.monotonic() + _STARTUP_TIMEOUT_S
    for _ in range(workers):
        try:
            ready.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return


def _stop_workers(iterator: Iterator[ImageItem]) -> None:
    """Shut a loader's workers down now: asked to exit, then (after torch's 5 s grace) terminated."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def batched(items: Iterable[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    batch: list[ImageItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
