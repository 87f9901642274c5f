"""The extraction engine against device faults and untrustworthy detector output, and with host preprocessing
moved into the loader workers: a sticky device error stops the run with finished work kept (and resumable),
an out-of-memory or an image's own error does not, a flagged (non-finite) result is an error record, and a
detector's `preparer` runs in the workers."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.device_faults import DeviceFaultError, device_fault
from pipeline.extraction import ERRORS_FILE, extract_images
from pipeline.params import ExtractParams
from pipeline.store import FeatureStore

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _write_images(root: Path, count: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        name = f"img{index:02d}.png"
        (root / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


@dataclass
class Regions:
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray | None = None
    object_conf: np.ndarray | None = None
    attribute_ids: np.ndarray | None = None
    attribute_conf: np.ndarray | None = None
    problem: str | None = None


def _regions(image: np.ndarray, problem: str | None = None) -> Regions:
    mean = image.reshape(-1, 3).mean(axis=0).astype(np.float32)
    return Regions(boxes=np.array([[0, 0, 4, 4]], dtype=np.float32), features=mean[None], problem=problem)


class FaultyDetector:
    """Fails with `error` from the `fail_at`-th batch on (a sticky fault stays), else one region per image."""

    def __init__(self, error: Exception | None = None, fail_at: int = 10**9, flag: set[int] | None = None):
        self.error, self.fail_at, self.flag = error, fail_at, flag or set()
        self.calls = 0
        self.images_seen = 0

    def to(self, device: torch.device) -> FaultyDetector:
        return self

    def detect(self, images_bgr: Sequence[np.ndarray], *, precision: str) -> list[Regions]:
        self.calls += 1
        if self.error is not None and self.calls >= self.fail_at:
            raise self.error
        out = []
        for image in images_bgr:
            problem = "class probabilities (3 rows)" if self.images_seen in self.flag else None
            out.append(_regions(image, problem))
            self.images_seen += 1
        return out

    def image_size_problem(self, height: int, width: int) -> str | None:
        return None


def _settings(**overrides: object) -> ExtractParams:
    values = {"batch_size": 2, "num_workers": 0, "feature_dtype": "float32", "rows_per_part": 1}
    values.update(overrides)
    return ExtractParams(**values)


def test_sticky_device_fault_stops_the_run_and_keeps_finished_work(tmp_path: Path) -> None:
    names = _write_images(tmp_path / "images", 6)
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    detector = FaultyDetector(sticky, fail_at=2)
    with pytest.raises(DeviceFaultError, match="illegal memory access") as caught:
        extract_images(detector, tmp_path / "images", tmp_path / "out", _settings())
    message = str(caught.value)
    assert "\n" not in message and "stored" in message and "resumes" in message
    assert detector.calls == 2  # no image-by-image retry of the faulty batch: it would fail every image
    stored = FeatureStore(tmp_path / "out").image_ids
    assert sorted(stored) == names[:2]  # the first batch was finished and is kept
    # A rerun on a healthy device does only the rest.
    healthy = FaultyDetector()
    summary = extract_images(healthy, tmp_path / "images", tmp_path / "out", _settings())
    assert (summary.done, summary.skipped, summary.failed) == (4, 2, 0)
    assert sorted(FeatureStore(tmp_path / "out").image_ids) == names


def test_an_ordinary_error_is_still_one_image_and_flagged_results_are_error_records(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 4)
    detector = FaultyDetector(flag={1})
    summary = extract_images(detector, tmp_path / "images", tmp_path / "out", _settings())
    assert (summary.done, summary.failed) == (3, 1)
    (error,) = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert error["image_id"] == "img01.png" and "not finite" in error["reason"]
    assert "class probabilities" in error["reason"]
    assert "img01.png" not in FeatureStore(tmp_path / "out").image_ids


def test_device_fault_classification() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)

    def healthy(_: torch.device) -> None:
        return None

    def broken(_: torch.device) -> None:
        raise RuntimeError("CUDA error: unspecified launch failure")

    assert device_fault(RuntimeError("shape mismatch in conv"), cpu) is None
    assert device_fault(RuntimeError("device-side assert triggered"), cpu) is not None
    assert device_fault(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), cpu)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert device_fault(oom, cuda, probe=broken) is None  # out of memory passes; it is not sticky
    assert device_fault(ValueError("bad image"), cuda, probe=healthy) is None
    reason = device_fault(ValueError("bad image"), cuda, probe=broken)
    assert reason is not None and "test kernel failed" in reason and "\n" not in reason


class PreparingDetector(FaultyDetector):
    """A detector with worker-side preprocessing: records the process that prepared each image."""

    def preparer(self) -> _Prepare:
        return _Prepare()

    def detect_prepared(self, prepared: Sequence[dict], *, precision: str) -> list[Regions]:
        self.prepared_by = [item["pid"] for item in prepared]
        return [_regions(item["image"]) for item in prepared]


class _Prepare:
    """Picklable (module level); refuses images whose first pixel is pure black, as a size check would."""

    def __call__(self, image: np.ndarray) -> dict:
        if not image[0, 0].any():
            raise ValueError("first pixel is black: unsupported")
        return {"image": image, "pid": os.getpid()}


@pytest.mark.slow
def test_preparer_runs_in_the_loader_workers(tmp_path: Path) -> None:
    _write_images(tmp_path / "images", 3)
    black = np.zeros((48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(black).save(buffer, "PNG")
    (tmp_path / "images" / "black.png").write_bytes(buffer.getvalue())
    detector = PreparingDetector()
    summary = extract_images(detector, tmp_path / "images", tmp_path / "out", _settings(num_workers=1))
    assert (summary.done, summary.failed) == (3, 1)
    assert detector.prepared_by and all(pid != os.getpid() for pid in detector.prepared_by)
    (error,) = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert error["image_id"] == "black.png" and error["error_type"] == "unsupported"
