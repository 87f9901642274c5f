"""The extraction run: plan, shard, decode, detect, write parts, merge the ranks' results."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from pipeline import __version__ as PACKAGE_VERSION
from pipeline.device_faults import DeviceFaultError, device_fault
from pipeline.distributed import DistributedContext, all_reduce_max, barrier, init_distributed, shutdown
from pipeline.extraction.decode import ImageFileDataset, ImageItem, batched, decoded_items
from pipeline.extraction.detector import (
    DetectedRegions,
    NonFiniteRegionsError,
    RegionDetector,
    preparer_of,
    to_record,
)
from pipeline.extraction.plan import (
    ExtractError,
    plan_image_ids,
    remove_stale_temporaries,
    shard_for_rank,
    stored_ids_to_skip,
)
from pipeline.extraction.summary import (
    ExtractSummary,
    RankResult,
    merge_results,
    read_rank_results,
    resume_message,
    write_outputs,
    write_rank_result,
)
from pipeline.images import ImageDecodeError
from pipeline.params import ExtractParams
from pipeline.progress import progress_bar
from pipeline.store_lock import store_lock
from pipeline.store_repair import QuarantinedPart, quarantine_unreadable_parts
from pipeline.store_writer import FeatureStoreWriter

# Ranks meet at barriers after extracting their shares, which can differ by a lot of images.
_BARRIER_TIMEOUT_MINUTES = 12 * 60


def extract_images(
    detector: RegionDetector,
    images: str | Path,
    out: str | Path,
    settings: ExtractParams,
    *,
    metadata: Mapping[str, Any] | None = None,
    list_file: str | Path | None = None,
    console: Console | None = None,
) -> ExtractSummary:
    """Extract the regions of every image under `images` (or in `list_file`) not yet in the store at `out`.

    `settings` gives the run's batch size, loader workers, device (`auto` too), precision, feature dtype,
    part size and pixel limit; its detector options are the caller's business (it built `detector`).
    `metadata` says how the detector was made (weights digest, config, ...): every part records it, and a
    store made with different values is not extended. Under torchrun every rank takes its share of the
    images. Failed images go to `out/_errors.jsonl`, the merged summary to `out/_summary.json`.

    One run at a time per store: the run holds `out`'s lock (`store_lock`; under torchrun rank 0 holds it
    for all ranks), and a second run fails at once naming the holder. A resumed run moves unreadable parts
    to `out/_quarantine/`, redoes their images and says so (`ExtractSummary.resume_message`).

    Raises ExtractError / DeviceError / StoreLockedError (UserErrors): bad inputs or settings, a busy store.
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    context = init_distributed(settings.device, timeout_minutes=_BARRIER_TIMEOUT_MINUTES)
    try:
        return _run(
            detector,
            Path(images),
            Path(out),
            settings,
            dict(metadata or {}),
            Path(list_file) if list_file is not None else None,
            console,
            context,
            started,
        )
    finally:
        shutdown(context)


def _run(
    detector: RegionDetector,
    images_root: Path,
    out: Path,
    settings: ExtractParams,
    metadata: dict[str, Any],
    list_file: Path | None,
    console: Console,
    context: DistributedContext,
    started: float,
) -> ExtractSummary:
    metadata.update(
        precision=settings.precision,
        exif=settings.exif,
        package_version=PACKAGE_VERSION,
        torch_version=torch.__version__,
    )
    listing = plan_image_ids(images_root, list_file, follow_symlinks=settings.follow_symlinks)
    image_ids = listing.image_ids
    device = context.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    detector.to(device)

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as lock:  # rank 0 holds the store's lock until the summary is written
        quarantined = _claim_store(out, context, console, lock)
        existing = stored_ids_to_skip(out, metadata, settings.feature_dtype)
        pending = [image_id for image_id in image_ids if image_id not in existing]
        skipped = len(image_ids) - len(pending)
        if context.is_main and (existing or quarantined):
            console.print(resume_message(skipped, len(pending), len(quarantined)), highlight=False)
        barrier(context)  # every rank has read the same store before any rank writes to it
        my_ids = shard_for_rank(pending, context.rank, context.world_size)

        result = _extract_share(detector, images_root, out, settings, metadata, my_ids, console, context)
        if context.is_main:  # files refused before decoding (bad names, symlinks out of the root): once
            for refusal in listing.refused:
                result.record_error(refusal.image_id, refusal.kind, refusal.reason, "ImageListError")
        result.elapsed_s = time.perf_counter() - started
        result.quarantined = [part.name for part in quarantined]
        write_rank_result(out, result)
        barrier(context)
        results = read_rank_results(out, context.world_size)
        summary = merge_results(
            results,
            total=len(image_ids) + len(listing.refused),
            skipped=skipped,
            device=str(device) if context.world_size == 1 else f"{device.type} x {context.world_size}",
            precision=settings.precision,
            batch_size=settings.batch_size,
            metadata=metadata,
            out=out,
            resuming=bool(existing),
            to_do=len(pending),
        )
        barrier(context)  # every rank has read every rank file
        if context.is_main:
            write_outputs(out, summary, results)
    return summary


def _claim_store(
    out: Path, context: DistributedContext, console: Console, lock: contextlib.ExitStack
) -> list[QuarantinedPart]:
    """Rank 0 locks the store for the whole job, then tidies it: dead runs' temporaries go, unreadable parts
    go to `_quarantine/` (their images are then redone). Only then do the other ranks go on: they share
    rank 0's lock (one of their own would be refused). If rank 0 fails, every rank raises at once instead
    of waiting for it at a later barrier."""
    quarantined: list[QuarantinedPart] = []
    error: Exception | None = None
    if context.is_main:
        try:
            lock.enter_context(store_lock(out))
            removed = remove_stale_temporaries(out)  # safe under the lock: no other run is live
            quarantined = quarantine_unreadable_parts(out)
        except Exception as exc:
            error = exc
        else:
            if removed:
                console.print(
                    f"removed {len(removed)} temporary file(s) left by an interrupted run", highlight=False
                )
            for part in quarantined:
                console.print(
                    f"[bold yellow]warning:[/] unreadable part {escape(part.name)} ({escape(part.reason)}) "
                    f"moved to {escape(str(part.moved_to))}; its images are extracted again",
                    highlight=False,
                )
    if all_reduce_max(int(error is not None), context):  # the barrier: rank 0 holds the lock after it
        raise error or ExtractError(f"{out}: rank 0 could not lock and prepare the store (see its error)")
    return quarantined


def _detect_batch(
    detector: RegionDetector, items: list[ImageItem], precision: str, device: torch.device
) -> tuple[list[tuple[ImageItem, DetectedRegions]], list[tuple[ImageItem, Exception]]]:
    """Run one padded batch; if it fails, retry image by image so one bad image cannot sink its batch.

    A sticky device fault is not an image's failure: it raises DeviceFaultError (the run stops, what it
    finished stays stored) instead of marking every remaining image as failed.
    """
    try:
        with torch.inference_mode():
            if all(item.prepared is not None for item in items):
                results = detector.detect_prepared(  # type: ignore[attr-defined]
                    [item.prepared for item in items], precision=precision
                )
            else:
                results = detector.detect([item.image for item in items], precision=precision)
        return list(zip(items, results, strict=True)), []
    except Exception as exc:
        fault = device_fault(exc, device)
        if fault is not None:
            raise DeviceFaultError(
                f"{device}: device fault while extracting {items[0].image_id} ({len(items)} image(s) in the "
                f"batch): {fault}. The run stopped; the images finished so far are stored, and rerunning the "
                "same command on a working device resumes after them"
            ) from exc
        if len(items) == 1:
            return [], [(items[0], exc)]
    done: list[tuple[ImageItem, DetectedRegions]] = []
    failed: list[tuple[ImageItem, Exception]] = []
    for item in items:
        one_done, one_failed = _detect_batch(detector, [item], precision, device)
        done += one_done
        failed += one_failed
    return done, failed


def _usable(item: ImageItem, detector: RegionDetector) -> ImageItem:
    """The item, or its refusal when the detector cannot take an image of its size."""
    if item.image is None:
        return item
    problem = detector.image_size_problem(*item.image.shape[:2])
    return item if problem is None else item.refuse(ImageDecodeError(problem, "unsupported"))


def _extract_share(
    detector: RegionDetector,
    images_root: Path,
    out: Path,
    settings: ExtractParams,
    metadata: dict[str, Any],
    image_ids: list[str],
    console: Console,
    context: DistributedContext,
) -> RankResult:
    """Extract this rank's images into its own shard of parts."""
    result = RankResult(rank=context.rank)
    if not image_ids:
        return result
    device = context.device
    conversions: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    box_counts: list[int] = []
    loop_started = time.perf_counter()
    dataset = ImageFileDataset(
        images_root, image_ids, settings.max_image_pixels, settings.exif, prepare=preparer_of(detector)
    )
    # One image at a time from the decoders (so that a stalled one becomes a "timeout" record and the run
    # goes on), `batch_size` at a time to the detector; workers decode two batches ahead, as before.
    items = decoded_items(
        dataset,
        num_workers=settings.num_workers,
        timeout_s=settings.decode_timeout_s,
        prefetch=2 * settings.batch_size,
    )
    progress = progress_bar("images", console=console, disable=not context.is_main)
    label = "extracting" if context.world_size == 1 else f"extracting (rank 0 of {context.world_size})"
    writer = FeatureStoreWriter(
        out,
        shard=str(context.rank),
        feature_dtype=settings.feature_dtype,
        rows_per_part=settings.rows_per_part,
        metadata=metadata,
    )
    with writer, progress:
        task = progress.add_task(label, total=len(image_ids))
        for batch in batched(items, settings.batch_size):
            decoded = []
            for loaded in batch:
                item = _usable(loaded, detector)
                if item.image is None:
                    result.record_error(item.image_id, item.error_kind, item.error_reason, item.exception)
                else:
                    decoded.append(item)
            done, failed = (
                _detect_batch(detector, decoded, settings.precision, device) if decoded else ([], [])
            )
            for item, regions in done:
                try:
                    record = to_record(item.image_id, item.image, regions, settings.feature_dtype)
                except NonFiniteRegionsError as exc:  # NaN/inf output: this image fails, the run goes on
                    failed.append((item, exc))
                    continue
                writer.add(record)
                result.done += 1
                conversions[item.conversion] += 1
                warnings.update(item.warnings)
                result.orientation_tagged += item.orientation != 1
                box_counts.append(record.num_boxes)
            for item, exc in failed:
                name = type(exc).__name__
                result.record_error(item.image_id, "detector_failed", f"{name}: {exc}", name)
            progress.advance(task, len(batch))
    result.extract_s = time.perf_counter() - loop_started
    result.parts_written = len(writer.parts_written)
    result.conversions = dict(conversions)
    result.warnings = dict(warnings)
    if box_counts:
        result.num_boxes = {
            "min": float(min(box_counts)),
            "mean": float(np.mean(box_counts)),
            "max": float(max(box_counts)),
        }
    return result
