"""Every precision mode of the bottom-up-attention detector against exact float32: speed and agreement.

For each mode (exact, tf32, bf16, fp16) the same seeded synthetic scenes go through `detector.detect` in
batches of --batch-size; the script reports images/s and how far the mode strays from exact:

* boxes identical: share of exact's selected boxes whose box at the same output position is bit-identical;
* feature deviation over those identical boxes: max |diff| / max |exact| and mean |diff| / mean |exact|;
* with --proposals, whether each image's RPN proposals (`detector.trace`) are bit-identical to exact's
  (the fast modes keep backbone and RPN in float32, so they should be).

It prints a table and a Markdown block (device, torch version, date, command) to paste into RESULTS.md.
Weights are random (seeded, untrained): the numbers measure arithmetic, not detection quality. fp16 on a CPU
runs very slowly (no fp16 convolution kernels); bf16 uses oneDNN.

Usage:
    python benchmarks/extract_modes.py                      # tiny model, CPU, < 1 min on 2 cores
    python benchmarks/extract_modes.py --proposals --modes exact bf16
    python benchmarks/extract_modes.py --arch full --device cuda --num-images 64 --batch-size 8 --proposals
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.host_info import cpu_name
from extractors.bua.factory import build_detector
from extractors.bua.precision import PRECISIONS

# (width, height) of the synthetic scenes: the tiny model rescales to 128 px anyway; the full model's test
# scale is 600 with a 1000 px cap, so 1000x600 images are its largest ordinary input.
DEFAULT_SIZES = {"tiny": (320, 240), "full": (1000, 600)}


def synthetic_scenes(count: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """Seeded BGR uint8 scenes: smoothed noise texture, stripes, rectangles and discs; sizes jittered so
    batches need padding."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        w = int(width * rng.uniform(0.85, 1.0))
        h = int(height * rng.uniform(0.85, 1.0))
        coarse = rng.uniform(0, 120, size=(h // 8 + 1, w // 8 + 1, 3))
        image = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w]
        image = image + rng.normal(0, 12, size=(h, w, 3))
        ys, xs = np.mgrid[0:h, 0:w]
        period = rng.uniform(6, 30)
        image += 25 * np.sin((xs * rng.uniform(-1, 1) + ys) / period)[..., None]
        for _ in range(int(rng.integers(3, 9))):
            colour = rng.integers(40, 256, size=3)
            x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
            if rng.random() < 0.5:
                x1 = min(w, x0 + int(rng.integers(16, max(17, w // 2))))
                y1 = min(h, y0 + int(rng.integers(16, max(17, h // 2))))
                image[y0:y1, x0:x1] = colour
            else:
                radius = int(rng.integers(8, max(9, min(w, h) // 4)))
                image[(xs - x0) ** 2 + (ys - y0) ** 2 <= radius**2] = colour
        scenes.append(np.clip(image, 0, 255).astype(np.uint8))
    return scenes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(images: Sequence[np.ndarray], batch_size: int) -> list[list[np.ndarray]]:
    return [list(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]


def run_mode(
    detector: torch.nn.Module,
    images: Sequence[np.ndarray],
    mode: str,
    batch_size: int,
    device: torch.device,
    warmup: bool,
) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """Seconds for all images (after an untimed warm-up pass) and each image's (boxes, features)."""
    batches = _batches(images, batch_size)
    if warmup:
        # Over every batch, not just the first: each padded blob shape needs its own oneDNN primitives /
        # cuDNN autotuning, which would otherwise bill the first mode timed for every shape.
        for batch in batches:
            detector.detect(batch, precision=mode)
    _sync(device)
    started = time.perf_counter()
    results = []
    for batch in batches:
        results += [(d.boxes, d.features) for d in detector.detect(batch, precision=mode)]
    _sync(device)
    return time.perf_counter() - started, results


def proposal_boxes(
    detector: torch.nn.Module, images: Sequence[np.ndarray], mode: str, batch_size: int
) -> list[np.ndarray]:
    """Each image's RPN proposals (blob pixels) from `detector.trace`."""
    boxes = []
    for batch in _batches(images, batch_size):
        boxes += [trace.proposals.boxes.cpu().numpy() for trace in detector.trace(batch, precision=mode)]
    return boxes


@dataclass
class ModeRow:
    """One mode's speed and agreement with exact."""

    mode: str
    seconds: float
    images_per_s: float
    speedup: float  # exact seconds / this mode's seconds
    boxes_identical: float  # share of exact's boxes with a bit-identical box at the same position
    feature_max_rel: float  # max |diff| / max |exact| over the identical boxes (nan: none identical)
    feature_mean_rel: float  # mean |diff| / mean |exact| over the identical boxes
    proposals_identical: float | None  # share of images with bit-identical proposals (None: not measured)
    error: str | None = None


def _bits(array: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns, so equality is bit for bit (-0.0 != 0.0, NaN == same NaN)."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


def agreement(
    exact: list[tuple[np.ndarray, np.ndarray]], other: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, float, float]:
    """(share of bit-identical boxes by position, max and mean relative feature deviation over them)."""
    identical = total = 0
    diffs, refs = [], []
    for (ref_boxes, ref_feats), (boxes, feats) in zip(exact, other, strict=True):
        total += ref_boxes.shape[0]
        n = min(ref_boxes.shape[0], boxes.shape[0])
        same = np.all(_bits(ref_boxes[:n]) == _bits(boxes[:n]), axis=1)
        identical += int(same.sum())
        if same.any():
            diffs.append(np.abs(feats[:n][same] - ref_feats[:n][same]).ravel())
            refs.append(np.abs(ref_feats[:n][same]).ravel())
    if not diffs:
        return identical / max(total, 1), float("nan"), float("nan")
    diff, ref = np.concatenate(diffs), np.concatenate(refs)
    return (
        identical / max(total, 1),
        float(diff.max() / max(ref.max(), 1e-30)),
        float(diff.mean() / max(ref.mean(), 1e-30)),
    )


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and np.isnan(value):
        return "n/a"
    return format(value, spec)


def markdown(rows: list[ModeRow], header: dict[str, str]) -> str:
    """The results as a Markdown block: a context list, then the table."""
    lines = [f"### Precision modes, {header['arch']} model ({header['date']})", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key not in ("arch", "date")]
    lines += [
        "",
        "| mode | images/s | vs exact | boxes identical | feature max rel | feature mean rel "
        "| proposals identical |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.mode} | failed: {row.error} | | | | | |")
            continue
        lines.append(
            f"| {row.mode} | {row.images_per_s:.3f} | {row.speedup:.2f}x | {row.boxes_identical:.1%} | "
            f"{_fmt(row.feature_max_rel, '.2e')} | {_fmt(row.feature_mean_rel, '.2e')} | "
            f"{_fmt(row.proposals_identical, '.0%')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[ModeRow]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--width", type=int, default=None, help="scene width (default: by arch)")
    parser.add_argument("--height", type=int, default=None, help="scene height (default: by arch)")
    parser.add_argument("--seed", type=int, default=0, help="seeds both the weights and the scenes")
    parser.add_argument("--proposals", action="store_true", help="also compare RPN proposals via trace()")
    parser.add_argument("--no-warmup", action="store_true", help="skip each mode's untimed warm-up pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    shown_args = sys.argv[1:] if argv is None else list(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    detector = build_detector("random", arch=args.arch, seed=args.seed).detector.to(device)
    width, height = DEFAULT_SIZES[args.arch]
    width, height = args.width or width, args.height or height
    images = synthetic_scenes(args.num_images, width, height, args.seed)
    modes = ["exact", *[m for m in args.modes if m != "exact"]]  # exact is the reference, always first
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    header = {
        "arch": args.arch,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": f"{device} ({device_name}, {torch.get_num_threads()} CPU threads)",
        "torch": torch.__version__,
        "images": f"{args.num_images} synthetic scenes of about {width}x{height}, batch {args.batch_size}",
        "weights": f"random, seed {args.seed} (untrained)",
        "command": "`" + shlex.join(["python", "benchmarks/extract_modes.py", *shown_args]) + "`",
    }
    print(", ".join(f"{k} {v}" for k, v in header.items() if k != "command"), flush=True)

    rows: list[ModeRow] = []
    exact_s, exact = 0.0, []
    exact_props: list[np.ndarray] = []
    for mode in modes:
        try:
            seconds, results = run_mode(detector, images, mode, args.batch_size, device, not args.no_warmup)
            props = proposal_boxes(detector, images, mode, args.batch_size) if args.proposals else None
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a dtype the device has no kernels for
            message = " ".join(str(exc).split())[:120]
            print(f"  {mode}: failed: {message}", flush=True)
            nan = float("nan")
            rows.append(ModeRow(mode, nan, nan, nan, nan, nan, nan, None, error=message))
            if mode == "exact":
                raise
            continue
        if mode == "exact":
            exact_s, exact, exact_props = seconds, results, props or []
        identical, max_rel, mean_rel = agreement(exact, results)
        same_props = None
        if props is not None:
            same_props = float(
                np.mean(
                    [
                        a.shape == b.shape and np.array_equal(_bits(a), _bits(b))
                        for a, b in zip(exact_props, props, strict=True)
                    ]
                )
            )
        row = ModeRow(
            mode,
            seconds,
            len(images) / seconds,
            exact_s / seconds,
            identical,
            max_rel,
            mean_rel,
            same_props,
        )
        rows.append(row)
        print(f"  {mode}: {row.images_per_s:.3f} images/s, boxes identical {identical:.1%}", flush=True)

    print(
        f"\n{'mode':<6} {'img/s':>9} {'vs exact':>9} {'boxes=':>8} {'feat max':>10} {'feat mean':>10} "
        f"{'props=':>7}"
    )
    for row in rows:
        if row.error:
            print(f"{row.mode:<6} failed: {row.error}")
            continue
        print(
            f"{row.mode:<6} {row.images_per_s:>9.3f} {row.speedup:>8.2f}x {row.boxes_identical:>8.1%} "
            f"{_fmt(row.feature_max_rel, '.2e'):>10} {_fmt(row.feature_mean_rel, '.2e'):>10} "
            f"{_fmt(row.proposals_identical, '.0%'):>7}"
        )
    print("\n" + markdown(rows, header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"header": header, "rows": [asdict(row) for row in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
