"""Region-feature extraction speed: batched vs one image per forward, exact float32 vs a fast precision mode.

Runs the bottom-up-attention detector on synthetic scenes (no dataset needed) and reports, side by side in one
process:

* images/s of exact float32 (TF32 off) with one image per forward pass (the baseline) and with --batch-size
  images per padded forward pass, and their ratio;
* images/s of the fast mode (--precision tf32/bf16/fp16) at the same batch size, its ratio to exact, and how
  far it strays from exact: the share of selected boxes that are identical (coordinates within 0.01 px), the
  share that are the same region (IoU >= 0.95 with an exact box), and the max / mean absolute deviation of the
  features of matched boxes;
* as a sanity check, the largest feature difference between batched and single exact runs (should be ~1e-6).

Usage:
    python benchmarks/extract.py --arch full --weights random --num-images 3 --device cpu
    python benchmarks/extract.py --arch tiny --num-images 32 --batch-size 8
    python benchmarks/extract.py --arch full --weights pytorch_model.bin --device cuda --num-images 200 \
        --batch-size 8 --precision bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractors.bua.detector import RegionDetections
from extractors.bua.factory import build_detector
from pipeline.distributed import resolve_device
from pipeline.params import ExtractParams


def synthetic_scenes(count: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """Coloured rectangles and discs on textured noise, BGR uint8; sizes jittered so batches need padding."""
    import cv2

    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        w = int(width * rng.uniform(0.85, 1.0))
        h = int(height * rng.uniform(0.85, 1.0))
        image = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(image, (0, 0), 2.0)
        for _ in range(int(rng.integers(3, 8))):
            colour = tuple(int(c) for c in rng.integers(40, 256, size=3))
            x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            if rng.random() < 0.5:
                corner = (x + int(rng.integers(20, w // 2)), y + int(rng.integers(20, h // 2)))
                cv2.rectangle(image, (x, y), corner, colour, -1)
            else:
                cv2.circle(image, (x, y), int(rng.integers(10, min(w, h) // 4)), colour, -1)
        scenes.append(image)
    return scenes


def timed_detect(
    detector: torch.nn.Module,
    images: Sequence[np.ndarray],
    batch_size: int,
    precision: str,
    device: torch.device,
    warmup: bool = True,
) -> tuple[float, list[RegionDetections]]:
    """Seconds for all images (after one warm-up batch unless told not to) and the detections, in order."""
    if warmup:  # allocator, cuDNN autotuning, oneDNN primitive caches
        detector.detect(list(images[:batch_size]), precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    results: list[RegionDetections] = []
    for start in range(0, len(images), batch_size):
        results += detector.detect(list(images[start : start + batch_size]), precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, results


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix with the Caffe "+1" widths (boxes in pixels)."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + 1) * (boxes_a[:, 3] - boxes_a[:, 1] + 1)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + 1) * (boxes_b[:, 3] - boxes_b[:, 1] + 1)
    left = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    right = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    top = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    bottom = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter = np.clip(right - left + 1, 0, None) * np.clip(bottom - top + 1, 0, None)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@dataclass
class Agreement:
    """How a run's selected regions compare with the exact run's."""

    boxes_identical: float  # share of selected boxes with an exact-run box within box_atol px on every side
    boxes_same_region: float  # share of selected boxes with an exact-run box of IoU >= iou_match
    same_count: float  # share of images with the same number of boxes
    feature_max_abs: float  # over the IoU-matched boxes
    feature_mean_abs: float
    feature_scale: float  # mean |feature| of the exact run, to read the deviations against


def compare(
    reference: list[RegionDetections],
    other: list[RegionDetections],
    box_atol: float = 0.01,
    iou_match: float = 0.95,
) -> Agreement:
    """Match each selected box to the reference's (coordinates, then IoU); compare the matched features."""
    identical = same_region = total = same_count = 0
    deviations: list[np.ndarray] = []
    scale: list[float] = []
    for ref, run in zip(reference, other, strict=True):
        total += run.num_boxes
        same_count += int(ref.num_boxes == run.num_boxes)
        scale.append(float(np.abs(ref.features).mean()))
        if run.num_boxes == 0 or ref.num_boxes == 0:
            continue
        distance = np.abs(run.boxes[:, None, :] - ref.boxes[None, :, :]).max(axis=2)  # (n_run, n_ref)
        identical += int((distance.min(axis=1) <= box_atol).sum())
        overlap = box_iou(run.boxes, ref.boxes)
        nearest = overlap.argmax(axis=1)
        matched = overlap[np.arange(run.num_boxes), nearest] >= iou_match
        same_region += int(matched.sum())
        if matched.any():
            deviations.append(np.abs(run.features[matched] - ref.features[nearest[matched]]).reshape(-1))
    flat = np.concatenate(deviations) if deviations else np.zeros(1)
    return Agreement(
        boxes_identical=identical / max(total, 1),
        boxes_same_region=same_region / max(total, 1),
        same_count=same_count / max(len(reference), 1),
        feature_max_abs=float(flat.max()),
        feature_mean_abs=float(flat.mean()),
        feature_scale=float(np.mean(scale)),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=("full", "tiny"), default="full")
    parser.add_argument("--weights", default="random", help="checkpoint path, or 'random' (seeded)")
    parser.add_argument("--num-images", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=("tf32", "bf16", "fp16"),
        default=None,
        help="fast mode to compare with exact (default: tf32 on CUDA, bf16 on CPU)",
    )
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the warm-up batch (full model on CPU: ~20 s each)"
    )
    parser.add_argument(
        "--skip-fast",
        action="store_true",
        help="skip the fast mode (bf16 on a CPU without bf16 units is very slow)",
    )
    parser.add_argument("--skip-single", action="store_true", help="skip the one-image-per-forward baseline")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    params = ExtractParams(arch=args.arch, weights=args.weights, device=args.device, seed=args.seed)
    device = resolve_device(params.device)
    loaded = build_detector(params.weights, arch=params.arch, seed=params.seed)
    detector = loaded.detector.to(device)
    fast = args.precision or ("tf32" if device.type == "cuda" else "bf16")
    images = synthetic_scenes(args.num_images, args.width, args.height, args.seed)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    weights = "random (untrained)" if loaded.untrained else args.weights
    print(
        f"device {device} ({device_name}, {torch.get_num_threads()} CPU threads), arch {args.arch}, weights "
        f"{weights}, {args.num_images} images of about {args.width}x{args.height}, batch {args.batch_size}, "
        f"fast mode {fast}",
        flush=True,
    )

    rows: dict[str, dict[str, float]] = {}

    def measure(name: str, batch_size: int, precision: str) -> tuple[float, list[RegionDetections]]:
        seconds, detections = timed_detect(
            detector, images, batch_size, precision, device, not args.no_warmup
        )
        rows[name] = {"seconds": seconds, "images_per_s": len(images) / seconds}
        print(f"  {name}: {len(images) / seconds:.3f} images/s", flush=True)
        return seconds, detections

    single_s, single = (None, None) if args.skip_single else measure("exact, batch 1", 1, "exact")
    exact_s, exact = measure(f"exact, batch {args.batch_size}", args.batch_size, "exact")
    fast_s, fast_results = (
        (None, None) if args.skip_fast else measure(f"{fast}, batch {args.batch_size}", args.batch_size, fast)
    )
    results: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "arch": args.arch,
        "untrained": loaded.untrained,
        "num_images": args.num_images,
        "image_size": [args.width, args.height],
        "batch_size": args.batch_size,
        "fast_mode": None if args.skip_fast else fast,
        "runs": rows,
    }
    print("\nmode                      images/s   s/image")
    for name, row in rows.items():
        print(f"{name:<24} {row['images_per_s']:>9.3f} {row['seconds'] / len(images):>9.3f}")
    if single is not None and single_s is not None:
        batched = compare(single, exact)
        results["ratio_batched_over_single"] = single_s / exact_s
        results["batched_vs_single"] = asdict(batched)
        print(
            f"batched / single (exact): {single_s / exact_s:.2f}x; identical boxes "
            f"{batched.boxes_identical:.1%}, max |feature diff| {batched.feature_max_abs:.2e}"
        )
    if fast_results is not None and fast_s is not None:
        report_fast(results, fast, args.batch_size, exact_s, fast_s, compare(exact, fast_results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def report_fast(
    results: dict[str, object],
    fast: str,
    batch_size: int,
    exact_s: float,
    fast_s: float,
    fast_vs_exact: Agreement,
) -> None:
    """Print and record the fast mode's speed-up and how far its regions stray from exact."""
    results["fast_vs_exact"] = asdict(fast_vs_exact)
    results["ratio_fast_over_exact"] = exact_s / fast_s
    print(
        f"{fast} / exact (batch {batch_size}): {exact_s / fast_s:.2f}x; identical boxes "
        f"{fast_vs_exact.boxes_identical:.1%}, same region (IoU >= 0.95) "
        f"{fast_vs_exact.boxes_same_region:.1%}, same box count {fast_vs_exact.same_count:.0%}; "
        "feature deviation of matched boxes max "
        f"{fast_vs_exact.feature_max_abs:.3g} / mean {fast_vs_exact.feature_mean_abs:.3g} "
        f"(mean |feature| {fast_vs_exact.feature_scale:.3g})"
    )


if __name__ == "__main__":
    main()
