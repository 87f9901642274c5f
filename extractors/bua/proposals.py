"""RPN head and the Caffe proposal layer (`rpn/proposal_layer.py`, TEST: 6000 / 300 / NMS 0.7 / min size 16).

All box arithmetic is float32 with the "+1" width convention, no clamp on dw/dh, and the reference `cpu_nms`
(IoU in float32, suppression when IoU >= the double threshold, see nms.py). Sorting is Caffe's
`argsort()[::-1]` (`caffe_descending`: ties -> higher index first), done twice as in the reference: once for
the pre-NMS cut, and once more inside `cpu_nms` on the truncated scores (which reverses each tie group again).

`proposal_layer` is the per-image reference; `proposal_layer_padded` computes the same for a zero-padded batch
on the device without any per-image host synchronisation (masks instead of filtering).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from extractors.bua.anchors import generate_cell_anchors, shifted_anchors
from extractors.bua.config import DetectorConfig
from extractors.bua.nms import (
    DEFAULT_MAX_ELEMENTS,
    box_areas,
    caffe_descending,
    caffe_descending_masked,
    greedy_nms,
    nms_padded_full,
    pairwise_iou,
)

__all__ = [
    "PaddedProposals",
    "ProposalGenerator",
    "Proposals",
    "RPNHead",
    "box_areas",
    "clip_boxes",
    "decode_boxes",
    "greedy_nms",
    "pairwise_iou",
    "proposal_layer",
    "proposal_layer_padded",
]


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


@dataclass
class PaddedProposals:
    """Output of the proposal layer for a padded batch: image b's proposals are its first counts[b] rows."""

    boxes: torch.Tensor  # (B, P, 4) float32 blob pixels in output order; rows >= counts[b] are zeros
    scores: torch.Tensor  # (B, P) float32; rows >= counts[b] are zeros
    counts: torch.Tensor  # (B,) long, on the device
    anchor_index: torch.Tensor | None = None  # (B, P) long, index in the image's own (y, x, a) enumeration
    stage_counts: torch.Tensor | None = (
        None  # (B, 4) long: anchors, after min-size, pre-NMS, after NMS (full)
    )

    def unpad(self) -> list[Proposals]:
        """Per-image `Proposals` (for traces and tests): one host copy of the counts for the whole batch."""
        counts = self.counts.tolist()
        stages = self.stage_counts.tolist() if self.stage_counts is not None else [[-1] * 4] * len(counts)
        result = []
        for index, count in enumerate(counts):
            anchor_index = (
                self.anchor_index[index, :count]
                if self.anchor_index is not None
                else torch.zeros(count, dtype=torch.long, device=self.boxes.device)
            )
            anchors, after_min_size, pre_nms, after_nms = (int(v) for v in stages[index])
            result.append(
                Proposals(
                    boxes=self.boxes[index, :count],
                    scores=self.scores[index, :count],
                    anchor_index=anchor_index,
                    counts=(anchors, after_min_size, pre_nms, after_nms, count),
                )
            )
        return result


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Caffe `bbox_transform_inv`: "+1" widths, centres at x1 + 0.5 w, no clamp on dw/dh; x2 without -1.

    anchors (N, 4), deltas (..., N, 4) -> (..., N, 4); element by element the same float32 operations for
    any batch shape, so a padded batch decodes bit for bit like one image.
    """
    widths = anchors[..., 2] - anchors[..., 0] + 1.0
    heights = anchors[..., 3] - anchors[..., 1] + 1.0
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    dx, dy, dw, dh = deltas.unbind(dim=-1)
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
        dim=-1,
    )


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip x into [0, width - 1] and y into [0, height - 1]."""
    x = boxes[:, 0::2].clamp(min=0.0, max=float(width - 1))
    y = boxes[:, 1::2].clamp(min=0.0, max=float(height - 1))
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def _min_size_threshold(min_size: float, im_scale: float) -> torch.Tensor:
    """The reference's float32 product min_size * im_info[2] (a 0-d CPU tensor)."""
    return torch.tensor(min_size, dtype=torch.float32) * torch.tensor(im_scale, dtype=torch.float32)


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
    """Caffe proposal layer for one image (the reference path).

    fg_prob: (A, H4, W4) sigmoid objectness; deltas: (4A, H4, W4); im_info: (H', W', im_scale) where
    im_scale is the float32-rounded value the reference stores in its im_info blob. With `full_nms` the NMS
    runs to the end so that `counts[3]` reports every survivor (else -1; the first `post_nms_top_n` kept
    boxes are the same either way). A cut of 0 or less means no cut, as in the reference.
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
    threshold = _min_size_threshold(min_size, im_scale).to(boxes.device)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    valid = torch.nonzero((widths >= threshold) & (heights >= threshold)).squeeze(1)
    boxes, scores = boxes[valid], scores[valid]
    order = caffe_descending(scores)  # scores.ravel().argsort()[::-1]
    if pre_nms_top_n > 0:
        order = order[:pre_nms_top_n]
    boxes, scores, anchor_index = boxes[order], scores[order], valid[order]
    # cpu_nms sorts the truncated scores again; keep indexes the truncated arrays, in processing order.
    post_cut = post_nms_top_n if post_nms_top_n > 0 else None
    keep_full = greedy_nms(boxes, scores, nms_thresh) if full_nms else None
    keep = keep_full[:post_cut] if keep_full is not None else greedy_nms(boxes, scores, nms_thresh, post_cut)
    counts = (
        int(anchors.shape[0]),
        int(valid.numel()),
        int(order.numel()),
        int(keep_full.numel()) if keep_full is not None else -1,
        int(keep.numel()),
    )
    return Proposals(boxes=boxes[keep], scores=scores[keep], anchor_index=anchor_index[keep], counts=counts)


def per_image_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device (pinned, non-blocking on CUDA)."""
    tensor = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def proposal_layer_padded(
    fg_prob: torch.Tensor,
    deltas: torch.Tensor,
    cell_anchors: torch.Tensor,
    im_infos: Sequence[tuple[float, float, float]],
    feature_sizes: Sequence[tuple[int, int]],
    *,
    feature_stride: int,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> PaddedProposals:
    """`proposal_layer` of every image of a zero-padded batch at once, on the input's device.

    fg_prob (B, A, Hmax, Wmax) and deltas (B, 4A, Hmax, Wmax); image b uses only its top-left
    feature_sizes[b] = (h, w) cells. The result equals `proposal_layer` on each image's cropped maps bit for
    bit (boxes, scores, order): cells outside the image and boxes below the minimum size are masked out of
    both sorts instead of being filtered, which keeps Caffe's order among the valid ones (the padded
    enumeration orders an image's cells as its own (y * w + x) * A + a does). P = post_nms_top_n.
    """
    num_images, num_anchors, max_h, max_w = fg_prob.shape
    if cell_anchors.shape[0] != num_anchors or tuple(deltas.shape) != (
        num_images,
        4 * num_anchors,
        max_h,
        max_w,
    ):
        raise ValueError(
            f"proposal layer: expected fg_prob (B, {cell_anchors.shape[0]}, H, W) and deltas "
            f"(B, {4 * cell_anchors.shape[0]}, H, W), got {tuple(fg_prob.shape)} and {tuple(deltas.shape)}"
        )
    if len(im_infos) != num_images or len(feature_sizes) != num_images:
        raise ValueError(
            f"proposal layer: {num_images} images but {len(im_infos)} im_infos and "
            f"{len(feature_sizes)} feature sizes"
        )
    for feat_h, feat_w in feature_sizes:
        if not (0 <= feat_h <= max_h and 0 <= feat_w <= max_w):
            raise ValueError(
                f"proposal layer: feature size {(feat_h, feat_w)} outside the {max_h}x{max_w} maps"
            )
    device = fg_prob.device
    anchors = shifted_anchors(cell_anchors.to(device), max_h, max_w, feature_stride)  # (M, 4)
    num_cells = anchors.shape[0]
    scores = fg_prob.to(torch.float32).permute(0, 2, 3, 1).reshape(num_images, num_cells)
    flat_deltas = (
        deltas.to(torch.float32)
        .reshape(num_images, num_anchors, 4, max_h, max_w)
        .permute(0, 3, 4, 1, 2)
        .reshape(num_images, num_cells, 4)
    )
    params = per_image_tensor(
        [
            value
            for (blob_h, blob_w, im_scale), (feat_h, feat_w) in zip(im_infos, feature_sizes, strict=True)
            for value in (
                float(int(blob_w) - 1),
                float(int(blob_h) - 1),
                float(_min_size_threshold(min_size, im_scale)),
                float(feat_h),
                float(feat_w),
            )
        ],
        torch.float32,
        device,
    ).reshape(num_images, 5)
    x_max, y_max, threshold = params[:, 0, None], params[:, 1, None], params[:, 2, None]
    feat_h_dev, feat_w_dev = params[:, 3].long(), params[:, 4].long()  # small ints, exact in float32
    boxes = decode_boxes(anchors, flat_deltas)  # (B, M, 4)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    x = boxes[..., 0::2].clamp(min=zero, max=x_max[:, :, None])
    y = boxes[..., 1::2].clamp(min=zero, max=y_max[:, :, None])
    boxes = torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
    widths = boxes[..., 2] - boxes[..., 0] + 1.0
    heights = boxes[..., 3] - boxes[..., 1] + 1.0
    flat = torch.arange(num_cells, device=device)
    cell_a = flat % num_anchors
    cell_x = torch.div(flat, num_anchors, rounding_mode="floor") % max_w
    cell_y = torch.div(flat, num_anchors * max_w, rounding_mode="floor")
    inside = (cell_y[None, :] < feat_h_dev[:, None]) & (cell_x[None, :] < feat_w_dev[:, None])
    valid = inside & (widths >= threshold) & (heights >= threshold)
    num_valid = valid.sum(dim=1)
    pre_cut = min(pre_nms_top_n, num_cells) if pre_nms_top_n > 0 else num_cells
    order = caffe_descending_masked(scores, valid)[:, :pre_cut]  # the reference's first sort and cut
    pre_counts = num_valid.clamp(max=pre_cut)
    top_boxes = boxes.gather(1, order[:, :, None].expand(-1, -1, 4))
    top_scores = scores.gather(1, order)
    width = post_nms_top_n if post_nms_top_n > 0 else pre_cut
    # nms_padded_full sorts the truncated scores again, exactly as cpu_nms does.
    keep, keep_counts, total = nms_padded_full(
        top_boxes, top_scores, pre_counts, nms_thresh, width, max_elements=max_elements
    )
    filled = torch.arange(width, device=device)[None, :] < keep_counts[:, None]
    out_boxes = torch.where(filled[:, :, None], top_boxes.gather(1, keep[:, :, None].expand(-1, -1, 4)), zero)
    out_scores = torch.where(filled, top_scores.gather(1, keep), zero)
    padded_index = order.gather(1, keep)
    own_index = (
        torch.div(padded_index, num_anchors * max_w, rounding_mode="floor") * feat_w_dev[:, None]
        + cell_x[padded_index]
    ) * num_anchors + cell_a[padded_index]
    anchor_index = torch.where(filled, own_index, torch.zeros_like(own_index))
    stage_counts = torch.stack((feat_h_dev * feat_w_dev * num_anchors, num_valid, pre_counts, total), dim=1)
    return PaddedProposals(
        boxes=out_boxes,
        scores=out_scores,
        counts=keep_counts,
        anchor_index=anchor_index,
        stage_counts=stage_counts,
    )
