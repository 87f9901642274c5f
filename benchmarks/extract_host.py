"""Host time of the detector per batch of full-size images, before and after, measured in one run.

The host work around the network (what serialises with an accelerator): decoding an image into a
device-ready blob, the RPN proposal layer with its NMS, the per-class NMS and the region selection, and
bringing the regions back. "Before" is the code of a baseline commit (default f66bdf1, the last one before
this work), loaded from git into a temporary package; "after" is the working tree. Both get the same inputs
in the same process, in alternating rounds:

* JPEG-encoded synthetic scenes (benchmarks/extract.py) at --width x --height;
* RPN maps, class/attribute probabilities and pool5 features drawn at random at the full detector's shapes
  (the network itself is not timed: it is the same code before and after).

Steps, per batch:
* blob: before, decode + mean subtraction through a float64 intermediate + resize + padding on the main
  thread; after, decode + table lookup + resize in the loader workers (timed as worker time, off the main
  thread), and only the padding into one batch on the main thread;
* proposals: the Caffe proposal layer of every image (host NMS on a CPU run);
* selection: per-class NMS, the generate_tsv rule, the gather of the kept regions and the copy to numpy
  (before: per image, six conversions; after: batched, one copy).

Usage: python3 benchmarks/extract_host.py [--batch-size 8] [--rounds 5] [--baseline f66bdf1]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from extract import synthetic_scenes  # noqa: E402

from benchmarks.host_info import cpu_name  # noqa: E402
from extractors.bua.config import DetectorConfig  # noqa: E402
from extractors.bua.detector import BottomUpAttentionDetector  # noqa: E402
from extractors.bua.preprocess import feature_size, pad_blobs  # noqa: E402
from extractors.bua.roi_head import RoIHeadOutput  # noqa: E402

BASELINE_MODULES = ("preprocess", "proposals", "selection")


def load_baseline(commit: str, folder: Path) -> dict[str, ModuleType]:
    """The baseline commit's preprocess/proposals/selection modules, imported under `before_*` names."""
    for name in BASELINE_MODULES:
        try:
            source = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{commit}:extractors/bua/{name}.py"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            raise SystemExit(f"cannot read extractors/bua/{name}.py at {commit} from git: {exc}") from None
        for other in BASELINE_MODULES:
            source = source.replace(f"from extractors.bua.{other} import", f"from before_{other} import")
        (folder / f"before_{name}.py").write_text(source, encoding="utf-8")
    sys.path.insert(0, str(folder))
    return {name: importlib.import_module(f"before_{name}") for name in BASELINE_MODULES}


def synthetic_heads(
    config: DetectorConfig, blob_sizes: list[tuple[int, int]], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded RPN fg probabilities and deltas, and per-RoI cls/attr probabilities and pool5 at full shapes."""
    count, anchors, rois = len(blob_sizes), config.num_anchors, config.post_nms_top_n
    height = max(feature_size(h) for h, _ in blob_sizes)
    width = max(feature_size(w) for _, w in blob_sizes)
    logits = torch.from_numpy(rng.normal(0, 2, size=(count, anchors, height, width)).astype(np.float32))
    fg_prob = torch.sigmoid(logits)
    deltas = torch.from_numpy(rng.normal(0, 0.2, size=(count, 4 * anchors, height, width)).astype(np.float32))
    cls = torch.softmax(torch.from_numpy(rng.normal(0, 3, size=(count * rois, config.num_classes + 1))), 1)
    attr = torch.softmax(
        torch.from_numpy(rng.normal(0, 3, size=(count * rois, config.num_attributes + 1))), 1
    )
    pool5 = torch.from_numpy(np.abs(rng.normal(0, 1, size=(count * rois, config.feature_dim))))
    return fg_prob, deltas, cls.float(), attr.float(), pool5.float()


class Timer:
    """Accumulates seconds per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = function()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return result


def run_before(
    before: dict[str, ModuleType],
    config: DetectorConfig,
    detector: BottomUpAttentionDetector,
    jpegs: list[bytes],
    inputs: tuple[torch.Tensor, ...],
    timer: Timer,
) -> int:
    """The baseline's host path for one batch; returns the number of regions (a checksum of the work)."""
    prep = before["preprocess"]

    def blobs() -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
        made = []
        for data in jpegs:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            made.append(prep.image_blob(image, config.test_scale, config.max_size, config.pixel_means_bgr))
        sizes = [(b.shape[1], b.shape[2]) for b, _ in made]
        batch = np.zeros((len(made), 3, max(h for h, _ in sizes), max(w for _, w in sizes)), np.float32)
        for index, (blob, _) in enumerate(made):
            batch[index, :, : blob.shape[1], : blob.shape[2]] = blob
        return torch.from_numpy(batch), [scale for _, scale in made], sizes

    _, scales, sizes = timer.run("blob (main thread)", blobs)  # type: ignore[misc]
    fg_prob, deltas, cls_prob, attr_prob, pool5 = inputs
    anchors = detector.proposal_generator.cell_anchors

    def proposals() -> list:
        out = []
        for index, ((h, w), scale) in enumerate(zip(sizes, scales, strict=True)):
            fh, fw = feature_size(h), feature_size(w)
            out.append(
                before["proposals"].proposal_layer(
                    fg_prob[index, :, :fh, :fw],
                    deltas[index, :, :fh, :fw],
                    anchors,
                    (float(h), float(w), float(np.float32(scale))),
                    feature_stride=config.feature_stride,
                    pre_nms_top_n=config.pre_nms_top_n,
                    post_nms_top_n=config.post_nms_top_n,
                    nms_thresh=config.rpn_nms_thresh,
                    min_size=config.rpn_min_size,
                )
            )
        return out

    props = timer.run("proposals", proposals)
    rois = config.post_nms_top_n

    def selection() -> int:
        regions = 0
        for index, (image_props, scale) in enumerate(zip(props, scales, strict=True)):  # type: ignore[arg-type]
            count = image_props.boxes.shape[0]
            rows = slice(index * rois, index * rois + count)
            boxes = image_props.boxes / torch.tensor(np.float32(scale))
            chosen = before["selection"].select_regions(
                boxes,
                cls_prob[rows],
                conf_thresh=config.conf_thresh,
                nms_thresh=config.nms_thresh,
                min_boxes=config.min_boxes,
                max_boxes=config.max_boxes,
            )
            keep = chosen.keep
            object_ids, object_conf = before["selection"].top_labels(cls_prob[rows][keep])
            attribute_ids, attribute_conf = before["selection"].top_labels(attr_prob[rows][keep])
            arrays = (
                boxes[keep].float().cpu().numpy(),
                pool5[rows][keep].float().cpu().numpy(),
                object_ids.cpu().numpy(),
                object_conf.float().cpu().numpy(),
                attribute_ids.cpu().numpy(),
                attribute_conf.float().cpu().numpy(),
            )
            regions += len(arrays[0])
        return regions

    return int(timer.run("selection + copy", selection))  # type: ignore[arg-type]


def run_after(
    detector: BottomUpAttentionDetector,
    jpegs: list[bytes],
    inputs: tuple[torch.Tensor, ...],
    timer: Timer,
) -> int:
    """The working tree's host path for one batch (the blobs as loader workers make them)."""
    maker = detector.preparer()

    def worker_side() -> list:
        return [maker(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)) for data in jpegs]

    prepared = timer.run("blob (loader workers)", worker_side)
    _, sizes = timer.run("blob (main thread)", lambda: pad_blobs(prepared))  # type: ignore[arg-type]
    fg_prob, deltas, cls_prob, attr_prob, pool5 = inputs
    im_infos = [
        (float(h), float(w), float(np.float32(p.im_scale))) for (h, w), p in zip(sizes, prepared, strict=True)
    ]
    feature_sizes = [(feature_size(h), feature_size(w)) for h, w in sizes]
    props = timer.run(
        "proposals",
        lambda: detector._padded_proposals(fg_prob, deltas, im_infos, feature_sizes, on_device=False),
    )

    def selection() -> int:
        zeros = torch.zeros(props.boxes.shape[0] * props.boxes.shape[1])
        heads = RoIHeadOutput(pool5, zeros, cls_prob, zeros, attr_prob, zeros)
        regions = detector._regions_padded(props, heads, im_infos, prepared, on_device=False)
        return sum(r.num_boxes for r in regions)

    return int(timer.run("selection + copy", selection))  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--baseline", default="f66bdf1", help="git commit of the 'before' code")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    config = DetectorConfig()
    detector = BottomUpAttentionDetector(config)
    rng = np.random.default_rng(args.seed)
    scenes = synthetic_scenes(args.batch_size, args.width, args.height, args.seed)
    jpegs = [cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for scene in scenes]
    maker = detector.preparer()
    sizes = [tuple(maker(scene).blob.shape[1:]) for scene in scenes]
    inputs = synthetic_heads(config, sizes, rng)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as folder:
        before_modules = load_baseline(args.baseline, Path(folder))
        rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        regions: dict[str, int] = {}
        for round_index in range(args.rounds + 1):  # round 0 warms caches up and is not counted
            for label in ("before", "after"):
                timer = Timer()
                if label == "before":
                    regions[label] = run_before(before_modules, config, detector, jpegs, inputs, timer)
                else:
                    regions[label] = run_after(detector, jpegs, inputs, timer)
                if round_index:
                    rounds[label].append(timer.seconds)
    steps = ["blob (main thread)", "proposals", "selection + copy"]
    median = {
        label: {step: statistics.median(r.get(step, 0.0) for r in rounds[label]) * 1e3 for step in steps}
        for label in rounds
    }
    worker_ms = statistics.median(r["blob (loader workers)"] for r in rounds["after"]) * 1e3
    total = {label: sum(median[label].values()) for label in median}
    print(
        f"host time per batch of {args.batch_size} images of ~{args.width}x{args.height} (blob ~600x800), "
        f"full detector shapes, median of {args.rounds} rounds, torch threads {args.threads}; "
        f"baseline {args.baseline}; {cpu_name()}, torch {torch.__version__}, "
        f"{datetime.date.today()}"
    )
    print(f"regions per batch: before {regions['before']}, after {regions['after']}")
    print("| step | before ms | after ms | ratio |")
    print("|---|---:|---:|---:|")
    for step in steps:
        b, a = median["before"][step], median["after"][step]
        print(f"| {step} | {b:.1f} | {a:.1f} | {b / a:.1f}x |")
    print(
        f"| **main thread, total** | {total['before']:.1f} | {total['after']:.1f} | "
        f"**{total['before'] / total['after']:.1f}x** |"
    )
    print(f"| blob in the loader workers (off the main thread) | | {worker_ms:.1f} | |")
    with_workers = total["after"] + worker_ms
    print(
        f"| all host work incl. workers | {total['before']:.1f} | {with_workers:.1f} | "
        f"{total['before'] / with_workers:.1f}x |"
    )


if __name__ == "__main__":
    main()
