"""Caffe preprocessing (`fast_rcnn/test.py::_get_image_blob`): BGR, mean subtraction, then cv2 resize.

The order matters for conformance: the means are subtracted from the float32 image *before* the bilinear
resize, there is no division by a std, and the output size is cv2's rounded product, not a floor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from extractors.bua.config import CAFFE_PIXEL_MEANS_BGR

# The stem's 7x7/2 conv and 3x3/2 ceil-mode pool need a few pixels; smaller blobs cannot be processed.
MIN_BLOB_SIDE = 8


def check_image(image_bgr: np.ndarray, name: str = "image") -> None:
    """Raise a clear ValueError unless `image_bgr` is a decoded HxWx3 uint8 BGR array."""
    if not isinstance(image_bgr, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image_bgr).__name__}")
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"{name}: expected an HxWx3 BGR array, got shape {tuple(image_bgr.shape)}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {image_bgr.dtype}")
    if image_bgr.shape[0] < 1 or image_bgr.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {tuple(image_bgr.shape)}")


def compute_scale(height: int, width: int, test_scale: int = 600, max_size: int = 1000) -> float:
    """Caffe's scale rule: short side to `test_scale`, unless the *rounded* long side exceeds `max_size`."""
    im_size_min = min(height, width)
    im_size_max = max(height, width)
    im_scale = float(test_scale) / float(im_size_min)
    if np.round(im_scale * im_size_max) > max_size:  # np.round: half to even, compared after rounding
        im_scale = float(max_size) / float(im_size_max)
    return im_scale


def scaled_size(height: int, width: int, im_scale: float) -> tuple[int, int]:
    """Blob size cv2.resize produces for `fx = fy = im_scale` (cvRound of the double product)."""
    return int(np.rint(height * im_scale)), int(np.rint(width * im_scale))


def size_problem(height: int, width: int, test_scale: int = 600, max_size: int = 1000) -> str | None:
    """Why an image of this size cannot be processed (its scaled blob is below MIN_BLOB_SIDE), else None."""
    out_h, out_w = scaled_size(height, width, compute_scale(height, width, test_scale, max_size))
    if min(out_h, out_w) >= MIN_BLOB_SIDE:
        return None
    return (
        f"{width}x{height} px scales to {out_w}x{out_h} px, below the detector's minimum of {MIN_BLOB_SIDE} "
        "px per side (extreme aspect ratio)"
    )


def mean_subtraction_table(pixel_means_bgr: Sequence[float] = CAFFE_PIXEL_MEANS_BGR) -> np.ndarray:
    """(1, 256, 3) float32 cv2 lookup table: entry [0, v, c] = float32(v - mean_c) computed in double.

    The reference subtracts the float64 means from the float32 image in double and rounds to float32; for
    uint8 pixels that is a function of (value, channel), so a table lookup gives the same bits without a
    float64 image-sized intermediate.
    """
    values = np.arange(256, dtype=np.float32)[:, None].astype(np.float64)
    table = (values - np.asarray(pixel_means_bgr, dtype=np.float64)[None, :]).astype(np.float32)
    return np.ascontiguousarray(table.reshape(1, 256, 3))


def image_blob(
    image_bgr: np.ndarray,
    test_scale: int = 600,
    max_size: int = 1000,
    pixel_means_bgr: Sequence[float] = CAFFE_PIXEL_MEANS_BGR,
    table: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Return the float32 (3, H', W') BGR blob and the float64 im_scale of one decoded uint8 BGR image.

    `table` is `mean_subtraction_table(pixel_means_bgr)` when the caller keeps one (it is rebuilt otherwise).
    """
    check_image(image_bgr)
    height, width = image_bgr.shape[:2]
    im_scale = compute_scale(height, width, test_scale, max_size)
    out_h, out_w = scaled_size(height, width, im_scale)
    if min(out_h, out_w) < MIN_BLOB_SIDE:
        raise ValueError(
            f"image of {width}x{height} px scales to {out_w}x{out_h} px, smaller than the {MIN_BLOB_SIDE} px "
            "the detector needs on each side (extreme aspect ratio?)"
        )
    lookup = table if table is not None else mean_subtraction_table(pixel_means_bgr)
    # float32 minus float64 means, rounded to float32 (the reference's in-place `-=`), as a table lookup.
    centred = cv2.LUT(np.ascontiguousarray(image_bgr), lookup)
    resized = cv2.resize(centred, None, None, fx=im_scale, fy=im_scale, interpolation=cv2.INTER_LINEAR)
    if resized.shape[:2] != (out_h, out_w):  # cv2 computes the same rounded size; guard against surprises
        raise RuntimeError(f"cv2.resize returned {resized.shape[:2]}, expected {(out_h, out_w)}")
    blob = np.ascontiguousarray(resized.transpose(2, 0, 1))
    return blob, im_scale


@dataclass(frozen=True)
class PreparedImage:
    """One image made device-ready on the host (in a loader worker): its blob, scale and original size."""

    blob: np.ndarray  # (3, H', W') float32
    im_scale: float
    image_h: int
    image_w: int


@dataclass(frozen=True)
class BlobMaker:
    """The detector's preprocessing as a small picklable callable, so loader workers can run it."""

    test_scale: int
    max_size: int
    pixel_means_bgr: tuple[float, float, float]

    def __call__(self, image_bgr: np.ndarray) -> PreparedImage:
        table = _cached_table(self.pixel_means_bgr)
        blob, im_scale = image_blob(image_bgr, self.test_scale, self.max_size, self.pixel_means_bgr, table)
        return PreparedImage(blob, im_scale, int(image_bgr.shape[0]), int(image_bgr.shape[1]))


@functools.cache
def _cached_table(pixel_means_bgr: tuple[float, float, float]) -> np.ndarray:
    """`mean_subtraction_table`, built once per process (each loader worker builds its own)."""
    return mean_subtraction_table(pixel_means_bgr)


def pad_blobs(
    prepared: Sequence[PreparedImage], *, pin_memory: bool = False
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-padded (B, 3, Hmax, Wmax) float32 batch (page-locked when asked) and each blob's (H', W')."""
    sizes = [(int(p.blob.shape[1]), int(p.blob.shape[2])) for p in prepared]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    batch = torch.empty((len(prepared), 3, max_h, max_w), dtype=torch.float32, pin_memory=pin_memory)
    for index, item in enumerate(prepared):
        h, w = sizes[index]
        batch[index, :, :h, :w] = torch.from_numpy(item.blob)
        batch[index, :, h:, :] = 0  # only the padding is zeroed: each value is written once
        batch[index, :, :h, w:] = 0
    return batch, sizes


def feature_size(blob_side: int) -> int:
    """res4 size along one axis for a blob side (stem conv /2, ceil-mode pool /2, res3 /2, res4 /2)."""
    s1 = (blob_side - 1) // 2 + 1
    s2 = -(-(s1 - 3) // 2) + 1
    s3 = -(-s2 // 2)
    return -(-s3 // 2)
