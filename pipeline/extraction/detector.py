"""What the extraction engine needs from a detector, and the one place its output gets the store's dtypes.

The engine knows no detector implementation (pipeline/ never imports extractors/): anything with these few
methods can fill a feature store, e.g. `extractors.bua.detector.BottomUpAttentionDetector`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.store import ARRAY_DTYPES, FeatureDtype, RegionRecord

if TYPE_CHECKING:
    import torch


class DetectedRegions(Protocol):
    """One image's regions as a detector returns them (any numeric dtypes; converted by `to_record`)."""

    @property
    def boxes(self) -> np.ndarray: ...  # (n, 4) x1 y1 x2 y2 in original-image pixels

    @property
    def features(self) -> np.ndarray: ...  # (n, D)

    @property
    def object_ids(self) -> np.ndarray | None: ...  # (n,) 0-based vocabulary line numbers

    @property
    def object_conf(self) -> np.ndarray | None: ...

    @property
    def attribute_ids(self) -> np.ndarray | None: ...

    @property
    def attribute_conf(self) -> np.ndarray | None: ...


class RegionDetector(Protocol):
    """Decoded HxWx3 uint8 BGR images in, one `DetectedRegions` per image out; no file I/O."""

    def to(self, device: torch.device) -> Any:
        """Move the detector's weights to the device of this rank (an `nn.Module` has it already)."""
        ...

    def detect(self, images_bgr: Sequence[np.ndarray], *, precision: str) -> Sequence[DetectedRegions]:
        """Regions of each image; `precision` is one of exact, tf32, bf16, fp16."""
        ...

    def image_size_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size cannot be processed (then it is recorded as failed), else None."""
        ...


class PreparingDetector(RegionDetector, Protocol):
    """A detector whose host preprocessing can run in the loader workers (off the critical path)."""

    def preparer(self) -> Callable[[np.ndarray], object]:
        """A picklable function: decoded BGR image -> what `detect_prepared` takes for it."""
        ...

    def detect_prepared(self, prepared: Sequence[Any], *, precision: str) -> Sequence[DetectedRegions]:
        """`detect` of images already passed through `preparer()`."""
        ...


def preparer_of(detector: RegionDetector) -> Callable[[np.ndarray], object] | None:
    """The detector's worker-side preprocessing, when it has one (plain `RegionDetector`s do not)."""
    if callable(getattr(detector, "preparer", None)) and callable(getattr(detector, "detect_prepared", None)):
        return detector.preparer()  # type: ignore[attr-defined]
    return None


class NonFiniteRegionsError(ValueError):
    """A detector returned NaN or inf (or features beyond the store's float16 range) for an image.

    Raised by `to_record`; the extraction run records the image as failed instead of storing the values.
    """


def _converted(value: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=dtype)


def _nonfinite(name: str, stored: np.ndarray | None, given: object) -> str | None:
    """What is not finite in the stored array `name` (NaN, inf, or finite values the dtype cannot hold)."""
    if stored is None or not np.issubdtype(stored.dtype, np.floating):
        return None
    bad = ~np.isfinite(stored)
    if not bad.any():
        return None
    nan = int(np.isnan(stored).sum())
    problem = f"{name}: {nan} NaN, {int(bad.sum()) - nan} inf"
    source = np.asarray(given)
    if np.issubdtype(source.dtype, np.floating) and np.isfinite(source).all():
        problem += f" (finite values up to {float(np.max(np.abs(source))):.6g} overflow {stored.dtype})"
    return problem


def to_record(
    image_id: str, image: np.ndarray, regions: DetectedRegions, feature_dtype: FeatureDtype
) -> RegionRecord:
    """A detector result as a store row, every array converted once to its stored dtype.

    The detector's own dtypes (float32 features, int64 ids) are its business; the store's are float32 boxes
    and confidences, int32 ids and `feature_dtype` features. The writer checks them and converts nothing.

    Raises NonFiniteRegionsError when the detector flags the image (`regions.problem`, e.g. NaN class
    probabilities that make its box selection garbage) or a converted float array (features, boxes,
    confidences) holds NaN or inf, including finite features beyond float16's range: such an image is a
    failed image, never a row.
    """
    flagged = getattr(regions, "problem", None)
    if flagged:
        raise NonFiniteRegionsError(f"{image_id}: detector output is not finite ({flagged})")
    with np.errstate(over="ignore"):  # a float16 overflow becomes inf, refused below
        record = RegionRecord(
            image_id=image_id,
            image_w=int(image.shape[1]),
            image_h=int(image.shape[0]),
            boxes=np.asarray(regions.boxes, dtype=ARRAY_DTYPES["boxes"]).reshape(-1, 4),
            features=np.asarray(regions.features, dtype=feature_dtype),
            object_ids=_converted(regions.object_ids, ARRAY_DTYPES["object_ids"]),
            object_conf=_converted(regions.object_conf, ARRAY_DTYPES["object_conf"]),
            attribute_ids=_converted(regions.attribute_ids, ARRAY_DTYPES["attribute_ids"]),
            attribute_conf=_converted(regions.attribute_conf, ARRAY_DTYPES["attribute_conf"]),
        )
    problems = [
        problem
        for name in ("features", "boxes", "object_conf", "attribute_conf")
        if (problem := _nonfinite(name, getattr(record, name), getattr(regions, name))) is not None
    ]
    if problems:
        raise NonFiniteRegionsError(f"{image_id}: detector output is not finite ({'; '.join(problems)})")
    return record
