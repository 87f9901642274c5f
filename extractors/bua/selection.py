"""Region selection of `generate_tsv.get_detections_from_im`: per-class NMS, max_conf, the MIN/MAX box rule.

Per-class NMS (0.3, "+1" IoU, `cpu_nms` order `caffe_descending(cls_prob[:, c])`) runs over classes 1..C on
the *un-regressed* proposal boxes in original pixels. The IoU matrix is class-independent: computed once.

Two paths giving identical results:
* reference, per image (`per_class_max_conf`, `select_regions`): on the CPU the greedy sweeps of all classes
  advance together in numpy, one proposal rank per step, with the suppression rows as bitsets;
* batched, on any device (`per_class_max_conf_padded`, `select_regions_padded`): a zero-padded batch of
  images, every (image, class) row solved at once by the fixed-point NMS of nms.py, the selection by masks
  and sorts; no per-image host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from extractors.bua.nms import (
    BUILD_FRACTION,
    DEFAULT_MAX_ELEMENTS,
    caffe_descending,
    caffe_descending_masked,
    fixed_point_keep,
    float32_threshold,
    left_align,
    pack_bits,
    pairwise_iou,
)

# generate_tsv's three outcomes of the MIN/MAX box rule; `select_regions_padded` returns indices into this.
BRANCHES: tuple[str, ...] = ("within_min_max", "fewer_than_min", "more_than_max")


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


def _sweep_numpy(order: np.ndarray, suppress_bits: np.ndarray) -> np.ndarray:
    """Greedy NMS of every row at once: step r visits each row's r-th box in `order`; returns kept (rows, R).

    Row i = the boxes a kept box i suppresses, as bitsets (`_pack_bits`). numpy: single-threaded small ops;
    torch's intra-op threads only add barrier waits at these sizes.
    """
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

    boxes (R, 4) float32 original-image pixels; cls_prob (R, C+1) Caffe order (background at 0). The reference
    path; off the CPU it runs as a one-image `per_class_max_conf_padded`.
    """
    num_boxes = boxes.shape[0]
    if boxes.device.type != "cpu":
        counts = torch.full((1,), num_boxes, dtype=torch.long, device=boxes.device)
        conf, conf_class = per_class_max_conf_padded(boxes[None], cls_prob[None], counts, nms_thresh)
        return conf[0], conf_class[0]
    if num_boxes == 0:
        return torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    class_prob = cls_prob[:, 1:].to(torch.float32).t()  # (C, R)
    suppress = pairwise_iou(boxes.to(torch.float32), boxes.to(torch.float32)).double() >= nms_thresh  # (R, R)
    suppress_bits = _pack_bits(suppress)  # (R, words): row i = the boxes a kept box i suppresses
    order = caffe_descending(class_prob)  # (C, R): cpu_nms's cls_scores.argsort()[::-1]
    kept = torch.from_numpy(_sweep_numpy(order.numpy(), suppress_bits.numpy()))
    return _max_over_kept(kept, class_prob, dim=0)


def _max_over_kept(
    kept: torch.Tensor, class_prob: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept mask and probabilities (classes along `dim`) -> max_conf and its Caffe class (0: none keeps it).

    The first class reaching the maximum wins, as generate_tsv's strict `cls_scores > max_conf` update.
    """
    kept_prob = torch.where(
        kept, class_prob, torch.zeros((), dtype=class_prob.dtype, device=class_prob.device)
    )
    max_conf = kept_prob.amax(dim=dim)
    best = kept_prob.argmax(dim=dim)  # documented: the first maximal index
    return max_conf, torch.where(max_conf > 0, best + 1, torch.zeros_like(best))


def _overlap_by_image(
    boxes: torch.Tensor, valid: torch.Tensor, thresh32: float, max_elements: int
) -> torch.Tensor:
    """(B, R, R) bool [b, i, j]: IoU(j, i) >= thresh (j the kept box), between valid boxes of image b."""
    num_images, num_boxes = valid.shape
    result = torch.empty((num_images, num_boxes, num_boxes), dtype=torch.bool, device=boxes.device)
    per_chunk = max(1, max_elements // BUILD_FRACTION // max(1, num_boxes * num_boxes))
    for start in range(0, num_images, per_chunk):
        rows = slice(start, start + per_chunk)
        hit = (pairwise_iou(boxes[rows], boxes[rows]) >= thresh32).transpose(1, 2)
        result[rows] = hit & valid[rows, :, None] & valid[rows, None, :]
    return result


def per_class_max_conf_padded(
    boxes: torch.Tensor,
    cls_prob: torch.Tensor,
    counts: torch.Tensor,
    nms_thresh: float = 0.3,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """boxes (B, R, 4) original pixels, cls_prob (B, R, C+1) Caffe order, counts (B,); returns max_conf (B, R)
    float32 and its Caffe class (B, R) long (0 where none; padding rows 0) equal per image to
    per_class_max_conf.

    Every (image, class) pair is one row of the fixed-point NMS (nms.py), in original index order: j
    suppresses i when IoU(j, i) >= thresh and j comes before i in the class's `caffe_descending` order. Rows
    are chunked so that chunk * R * R stays within `max_elements`; padding rows (>= count) hold anything.
    """
    num_images, num_boxes = boxes.shape[:2]
    num_classes = cls_prob.shape[2] - 1
    device = boxes.device
    counts = counts.to(device=device, dtype=torch.long)
    if num_images == 0 or num_boxes == 0 or num_classes <= 0:
        return (
            torch.zeros((num_images, num_boxes), dtype=torch.float32, device=device),
            torch.zeros((num_images, num_boxes), dtype=torch.long, device=device),
        )
    valid = torch.arange(num_boxes, device=device)[None, :] < counts[:, None]  # (B, R)
    thresh32 = float32_threshold(nms_thresh)
    overlap = _overlap_by_image(boxes.to(torch.float32), valid, thresh32, max_elements)  # [b, i, j]
    class_prob = cls_prob[:, :, 1:].to(torch.float32).transpose(1, 2)  # (B, C, R)
    order = caffe_descending_masked(class_prob, valid[:, None, :].expand(-1, num_classes, -1))
    positions = torch.arange(num_boxes, device=device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions).reshape(-1, num_boxes)  # (B*C, R)
    image_of_row = torch.arange(num_images, device=device).repeat_interleave(num_classes)
    num_rows = num_images * num_classes
    kept = torch.empty((num_rows, num_boxes), dtype=torch.bool, device=device)
    matrix = num_boxes * num_boxes
    per_chunk = max(1, max_elements // matrix)
    per_build = max(1, max_elements // BUILD_FRACTION // matrix)
    words = -(-num_boxes // 64)
    for start in range(0, num_rows, per_chunk):
        stop = min(start + per_chunk, num_rows)
        suppressors = torch.empty((stop - start, num_boxes, words), dtype=torch.int64, device=device)
        for first in range(start, stop, per_build):
            last = min(first + per_build, stop)
            row_rank = rank[first:last]
            earlier = row_rank[:, None, :] < row_rank[:, :, None]  # [r, i, j]: j before i in the class order
            suppressors[first - start : last - start] = pack_bits(overlap[image_of_row[first:last]] & earlier)
        kept[start:stop] = fixed_point_keep(suppressors)
        del suppressors
    kept = kept.reshape(num_images, num_classes, num_boxes) & valid[:, None, :]
    return _max_over_kept(kept, class_prob, dim=1)


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

    `max_conf` may carry a precomputed (max_conf, class) pair, e.g. from `per_class_max_conf_padded`. The
    by-confidence order is generate_tsv's `np.argsort(max_conf)[::-1]` (`caffe_descending`).
    """
    conf, conf_class = max_conf if max_conf is not None else per_class_max_conf(boxes, cls_prob, nms_thresh)
    passing = torch.nonzero(conf.double() >= conf_thresh).squeeze(1)
    by_conf = caffe_descending(conf)
    if passing.numel() < min_boxes:
        keep, branch = by_conf[:min_boxes], "fewer_than_min"
    elif passing.numel() > max_boxes:
        keep, branch = by_conf[:max_boxes], "more_than_max"
    else:
        keep, branch = passing, "within_min_max"
    return Selection(keep=keep, max_conf=conf, max_conf_class=conf_class, branch=branch)


def select_regions_padded(
    max_conf: torch.Tensor, counts: torch.Tensor, *, conf_thresh: float, min_boxes: int, max_boxes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keep (B, max_boxes) long proposal indices in output order (padding 0), keep_counts (B,), branch (B,)
    long index into BRANCHES; equal per image to select_regions(...).

    max_conf (B, R) with rows >= counts[b] ignored. Should min_boxes exceed max_boxes, keep is min_boxes wide
    (the "fewer" branch keeps that many).
    """
    num_images, num_boxes = max_conf.shape
    device = max_conf.device
    counts = counts.to(device=device, dtype=torch.long)
    width = max(min_boxes, max_boxes, 0)
    conf = max_conf.to(torch.float32)
    positions = torch.arange(num_boxes, device=device)
    valid = positions[None, :] < counts[:, None]
    passing = valid & (conf >= float32_threshold(conf_thresh))  # conf.double() >= conf_thresh
    num_passing = passing.sum(dim=1)
    fewer = num_passing < min_boxes
    more = ~fewer & (num_passing > max_boxes)
    branch = torch.where(fewer, 1, torch.where(more, 2, 0)).to(torch.long)
    in_order = left_align(passing, positions.expand(num_images, -1), width)  # ascending proposal index
    by_conf = torch.zeros((num_images, width), dtype=torch.long, device=device)
    top = min(width, num_boxes)
    by_conf[:, :top] = caffe_descending_masked(conf, valid)[:, :top]
    keep_counts = torch.where(
        fewer, counts.clamp(max=min_boxes), torch.where(more, torch.full_like(counts, max_boxes), num_passing)
    )
    keep = torch.where((branch == 0)[:, None], in_order, by_conf)
    filled = torch.arange(width, device=device)[None, :] < keep_counts[:, None]
    return torch.where(filled, keep, torch.zeros_like(keep)), keep_counts, branch


def top_labels(prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based vocabulary ids and confidences: argmax / max over prob[:, 1:] (LXMERT generate_tsv)."""
    if prob.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=prob.device), prob.new_zeros(0)
    conf, ids = prob[:, 1:].max(dim=1)
    return ids, conf
