"""Caffe `cpu_nms` semantics: a reference loop on the host, and an exact batched method for any torch device.

Sort order. The reference sorts with numpy's `argsort()[::-1]` everywhere. We model that as: descending, and
among exactly equal scores the HIGHER index first (the reverse of a stable ascending sort). A stable
descending sort (lower index first) differs on ties, so every sort of the detector uses `caffe_descending`.

Arithmetic. IoU is float32 with "+1" widths in `cpu_nms`'s operation order, `inter / (area_kept +
area_later - inter)`, and a later box is suppressed when that float32 IoU, compared in double, is >= the
threshold. `float32_threshold` turns the double threshold into the float32 value that decides every float32
IoU the same way, so the batched path needs no float64 (which some devices lack).

Batched NMS: the fixed point of greedy NMS. With the boxes in processing order, let S[j, i] = (j before i)
and IoU(j, i) >= thresh. Greedy keep is the unique k with k[i] = not any_j(k[j] and S[j, i]): k[i] depends
only on earlier entries, so the equation fixes the entries one after the other. We iterate k_{t+1}[i] =
not any_j(k_t[j] and S[j, i]) from all-True. By induction the first t entries are right after t iterations,
so a fixed point is reached within N + 1 steps; and a fixed point satisfies the equation, so it IS the greedy
result. Each problem (an image, or an image-class pair) is one independent row of a batch.

Representation: S is held as bitsets, row i = the suppressors j of box i packed 64 per int64 word, so one
iteration is a bitwise AND with the packed keep vector and an any() per box (exact boolean algebra, no
rounding; 1/16 of the memory traffic of a float16 matmul). Every few iterations one host sync checks which
rows changed; rows that did not are at their own fixed point and are retired, so the long-running rows
finish on a smaller batch. Syncs are per chunk and check, never per image.

Iterations: entries stop changing once every chain of decisions that hinge on each other (kept box
suppresses a box, which then no longer suppresses the next, ...) is resolved. Greedy NMS is a
lexicographically-first maximal independent set, sequential in the worst case (a row of boxes each
overlapping only its neighbour needs one iteration per box, still exact); on detector outputs ~10-30.

Memory: rows are chunked so that chunk * N * N (one bit each) stays within `max_elements`; a single row
larger than that still runs alone. The float32 IoU / bool temporaries that build the bitsets cover at most
max_elements / 8 entries at a time (about 2 bytes per budget element at the peak).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MAX_ELEMENTS = 2**28  # (row, box, box) entries held at once: 32 MiB as bits
BUILD_FRACTION = 8  # float32/bool build temporaries cover at most max_elements / 8 entries
_CHECK_EVERY = 4  # fixed-point iterations between two convergence checks (host syncs)
_WORD = 64  # bits per packed word


def caffe_descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim as numpy's `argsort()[::-1]`: descending, ties -> higher index first.

    A stable descending sort of the reversed array visits equal scores in reversed-index order, which is the
    reverse of a stable ascending sort. NaN sorts first (numpy puts it last before the reversal).
    """
    count = scores.shape[-1]
    flipped_order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    return (count - 1) - flipped_order


def caffe_descending_masked(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`caffe_descending` over the valid entries only, followed by the invalid ones (in any order).

    The valid entries keep exactly the order they would have without the invalid ones (a stable second sort
    by validity), whatever values the invalid entries hold (NaN, -inf, garbage).
    """
    order = caffe_descending(scores)
    invalid_rank = (~valid.gather(-1, order)).to(torch.uint8)
    return order.gather(-1, torch.sort(invalid_rank, dim=-1, stable=True).indices)


def float32_threshold(thresh: float) -> float:
    """The smallest float32 t >= thresh: for every float32 x, (x >= t) == (float64(x) >= thresh).

    Comparing a float32 tensor with a Python float rounds the float to float32 (to nearest), which can fall
    below the threshold; t is exactly representable, so the float32 comparison is the double one.
    """
    value = np.float32(thresh)
    if np.isfinite(value) and float(value) < thresh:
        value = np.nextafter(value, np.float32(np.inf))
    return float(value)


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """float32 "+1" areas of (..., 4) boxes, as `cpu_nms` computes them."""
    return (boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0)


def pairwise_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """(..., len(a), len(b)) float32 "+1" IoU in `cpu_nms`'s operation order, a = the kept (earlier) box.

    Batch dimensions broadcast, so (B, Na, 4) x (B, Nb, 4) gives (B, Na, Nb). In-place steps keep the
    number of full-size temporaries at three; the rounding steps are those of the plain expressions.
    """
    areas_a = box_areas(boxes_a)[..., :, None]
    areas_b = box_areas(boxes_b)[..., None, :]
    # inter_w = max(0, min(x2) - max(x1) + 1), likewise inter_h; inter = inter_w * inter_h
    inter_w = torch.minimum(boxes_a[..., :, None, 2], boxes_b[..., None, :, 2])
    inter_w.sub_(torch.maximum(boxes_a[..., :, None, 0], boxes_b[..., None, :, 0])).add_(1.0).clamp_(min=0.0)
    inter_h = torch.minimum(boxes_a[..., :, None, 3], boxes_b[..., None, :, 3])
    inter_h.sub_(torch.maximum(boxes_a[..., :, None, 1], boxes_b[..., None, :, 1])).add_(1.0).clamp_(min=0.0)
    inter = inter_w.mul_(inter_h)
    del inter_h
    union = torch.add(areas_a, areas_b).sub_(inter)  # (area_a + area_b) - inter
    return inter.div_(union)


def greedy_nms(
    boxes: torch.Tensor, scores: torch.Tensor, thresh: float, max_keep: int | None = None
) -> torch.Tensor:
    """Caffe `cpu_nms`: boxes visited in `caffe_descending(scores)` order; kept indices into `boxes`, in it.

    The host loop is the reference. On another device the one image goes through `nms_padded` (one sync for
    its count). Stops once `max_keep` boxes are kept (earlier decisions never depend on later boxes).
    """
    count = boxes.shape[0]
    if count == 0 or (max_keep is not None and max_keep <= 0):
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    limit = count if max_keep is None else min(max_keep, count)
    if boxes.device.type != "cpu":
        counts = torch.full((1,), count, dtype=torch.long, device=boxes.device)
        padded_keep, keep_counts = nms_padded(boxes[None], scores[None], counts, thresh, limit)
        return padded_keep[0, : int(keep_counts[0])]
    order = caffe_descending(scores.reshape(-1))
    # numpy for the loop: the same float32 operations as torch, at a fraction of the per-call overhead.
    sorted_boxes = boxes.to(torch.float32)[order].numpy()
    x1, y1, x2, y2 = (np.ascontiguousarray(sorted_boxes[:, k]) for k in range(4))
    areas = (x2 - x1 + np.float32(1.0)) * (y2 - y1 + np.float32(1.0))
    suppressed = np.zeros(count, dtype=bool)
    kept: list[int] = []
    one, zero = np.float32(1.0), np.float32(0.0)
    for i in range(count):
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) >= limit:
            break
        rest = slice(i + 1, count)
        inter_w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one, zero)
        inter_h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one, zero)
        inter = inter_w * inter_h
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap.astype(np.float64) >= thresh
    return order[torch.tensor(kept, dtype=torch.long)]


def _byte_weights(device: torch.device) -> torch.Tensor:
    """The 8 bit values of a byte, made on the device (a host tensor's copy would wait for the stream)."""
    return torch.bitwise_left_shift(
        torch.ones(8, dtype=torch.uint8, device=device), torch.arange(8, dtype=torch.uint8, device=device)
    )


def pack_bits(mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(..., N) bool -> (..., ceil(N / 64)) int64 bitsets (zero-padded).

    Bytes are summed from 8 weighted bits (no overflow) and reinterpreted as int64 words, so no signed
    arithmetic touches the top bit. Only AND / any() read the words, so the bit layout needs no meaning.
    `weights` may carry `_byte_weights(device)` to save its kernels in a loop.
    """
    count = mask.shape[-1]
    pad = -count % _WORD
    as_bytes = mask.to(torch.uint8)
    if pad:
        as_bytes = F.pad(as_bytes, (0, pad))
    weights = _byte_weights(mask.device) if weights is None else weights
    packed = (as_bytes.reshape(*mask.shape[:-1], (count + pad) // 8, 8) * weights).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int64)


def fixed_point_keep(suppressors: torch.Tensor, check_every: int = _CHECK_EVERY) -> torch.Tensor:
    """Greedy keep (rows, N) bool; suppressors (rows, N, W) int64: row i = bitset of the j that suppress i.

    Each row's "j suppresses i" relation must be acyclic (earlier suppresses later in some order); the
    iteration then reaches the unique fixed point, the greedy result, within N + 1 steps (module docstring).
    Rows are independent problems, so a row that did not change between two iterates is final and retires.
    """
    rows, count, _ = suppressors.shape
    device = suppressors.device
    result = torch.ones((rows, count), dtype=torch.bool, device=device)
    if rows == 0 or count == 0:
        return result
    weights = _byte_weights(device)
    active = torch.arange(rows, device=device)
    keep_bits = pack_bits(result, weights)  # all kept
    steps = 0
    while True:
        for _ in range(check_every):
            previous = keep_bits
            keep = ~(suppressors & previous[:, None, :]).any(dim=2)
            keep_bits = pack_bits(keep, weights)
        steps += check_every
        changed = (keep_bits != previous).any(dim=1)
        num_changed = int(changed.sum())  # the host sync of this check
        if num_changed == 0:
            result[active] = keep
            return result
        if steps > count:
            raise RuntimeError("NMS fixed point did not converge: the suppression relation is not acyclic")
        if 2 * num_changed <= active.numel():  # retire the rows at their fixed point
            done = ~changed
            result[active[done]] = keep[done]
            active, suppressors, keep_bits = active[changed], suppressors[changed], keep_bits[changed]


def _ordered_suppressors(
    boxes: torch.Tensor, counts: torch.Tensor, thresh32: float, max_elements: int
) -> torch.Tensor:
    """(B, N, W) bitsets for boxes (B, N, 4) in processing order: j suppresses i when j < i < count and
    IoU(j, i) >= thresh, IoU computed with j as the kept box."""
    num_images, count = boxes.shape[:2]
    device = boxes.device
    words = -(-count // _WORD)
    result = torch.empty((num_images, count, words), dtype=torch.int64, device=device)
    positions = torch.arange(count, device=device)
    valid = positions[None, :] < counts[:, None]  # (B, N)
    block = max(1, max_elements // BUILD_FRACTION // max(1, num_images * count))
    for start in range(0, count, block):
        stop = min(count, start + block)
        hit = (pairwise_iou(boxes, boxes[:, start:stop]) >= thresh32).transpose(1, 2)  # [b, i, j]
        hit &= positions[None, None, :] < positions[None, start:stop, None]  # j strictly before i
        hit &= valid[:, start:stop, None] & valid[:, None, :]
        result[:, start:stop] = pack_bits(hit)
    return result


def nms_padded_full(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    counts: torch.Tensor,
    thresh: float,
    max_keep: int,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nms_padded` plus how many boxes the NMS keeps when run to the end, (B,) long (free here)."""
    num_images, count = scores.shape
    device = scores.device
    counts = counts.to(device=device, dtype=torch.long)
    width = max(0, max_keep)
    if num_images == 0 or count == 0 or width == 0:
        zeros = torch.zeros(num_images, dtype=torch.long, device=device)
        return torch.zeros((num_images, width), dtype=torch.long, device=device), zeros, zeros.clone()
    valid = torch.arange(count, device=device)[None, :] < counts[:, None]
    order = caffe_descending_masked(scores, valid)  # valid rows first, in processing order
    ordered = boxes.to(torch.float32).gather(1, order[:, :, None].expand(-1, -1, 4))
    thresh32 = float32_threshold(thresh)
    kept = torch.empty((num_images, count), dtype=torch.bool, device=device)
    per_chunk = max(1, max_elements // (count * count))
    for start in range(0, num_images, per_chunk):
        rows = slice(start, start + per_chunk)
        kept[rows] = fixed_point_keep(
            _ordered_suppressors(ordered[rows], counts[rows], thresh32, max_elements)
        )
    kept &= valid  # after the sort, the valid rows are exactly positions < count
    total = kept.sum(dim=1)
    return left_align(kept, order, width), total.clamp(max=width), total


def left_align(mask: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width): values[b, i] at the first `width` True entries of mask[b], left-aligned; 0 after them.

    A scatter by the running count of True entries: no per-row nonzero, so no host sync.
    """
    num_rows = mask.shape[0]
    rank = mask.long().cumsum(dim=1) - 1
    slot = torch.where(mask & (rank < width), rank, torch.full_like(rank, width))  # `width` = discard slot
    out = torch.zeros((num_rows, width + 1), dtype=values.dtype, device=values.device)
    out.scatter_(1, slot, values)  # every discarded entry lands in the last column, dropped here
    return out[:, :width]


def nms_padded(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    counts: torch.Tensor,
    thresh: float,
    max_keep: int,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """boxes (B, N, 4) float32, scores (B, N), counts (B,) long = valid rows per image (rows >= count are
    padding and hold anything); returns keep (B, max_keep) long indices into each image's rows in processing
    order (padding entries 0) and keep_counts (B,) long; equal per image to
    greedy_nms(boxes[b, :count], scores[b, :count], ...)[:max_keep].

    Runs on the input's device (fixed-point method, module docstring): host syncs per chunk of images and
    convergence check, none per image.
    """
    keep, keep_counts, _ = nms_padded_full(boxes, scores, counts, thresh, max_keep, max_elements=max_elements)
    return keep, keep_counts
