"""RPN head and the Caffe proposal layer (`rpn/proposal_layer.py`, TEST: 6000 / 300 / NMS 0.7 / min size 16).

All box arithmetic is float32 with the "+1" width convention, no clamp on dw/dh, and the reference `cpu_nms`
(IoU in float32, suppression when IoU >= the double threshold). Sorting is stable and descending.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from extractors.bua.anchors import generate_cell_anchors, shifted_anchors
from extractors.bua.config import DetectorConfig


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs: A objectness logits (sigmoid) and 4A deltas (dx, dy, dw, dh)."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
            layer.requires_grad_(False)

    def forward(self, res4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(res4))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class ProposalGenerator(nn.Module):
    """RPN head plus the Caffe anchors generated from the configuration (not stored in the state dict)."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.rpn_head = RPNHead(config.stage_out_channels[2], config.rpn_channels, config.num_anchors)
        anchors = generate_cell_anchors(config.anchor_base_size, config.anchor_ratios, config.anchor_scales)
        self.register_buffer("cell_anchors", torch.from_numpy(anchors), persistent=False)


@dataclass
class Proposals:
    """Output of the proposal layer for one image, in scaled-image (blob) pixels, descending score order."""

    boxes: torch.Tensor  # (R, 4) float32
    scores: torch.Tensor  # (R,) float32 fg probabilities
    anchor_index: torch.Tensor  # (R,) int64 index in the (y, x, a) enumeration
    counts: tuple[int, int, int, int, int]  # anchors, after min-size, pre-NMS, after NMS (full), R


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Caffe `bbox_transform_inv`: "+1" widths, centres at x1 + 0.5 w, no clamp on dw/dh; x2 without -1."""
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    dx, dy, dw, dh = deltas.unbind(dim=1)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        (
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w,
            pred_ctr_y + 0.5 * pred_h,
        ),
        dim=1,
    )


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip x into [0, width - 1] and y into [0, height - 1]."""
    x = boxes[:, 0::2].clamp(min=0.0, max=float(width - 1))
    y = boxes[:, 1::2].clamp(min=0.0, max=float(height - 1))
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """float32 "+1" areas, as `cpu_nms` computes them."""
    return (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)


def pairwise_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) float32 "+1" IoU with the operation order of `cpu_nms`."""
    areas_a = box_areas(boxes_a)[:, None]
    areas_b = box_areas(boxes_b)[None, :]
    xx1 = torch.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    yy1 = torch.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    xx2 = torch.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    yy2 = torch.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter_w = (xx2 - xx1 + 1.0).clamp(min=0.0)
    inter_h = (yy2 - yy1 + 1.0).clamp(min=0.0)
    inter = inter_w * inter_h
    return inter / (areas_a + areas_b - inter)


def greedy_nms(boxes: torch.Tensor, thresh: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS of boxes *already sorted* by descending score; returns kept indices in keep order.

    A later box is suppressed when its float32 IoU with a kept box is >= `thresh` compared in double,
    exactly as Caffe's `cpu_nms`. Stops once `max_keep` boxes are kept (the first kept ones do not depend
    on the rest).
    """
    count = boxes.shape[0]
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.to(torch.float32)
    limit = count if max_keep is None else min(max_keep, count)
    if boxes.device.type != "cpu":
        return _greedy_nms_matrix(boxes, thresh, limit)
    areas = box_areas(boxes)
    suppressed = torch.zeros(count, dtype=torch.bool)
    keep: list[int] = []
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    i = 0
    while i < count and len(keep) < limit:
        if suppressed[i]:
            i += 1
            continue
        keep.append(i)
        rest = slice(i + 1, count)
        inter_w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1.0).clamp(min=0.0)
        inter_h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1.0).clamp(min=0.0)
        inter = inter_w * inter_h
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap.double() >= thresh
        i += 1
    return torch.tensor(keep, dtype=torch.long)


def _greedy_nms_matrix(boxes: torch.Tensor, thresh: float, limit: int, block: int = 2048) -> torch.Tensor:
    """Accelerator variant: suppression matrix built on the device, greedy sweep on the host."""
    count = boxes.shape[0]
    rows = []
    for start in range(0, count, block):
        overlap = pairwise_iou(boxes[start : start + block], boxes)
        rows.append((overlap.double() >= thresh).cpu())
    suppress = torch.cat(rows).numpy()
    removed = suppress[0].copy()
    removed[:] = False
    keep: list[int] = []
    for i in range(count):
        if removed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        removed |= suppress[i]
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def proposal_layer(
    fg_prob: torch.Tensor,
    deltas: torch.Tensor,
    cell_anchors: torch.Tensor,
    im_info: tuple[float, float, float],
    *,
    feature_stride: int = 16,
    pre_nms_top_n: int = 6000,
    post_nms_top_n: int = 300,
    nms_thresh: float = 0.7,
    min_size: float = 16.0,
    full_nms: bool = False,
) -> Proposals:
    """Caffe proposal layer for one image.

    fg_prob: (A, H4, W4) sigmoid objectness; deltas: (4A, H4, W4); im_info: (H', W', im_scale) where
    im_scale is the float32-rounded value the reference stores in its im_info blob. With `full_nms` the NMS
    runs to the end so that `counts[3]` reports every survivor (else -1; the first `post_nms_top_n` kept
    boxes are the same either way).
    """
    num_anchors = cell_anchors.shape[0]
    feat_h, feat_w = fg_prob.shape[-2:]
    if fg_prob.shape[0] != num_anchors or deltas.shape[0] != 4 * num_anchors:
        raise ValueError(
            f"proposal layer: expected {num_anchors} objectness and {4 * num_anchors} delta channels, got "
            f"{fg_prob.shape[0]} and {deltas.shape[0]}"
        )
    fg_prob = fg_prob.to(torch.float32)
    deltas = deltas.to(torch.float32)
    anchors = shifted_anchors(cell_anchors.to(fg_prob.device), feat_h, feat_w, feature_stride)
    # (A, H, W) -> (H, W, A) -> flat: index = (y * W + x) * A + a.
    scores = fg_prob.permute(1, 2, 0).reshape(-1)
    flat_deltas = deltas.reshape(num_anchors, 4, feat_h, feat_w).permute(2, 3, 0, 1).reshape(-1, 4)
    blob_h, blob_w, im_scale = im_info
    boxes = clip_boxes(decode_boxes(anchors, flat_deltas), int(blob_h), int(blob_w))
    # Minimum size: a float32 threshold 16 * im_scale, "+1" widths.
    threshold = torch.tensor(min_size, dtype=torch.float32) * torch.tensor(im_scale, dtype=torch.float32)
    threshold = threshold.to(boxes.device)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    valid = torch.nonzero((widths >= threshold) & (heights >= threshold)).squeeze(1)
    boxes, scores = boxes[valid], scores[valid]
    order = torch.sort(scores, descending=True, stable=True).indices
    if pre_nms_top_n > 0:
        order = order[:pre_nms_top_n]
    boxes, scores, anchor_index = boxes[order], scores[order], valid[order]
    keep_full = greedy_nms(boxes, nms_thresh) if full_nms else None
    keep = greedy_nms(boxes, nms_thresh, post_nms_top_n) if keep_full is None else keep_full[:post_nms_top_n]
    counts = (
        int(anchors.shape[0]),
        int(valid.numel()),
        int(order.numel()),
        int(keep_full.numel()) if keep_full is not None else -1,
        int(keep.numel()),
    )
    return Proposals(boxes=boxes[keep], scores=scores[keep], anchor_index=anchor_index[keep], counts=counts)
