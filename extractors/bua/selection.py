"""Region selection of `generate_tsv.get_detections_from_im`: per-class NMS, max_conf, the MIN/MAX box rule.

Per-class NMS (0.3, "+1" IoU) runs over classes 1..C on the *un-regressed* proposal boxes in original pixels.
Because the IoU matrix is class-independent it is computed once (as bitsets); the greedy sweeps of all classes
then advance together, one proposal rank per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extractors.bua.proposals import pairwise_iou


@dataclass
class Selection:
    """Which proposals become regions, and why."""

    keep: torch.Tensor  # (n,) int64 proposal indices in output order
    max_conf: torch.Tensor  # (R,) float32 max over classes in which the box survives NMS (0 if none)
    max_conf_class: torch.Tensor  # (R,) int64 Caffe class giving max_conf (0 if none); diagnostic
    branch: str  # "within_min_max" | "fewer_than_min" | "more_than_max"


_BITS = 32  # bits used per int64 word (no sign-bit arithmetic)


def _pack_bits(matrix: torch.Tensor) -> torch.Tensor:
    """(N, M) bool -> (N, ceil(M / 32)) int64 bitsets, column j at bit j % 32 of word j // 32."""
    rows, cols = matrix.shape
    words = -(-cols // _BITS)
    padded = torch.zeros((rows, words * _BITS), dtype=torch.int64, device=matrix.device)
    padded[:, :cols] = matrix.to(torch.int64)
    weights = torch.ones(_BITS, dtype=torch.int64, device=matrix.device) << torch.arange(
        _BITS, device=matrix.device
    )
    return (padded.reshape(rows, words, _BITS) * weights).sum(dim=2)


def _sweep_torch(
    order: torch.Tensor, suppress_bits: torch.Tensor, table_offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy NMS of every row at once: step r visits each row's r-th best box; returns kept (rows, R).

    Row i looks up the bitset of its candidate c at `suppress_bits[table_offsets[i] + c]` (all rows share
    one table when no offsets are given), so rows of several images can sweep together.
    """
    num_rows, num_boxes = order.shape
    rows = torch.arange(num_rows, device=order.device)
    removed = torch.zeros((num_rows, suppress_bits.shape[1]), dtype=torch.int64, device=order.device)
    kept = torch.zeros((num_rows, num_boxes), dtype=torch.bool, device=order.device)
    for rank in range(num_boxes):
        candidate = order[:, rank]
        word = torch.div(candidate, _BITS, rounding_mode="floor")
        alive = ((removed.gather(1, word[:, None]).squeeze(1) >> (candidate - word * _BITS)) & 1) == 0
        kept[rows, candidate] = alive
        entry = candidate if table_offsets is None else candidate + table_offsets
        removed |= suppress_bits[entry] * alive[:, None]
    return kept


def _sweep_numpy(order: np.ndarray, suppress_bits: np.ndarray) -> np.ndarray:
    """`_sweep_torch` in numpy (same arithmetic) for the CPU."""
    num_classes, num_boxes = order.shape
    rows = np.arange(num_classes)
    removed = np.zeros((num_classes, suppress_bits.shape[1]), dtype=np.int64)
    kept = np.zeros((num_classes, num_boxes), dtype=bool)
    for rank in range(num_boxes):
        candidate = order[:, rank]
        word = candidate // _BITS
        alive = ((removed[rows, word] >> (candidate - word * _BITS)) & 1) == 0
        kept[rows, candidate] = alive
        removed |= suppress_bits[candidate] * alive[:, None]
    return kept


def per_class_max_conf(
    boxes: torch.Tensor, cls_prob: torch.Tensor, nms_thresh: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """max_conf and its class: per class c >= 1, greedy NMS of (boxes, cls_prob[:, c]); kept boxes take max.

    boxes (R, 4) float32 original-image pixels; cls_prob (R, C+1) Caffe order (background at 0).
    """
    if boxes.device.type != "cpu":
        return per_class_max_conf_batch([boxes], [cls_prob], nms_thresh)[0]
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return cls_prob.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    class_prob = cls_prob[:, 1:].to(torch.float32).t()  # (C, R)
    suppress = pairwise_iou(boxes.to(torch.float32), boxes.to(torch.float32)).double() >= nms_thresh  # (R, R)
    suppress_bits = _pack_bits(suppress)  # (R, words): row i = the boxes a kept box i suppresses
    order = torch.sort(class_prob, dim=1, descending=True, stable=True).indices  # (C, R)
    # numpy: single-threaded small ops; torch's intra-op threads only add barrier waits at these sizes.
    kept = torch.from_numpy(_sweep_numpy(order.numpy(), suppress_bits.numpy()))
    return _max_over_kept(kept, class_prob)


def _max_over_kept(kept: torch.Tensor, class_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, R) kept mask and probabilities -> max_conf (R,) and its Caffe class (0 where no class keeps it)."""
    kept_prob = torch.where(
        kept, class_prob, torch.zeros((), dtype=class_prob.dtype, device=class_prob.device)
    )
    max_conf, best = kept_prob.max(dim=0)
    return max_conf, torch.where(max_conf > 0, best + 1, torch.zeros_like(best))


def per_class_max_conf_batch(
    boxes: Sequence[torch.Tensor], cls_prob: Sequence[torch.Tensor], nms_thresh: float = 0.3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`per_class_max_conf` of several images in ONE greedy sweep (the accelerator path).

    The sweep takes one step per proposal rank whatever the number of rows, so stacking the classes of all
    images of a forward pass costs the same number of kernel launches as one image. Images with fewer
    proposals are padded with boxes of probability -1, which sort last and suppress nothing.
    """
    device = boxes[0].device
    counts = [int(b.shape[0]) for b in boxes]
    num_images, max_boxes = len(boxes), max(counts)
    if max_boxes == 0:
        return [
            per_class_max_conf(b.cpu(), p.cpu(), nms_thresh) for b, p in zip(boxes, cls_prob, strict=True)
        ]
    num_classes = cls_prob[0].shape[1] - 1
    words = -(-max_boxes // _BITS)
    class_prob = torch.full((num_images, num_classes, max_boxes), -1.0, dtype=torch.float32, device=device)
    suppress_bits = torch.zeros((num_images, max_boxes, words), dtype=torch.int64, device=device)
    for index, (image_boxes, image_prob) in enumerate(zip(boxes, cls_prob, strict=True)):
        count = counts[index]
        if count == 0:
            continue
        class_prob[index, :, :count] = image_prob[:, 1:].to(torch.float32).t()
        image_boxes = image_boxes.to(torch.float32)
        suppress = torch.zeros((count, max_boxes), dtype=torch.bool, device=device)
        suppress[:, :count] = pairwise_iou(image_boxes, image_boxes).double() >= nms_thresh
        suppress_bits[index, :count] = _pack_bits(suppress)
    order = torch.sort(class_prob, dim=2, descending=True, stable=True).indices  # (B, C, R)
    # Each image's class rows look up bitsets in that image's slice of one flat table.
    table_offsets = (torch.arange(num_images, device=device) * max_boxes).repeat_interleave(num_classes)
    kept = _sweep_torch(
        order.reshape(num_images * num_classes, max_boxes), suppress_bits.reshape(-1, words), table_offsets
    ).reshape(num_images, num_classes, max_boxes)
    results = []
    for index, count in enumerate(counts):
        results.append(_max_over_kept(kept[index, :, :count], class_prob[index, :, :count]))
    return results


def select_regions(
    boxes: torch.Tensor,
    cls_prob: torch.Tensor,
    *,
    conf_thresh: float = 0.2,
    nms_thresh: float = 0.3,
    min_boxes: int = 36,
    max_boxes: int = 36,
    max_conf: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Selection:
    """generate_tsv's rule: the boxes with max_conf >= conf_thresh, in proposal order, when their count lies
    in [min_boxes, max_boxes]; otherwise the top min/max boxes by max_conf, in descending max_conf order.

    `max_conf` may carry a precomputed (max_conf, class) pair, e.g. from `per_class_max_conf_batch`.
    """
    conf, conf_class = max_conf if max_conf is not None else per_class_max_conf(boxes, cls_prob, nms_thresh)
    passing = torch.nonzero(conf.double() >= conf_thresh).squeeze(1)
    by_conf = torch.sort(conf, descending=True, stable=True).indices
    if passing.numel() < min_boxes:
        keep, branch = by_conf[:min_boxes], "fewer_than_min"
    elif passing.numel() > max_boxes:
        keep, branch = by_conf[:max_boxes], "more_than_max"
    else:
        keep, branch = passing, "within_min_max"
    return Selection(keep=keep, max_conf=conf, max_conf_class=conf_class, branch=branch)


def top_labels(prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based vocabulary ids and confidences: argmax / max over prob[:, 1:] (LXMERT generate_tsv)."""
    if prob.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=prob.device), prob.new_zeros(0)
    conf, ids = prob[:, 1:].max(dim=1)
    return ids, conf
