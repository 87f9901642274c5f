"""The extraction run behind `scan-pipe extract`: images -> bottom-up-attention regions -> feature store.

This is the one place that wires the detector (extractors/bua) to the feature store (pipeline/store.py).
Design points, each answering a way a long extraction goes wrong:

* Resumable: image ids already in the output store are skipped; parts are written atomically by the store, so
  a killed run leaves whole parts only and a rerun computes exactly the missing images.
* Bad input never stops the run: decoding happens in DataLoader workers (pipeline/images.py), a failure
  becomes an error item, and a detector failure on a batch is retried image by image to isolate the
  culprit. Failures go to `OUT/errors.jsonl`; they are not in the store, so a rerun retries them.
* Sharded: under `torchrun` every rank takes a deterministic slice of the sorted, not-yet-done image ids and
  writes its own parts (shard = rank) into the same directory; rank 0 merges the summary after a barrier.
* Numerics are explicit: exact float32 (TF32 off) by default, TF32 / bf16 / fp16 only on request, restored
  afterwards.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from extractors.bua.config import DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector
from extractors.bua.detector import read_vocabulary as read_vocabulary_lines
from extractors.bua.preprocess import MIN_BLOB_SIDE, compute_scale, scaled_size
from extractors.bua.weights import WEIGHTS_NOT_GIVEN_MESSAGE, load_weights
from pipeline import __version__ as PACKAGE_VERSION
from pipeline.atomic import atomic_output
from pipeline.images import ImageDecodeError, ImageListError, list_images, load_image, read_image_list
from pipeline.params import ExtractParams
from pipeline.progress import progress_bar
from pipeline.store import (
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    RegionRecord,
    list_parts,
)
from pipeline.workers import worker_context

ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "summary.json"
EXIT_IMAGES_FAILED = 3
# Metadata keys that must agree between the parts already in OUT and this run: mixing them would make one
# feature set out of two different extractors.
COMPATIBILITY_KEYS = ("extractor", "detector_config", "weights_sha256", "untrained", "precision")
_RANK_FILE = re.compile(r"^\.extract-rank-(\d+)\.json$")
_STALE_TEMPORARY = re.compile(
    r"^\.(part-.+\.parquet|summary\.json|errors\.jsonl|extract-rank-\d+\.json)\..+\.tmp$"
)


class ExtractError(Exception):
    """A user-facing problem with the inputs or settings of a run (message names the file/option)."""


# ------------------------------------------------------------------------------------------- settings


def detector_config_for(params: ExtractParams) -> DetectorConfig:
    """The detector configuration of a run: architecture defaults, box mode, then explicit overrides."""
    base = DetectorConfig.tiny() if params.arch == "tiny" else DetectorConfig()
    config = base.with_box_mode("adaptive" if params.boxes == "adaptive" else "fixed")
    overrides = {
        name: getattr(params, name)
        for name in ("test_scale", "max_size", "pre_nms_top_n", "post_nms_top_n")
        if getattr(params, name) is not None
    }
    if not overrides:
        return config
    try:
        return DetectorConfig.model_validate({**config.model_dump(), **overrides})
    except ValueError as exc:
        raise ExtractError(f"invalid detector settings {overrides}: {exc}") from None


def resolve_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """`cuda` under torchrun means this rank's local GPU; a clear error when CUDA is asked for but absent."""
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ExtractError(f"--device {device!r} is not a valid torch device: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    return resolved


def read_vocabulary(path: str | Path, expected: int, what: str) -> list[str]:
    """Names from an objects/attributes vocabulary file (one per line), checked against the head size."""
    try:
        names = read_vocabulary_lines(path)
    except (OSError, ValueError) as exc:
        raise ExtractError(f"{what} vocabulary: {exc}") from None
    if len(names) != expected:
        raise ExtractError(
            f"{path}: {len(names)} {what} names, but the detector has {expected} {what} classes"
        )
    return names


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Digest of a module's tensors in state-dict order (identifies randomly initialised weights)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoadedDetector:
    """The detector plus what the store metadata must say about its weights."""

    detector: torch.nn.Module
    weights: str
    weights_sha256: str
    untrained: bool
    notes: list[str] = field(default_factory=list)


def load_detector(params: ExtractParams, config: DetectorConfig, device: torch.device) -> LoadedDetector:
    """Build the detector and load its weights (`random`: seeded initialisation, marked untrained)."""
    if params.weights is None:
        raise ExtractError(
            f"{WEIGHTS_NOT_GIVEN_MESSAGE} (option --weights, or extract.weights in params.yaml)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        detector = BottomUpAttentionDetector(config)
    notes: list[str] = []
    if params.weights == "random":
        weights_sha256 = state_dict_sha256(detector)
        untrained = True
    else:
        path = Path(params.weights)
        if not path.is_file():
            raise ExtractError(
                f"{path}: weights file not found (--weights FILE, or 'random' for an untrained detector)"
            )
        try:
            with warnings.catch_warnings():  # an anchor mismatch is in the report, printed below
                warnings.simplefilter("ignore")
                report = load_weights(detector, path)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise ExtractError(f"{path}: cannot load detector weights: {exc}") from None
        notes.append(report.summary())
        weights_sha256 = str(report.sha256)
        untrained = False
    detector.eval().to(device)
    return LoadedDetector(detector, params.weights, weights_sha256, untrained, notes)


def store_metadata(
    params: ExtractParams, config: DetectorConfig, loaded: LoadedDetector, vocabularies: dict[str, list[str]]
) -> dict[str, Any]:
    """What every part of the store records about how its features were made."""
    metadata: dict[str, Any] = {
        "extractor": "bottom-up-attention",
        "arch": params.arch,
        "detector_config": config.model_dump(mode="json"),
        "weights": loaded.weights,
        "weights_sha256": loaded.weights_sha256,
        "untrained": loaded.untrained,
        "precision": params.precision,
        "package_version": PACKAGE_VERSION,
        "torch_version": torch.__version__,
    }
    if loaded.untrained:
        metadata["weights_seed"] = params.seed
    metadata.update(vocabularies)
    return metadata


def check_compatible(out: Path, metadata: dict[str, Any], feature_dtype: str) -> None:
    """Refuse to add features to a store made with another detector, weights, precision or feature dtype."""
    if not list_parts(out):
        return
    try:
        existing = FeatureStore(out).metadata
    except FeatureStoreError as exc:
        raise ExtractError(f"{out}: the existing feature store cannot be resumed: {exc}") from None
    differing = [key for key in COMPATIBILITY_KEYS if existing.get(key) != metadata.get(key)]
    if existing.get("feature_dtype") != feature_dtype:
        differing.append("feature_dtype")
    if differing:
        details = "; ".join(
            f"{key}: stored {existing.get(key)!r}, this run "
            f"{feature_dtype if key == 'feature_dtype' else metadata.get(key)!r}"
            for key in differing
            if key != "detector_config"
        )
        if "detector_config" in differing:
            old, new = existing.get("detector_config") or {}, metadata["detector_config"]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            details = "; ".join(filter(None, [details, f"detector_config differs in {changed}"]))
        raise ExtractError(
            f"{out} already holds features made differently ({details}); resume with the same settings "
            "or choose another --out"
        )


def plan_image_ids(images_root: Path, list_file: Path | None) -> list[str]:
    """The image ids of the run: a list file's entries, or every jpg/jpeg/png under the root, sorted."""
    try:
        if list_file is not None:
            if not images_root.is_dir():
                raise ImageListError(f"{images_root}: images folder not found (or not a directory)")
            return read_image_list(list_file)
        image_ids = list_images(images_root)
    except ImageListError as exc:
        raise ExtractError(str(exc)) from None
    if not image_ids:
        raise ExtractError(f"{images_root}: no .jpg/.jpeg/.png images found (searched recursively)")
    return image_ids


def shard_for_rank(pending: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s deterministic share of the sorted pending ids (round-robin keeps the shares balanced)."""
    return list(sorted(pending)[rank::world_size])


# ------------------------------------------------------------------------------------------- loading


@dataclass
class ImageItem:
    """One image from a loader worker: either a decoded BGR array or the reason it cannot be used."""

    image_id: str
    image: np.ndarray | None = None
    conversion: str = ""
    error_kind: str = ""
    error_reason: str = ""
    exception: str = ""


class ImageFileDataset(Dataset):
    """Decodes images in loader workers; every failure is returned as an error item, never raised."""

    def __init__(
        self, images_root: Path, image_ids: Sequence[str], max_pixels: int, test_scale: int, max_size: int
    ) -> None:
        self.images_root = images_root
        self.image_ids = list(image_ids)
        self.max_pixels = max_pixels
        self.test_scale = test_scale
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> ImageItem:
        image_id = self.image_ids[index]
        try:
            decoded = load_image(self.images_root / image_id, max_pixels=self.max_pixels)
            height, width = decoded.image.shape[:2]
            out_h, out_w = scaled_size(
                height, width, compute_scale(height, width, self.test_scale, self.max_size)
            )
            if min(out_h, out_w) < MIN_BLOB_SIDE:
                raise ImageDecodeError(
                    f"{width}x{height} px scales to {out_w}x{out_h} px, below the detector's minimum of "
                    f"{MIN_BLOB_SIDE} px per side (extreme aspect ratio)",
                    "unsupported",
                )
            return ImageItem(image_id, decoded.image, decoded.conversion)
        except ImageDecodeError as exc:
            return ImageItem(
                image_id, error_kind=exc.kind, error_reason=exc.reason, exception="ImageDecodeError"
            )
        except Exception as exc:  # anything else must not kill the loader: record it and go on
            return ImageItem(
                image_id, error_kind="read_failed", error_reason=str(exc), exception=type(exc).__name__
            )


def collate_items(items: list[ImageItem]) -> list[ImageItem]:
    """Keep a batch as a list: images have different sizes and the detector pads them itself."""
    return items


def _worker_init(worker_id: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one decode per worker process; avoid oversubscribing the cores


# ------------------------------------------------------------------------------------------- numerics


def _numpy(value: Any, dtype: np.dtype | type) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32 if np.dtype(dtype).kind == "f" else None).numpy()
    return np.asarray(value, dtype=dtype)


def detections_to_record(image_id: str, image: np.ndarray, detections: Any) -> RegionRecord:
    """A detector result as a store row (float32 features; the writer casts to the store's dtype)."""
    return RegionRecord(
        image_id=image_id,
        image_w=int(image.shape[1]),
        image_h=int(image.shape[0]),
        boxes=_numpy(detections.boxes, np.float32).reshape(-1, 4),
        features=_numpy(detections.features, np.float32),
        object_ids=_numpy(detections.object_ids, np.int32),
        object_conf=_numpy(detections.object_conf, np.float32),
        attribute_ids=_numpy(detections.attribute_ids, np.int32),
        attribute_conf=_numpy(detections.attribute_conf, np.float32),
    )


# ------------------------------------------------------------------------------------------- the run


@dataclass
class RankResult:
    """What one rank did; rank 0 merges these into the summary."""

    rank: int
    done: int = 0
    failed: int = 0
    elapsed_s: float = 0.0  # whole run on this rank, model loading included
    extract_s: float = 0.0  # the decode + detect + write loop only: what images/s is measured on
    errors: list[dict[str, str]] = field(default_factory=list)
    conversions: dict[str, int] = field(default_factory=dict)
    num_boxes: dict[str, float] = field(default_factory=dict)
    parts_written: int = 0


@dataclass
class ExtractSummary:
    """The merged outcome of a run, printed and written to `OUT/summary.json`."""

    total: int
    done: int
    skipped: int
    failed: int
    elapsed_s: float
    extract_s: float
    images_per_s: float
    world_size: int
    device: str
    precision: str
    batch_size: int
    untrained: bool
    weights_sha256: str
    parts_written: int
    conversions: dict[str, int]
    num_boxes: dict[str, float]
    errors_file: str
    finished_at: str
    ranks: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DistributedContext:
    """Rank, world size and whether this run created the process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def distributed_context(device: str) -> DistributedContext:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # Ranks meet at barriers after extracting their shares, which can differ by a lot of images.
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(hours=12))
        owns = True
    return DistributedContext(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        owns_group=owns,
    )


def remove_stale_temporaries(out: Path) -> list[str]:
    """Delete temporary files a killed run left behind (never complete parts: those are kept)."""
    removed = []
    if out.is_dir():
        for entry in os.scandir(out):
            if entry.is_file() and (_STALE_TEMPORARY.match(entry.name) or _RANK_FILE.match(entry.name)):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _write_json(path: Path, payload: Any) -> None:
    with atomic_output(path) as tmp_path:
        tmp_path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _detect_batch(
    detector: torch.nn.Module, items: list[ImageItem], precision: str, device: torch.device
) -> tuple[list[tuple[ImageItem, Any]], list[tuple[ImageItem, BaseException]]]:
    """Run one padded batch; if it fails, retry image by image so one bad image cannot sink its batch."""
    images = [item.image for item in items]
    try:
        with torch.inference_mode():
            results = detector.detect(images, precision=precision)
        return list(zip(items, results, strict=True)), []
    except Exception as exc:
        if len(items) == 1:
            return [], [(items[0], exc)]
    done: list[tuple[ImageItem, Any]] = []
    failed: list[tuple[ImageItem, BaseException]] = []
    for item in items:
        one_done, one_failed = _detect_batch(detector, [item], precision, device)
        done += one_done
        failed += one_failed
    return done, failed


def run_extract(
    images_root: Path,
    out: Path,
    params: ExtractParams,
    *,
    list_file: Path | None = None,
    console: Console | None = None,
) -> ExtractSummary:
    """Extract region features for every not-yet-stored image; returns the merged summary.

    Raises ExtractError for problems with the inputs or settings (nothing written in that case).
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    context = distributed_context(params.device)
    try:
        return _run(images_root, out, params, list_file, console, context, started)
    finally:
        if context.owns_group:
            torch.distributed.destroy_process_group()


def _run(
    images_root: Path,
    out: Path,
    params: ExtractParams,
    list_file: Path | None,
    console: Console,
    context: DistributedContext,
    started: float,
) -> ExtractSummary:
    is_main = context.rank == 0
    config = detector_config_for(params)
    image_ids = plan_image_ids(images_root, list_file)
    vocabularies: dict[str, list[str]] = {}
    if params.objects_vocab:
        vocabularies["object_names"] = read_vocabulary(params.objects_vocab, config.num_classes, "object")
    if params.attributes_vocab:
        vocabularies["attribute_names"] = read_vocabulary(
            params.attributes_vocab, config.num_attributes, "attribute"
        )
    device = resolve_device(params.device, context.local_rank, context.world_size)
    loaded = load_detector(params, config, device)
    if loaded.untrained and is_main:
        console.print(
            f"[bold yellow]warning:[/] --weights random: untrained detector (seed {params.seed}); the "
            "features only test the plumbing and the store is marked untrained",
            highlight=False,
        )
    for note in loaded.notes:
        if is_main:
            console.print(f"[yellow]weights:[/] {note}", highlight=False)
    metadata = store_metadata(params, config, loaded, vocabularies)

    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        removed = remove_stale_temporaries(out)
        if removed:
            console.print(
                f"removed {len(removed)} temporary file(s) left by an interrupted run", highlight=False
            )
    check_compatible(out, metadata, params.feature_dtype)
    try:
        existing = FeatureStore(out).existing_ids() if list_parts(out) else set()
    except FeatureStoreError as exc:
        raise ExtractError(f"{out}: the existing feature store cannot be resumed: {exc}") from None
    pending = [image_id for image_id in image_ids if image_id not in existing]
    skipped = len(image_ids) - len(pending)
    # Every rank has read the same store before any rank writes to it.
    context.barrier()
    my_ids = shard_for_rank(pending, context.rank, context.world_size)

    result = _extract_share(
        images_root, out, params, config, metadata, loaded, device, my_ids, console, context
    )
    result.elapsed_s = time.perf_counter() - started
    _write_json(out / f".extract-rank-{context.rank}.json", asdict(result))
    context.barrier()
    results = [
        RankResult(**json.loads((out / f".extract-rank-{rank}.json").read_text(encoding="utf-8")))
        for rank in range(context.world_size)
    ]
    summary = _merge(results, image_ids, skipped, params, device, loaded, out, context.world_size)
    context.barrier()  # every rank has read every rank file
    if is_main:
        errors = sorted((e for r in results for e in r.errors), key=lambda e: e["image_id"])
        with atomic_output(out / ERRORS_FILE) as tmp_path:
            tmp_path.write_text(
                "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors), encoding="utf-8"
            )
        _write_json(out / SUMMARY_FILE, summary.to_json())
        for rank in range(context.world_size):
            (out / f".extract-rank-{rank}.json").unlink(missing_ok=True)
    return summary


def _extract_share(
    images_root: Path,
    out: Path,
    params: ExtractParams,
    config: DetectorConfig,
    metadata: dict[str, Any],
    loaded: LoadedDetector,
    device: torch.device,
    image_ids: list[str],
    console: Console,
    context: DistributedContext,
) -> RankResult:
    result = RankResult(rank=context.rank)
    conversions: Counter[str] = Counter()
    box_counts: list[int] = []
    if not image_ids:
        return result
    loop_started = time.perf_counter()
    dataset = ImageFileDataset(
        images_root, image_ids, params.max_image_pixels, config.test_scale, config.max_size
    )
    loader = DataLoader(
        dataset,
        batch_size=params.batch_size,
        shuffle=False,
        num_workers=params.num_workers,
        collate_fn=collate_items,
        worker_init_fn=_worker_init if params.num_workers > 0 else None,
        # Not fork: a process that already ran OpenCV or torch thread pools can deadlock its forked children
        # (seen: a worker hung in cv2.setNumThreads). forkserver starts workers from a clean process.
        multiprocessing_context=worker_context() if params.num_workers > 0 else None,
    )
    progress = progress_bar("images", console=console, disable=context.rank != 0)
    label = "extracting" if context.world_size == 1 else f"extracting (rank 0 of {context.world_size})"

    def record_error(item: ImageItem, kind: str, reason: str, exception: str) -> None:
        result.failed += 1
        result.errors.append(
            {"image_id": item.image_id, "error_type": kind, "reason": reason, "exception": exception}
        )

    with (
        FeatureStoreWriter(
            out,
            shard=str(context.rank),
            feature_dtype=params.feature_dtype,
            rows_per_part=params.rows_per_part,
            metadata=metadata,
        ) as writer,
        progress,
    ):
        task = progress.add_task(label, total=len(image_ids))
        for batch in loader:
            decoded = []
            for item in batch:
                if item.image is None:
                    record_error(item, item.error_kind, item.error_reason, item.exception)
                else:
                    decoded.append(item)
            if decoded:
                done, failed = _detect_batch(loaded.detector, decoded, params.precision, device)
                for item, detections in done:
                    record = detections_to_record(item.image_id, item.image, detections)
                    writer.add(record)
                    result.done += 1
                    conversions[item.conversion] += 1
                    box_counts.append(record.num_boxes)
                for item, exc in failed:
                    record_error(item, "detector_failed", f"{type(exc).__name__}: {exc}", type(exc).__name__)
            progress.advance(task, len(batch))
    result.extract_s = time.perf_counter() - loop_started
    result.parts_written = len(writer.parts_written)
    result.conversions = dict(conversions)
    if box_counts:
        result.num_boxes = {
            "min": float(min(box_counts)),
            "mean": float(np.mean(box_counts)),
            "max": float(max(box_counts)),
        }
    return result


def _merge(
    results: list[RankResult],
    image_ids: list[str],
    skipped: int,
    params: ExtractParams,
    device: torch.device,
    loaded: LoadedDetector,
    out: Path,
    world_size: int,
) -> ExtractSummary:
    done = sum(r.done for r in results)
    elapsed = max(r.elapsed_s for r in results)
    extract_s = max(r.extract_s for r in results)
    conversions: Counter[str] = Counter()
    for r in results:
        conversions.update(r.conversions)
    with_boxes = [r for r in results if r.num_boxes]
    num_boxes: dict[str, float] = {}
    if with_boxes:
        num_boxes = {
            "min": min(r.num_boxes["min"] for r in with_boxes),
            "max": max(r.num_boxes["max"] for r in with_boxes),
            "mean": sum(r.num_boxes["mean"] * r.done for r in with_boxes)
            / max(1, sum(r.done for r in with_boxes)),
        }
    return ExtractSummary(
        total=len(image_ids),
        done=done,
        skipped=skipped,
        failed=sum(r.failed for r in results),
        elapsed_s=round(elapsed, 3),
        extract_s=round(extract_s, 3),
        images_per_s=round(done / extract_s, 4) if extract_s > 0 else 0.0,
        world_size=world_size,
        device=str(device) if world_size == 1 else f"{device.type} x {world_size}",
        precision=params.precision,
        batch_size=params.batch_size,
        untrained=loaded.untrained,
        weights_sha256=loaded.weights_sha256,
        parts_written=sum(r.parts_written for r in results),
        conversions=dict(sorted(conversions.items())),
        num_boxes=num_boxes,
        errors_file=str(out / ERRORS_FILE),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ranks=[
            {"rank": r.rank, "done": r.done, "failed": r.failed, "elapsed_s": round(r.elapsed_s, 3)}
            for r in results
        ],
    )
