"""Caffe anchors (`rpn/generate_anchors.py` semantics): ratio-major, "+1" boxes centred at (base-1)/2.

The HF port overwrites its detectron2-style anchors with a checkpoint tensor; we always generate the Caffe
ones from the configuration and only *compare* a checkpoint's stored tensor with them (see weights.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _whctrs(anchor: np.ndarray) -> tuple[float, float, float, float]:
    width = anchor[2] - anchor[0] + 1
    height = anchor[3] - anchor[1] + 1
    return width, height, anchor[0] + 0.5 * (width - 1), anchor[1] + 0.5 * (height - 1)


def _make_anchors(widths: np.ndarray, heights: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    widths = widths[:, None]
    heights = heights[:, None]
    return np.hstack(
        (
            x_ctr - 0.5 * (widths - 1),
            y_ctr - 0.5 * (heights - 1),
            x_ctr + 0.5 * (widths - 1),
            y_ctr + 0.5 * (heights - 1),
        )
    )


def generate_cell_anchors(
    base_size: int = 16,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (4.0, 8.0, 16.0, 32.0),
) -> np.ndarray:
    """(len(ratios)*len(scales), 4) float32 anchors of one feature cell, ratio-major, scale fastest."""
    base = np.array([0, 0, base_size - 1, base_size - 1], dtype=np.float64)
    width, height, x_ctr, y_ctr = _whctrs(base)
    size = width * height
    ratios_arr = np.asarray(ratios, dtype=np.float64)
    ratio_widths = np.round(np.sqrt(size / ratios_arr))  # np.round: half to even, as the reference
    ratio_heights = np.round(ratio_widths * ratios_arr)
    ratio_anchors = _make_anchors(ratio_widths, ratio_heights, x_ctr, y_ctr)
    scales_arr = np.asarray(scales, dtype=np.float64)
    rows = []
    for ratio_anchor in ratio_anchors:
        w, h, cx, cy = _whctrs(ratio_anchor)
        rows.append(_make_anchors(w * scales_arr, h * scales_arr, cx, cy))
    return np.vstack(rows).astype(np.float32)


def shifted_anchors(cell_anchors: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors of a (height, width) feature map, enumerated (y, x, a) with the anchor index fastest."""
    device = cell_anchors.device
    shift_x = torch.arange(width, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(height, device=device, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4) in (y, x) order
    return (shifts + cell_anchors.to(torch.float32).reshape(1, -1, 4)).reshape(-1, 4)


def anchors_match(stored: np.ndarray, generated: np.ndarray, atol: float = 1e-3) -> tuple[bool, float]:
    """Whether a checkpoint's stored cell anchors equal the generated Caffe ones, and the max abs diff."""
    stored = np.asarray(stored, dtype=np.float64)
    if stored.shape != generated.shape:
        return False, float("inf")
    diff = float(np.max(np.abs(stored - generated.astype(np.float64)))) if stored.size else 0.0
    return diff <= atol, diff
