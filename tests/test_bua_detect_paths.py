"""The detector's batched, device-resident `detect` against its image-by-image reference `trace`, on the CPU
with the tiny architecture: host and device NMS backends agree bit for bit, blobs made ahead (as loader
workers make them) give the same regions, the fast modes keep exact's proposals, and non-finite values flag
the image instead of producing rows."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from extractors.bua.config import CAFFE_PIXEL_MEANS_BGR, DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector, RegionDetections
from extractors.bua.preprocess import compute_scale, image_blob, mean_subtraction_table, pad_blobs

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _images() -> list[np.ndarray]:
    """Smooth random textures of different sizes and aspect ratios (a padded batch)."""
    rng = np.random.default_rng(3)
    images = []
    for height, width in ((150, 200), (230, 170), (120, 300), (200, 200)):
        small = rng.integers(0, 256, size=(height // 10 + 2, width // 10 + 2, 3), dtype=np.uint8)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.integers(-20, 21, size=image.shape)
        images.append(np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def detector() -> BottomUpAttentionDetector:
    torch.manual_seed(0)
    return BottomUpAttentionDetector(DetectorConfig.tiny().with_box_mode("adaptive"))


def _same(a: RegionDetections, b: RegionDetections) -> None:
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.object_ids, b.object_ids)
    np.testing.assert_array_equal(a.attribute_ids, b.attribute_ids)
    np.testing.assert_array_equal(a.object_conf, b.object_conf)
    assert (a.branch, a.problem, a.image_h, a.image_w) == (b.branch, b.problem, b.image_h, b.image_w)


def test_blob_table_is_bit_identical_to_the_double_subtraction() -> None:
    """The reference subtracts float64 means from the float32 image and rounds; the lookup table must give the
    same bits for every uint8 value, through the resize too."""
    rng = np.random.default_rng(0)
    table = mean_subtraction_table()
    for height, width in ((480, 640), (333, 500), (17, 900), (1000, 1000)):
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        scale = compute_scale(height, width)
        centred = (image.astype(np.float32) - np.asarray(CAFFE_PIXEL_MEANS_BGR, dtype=np.float64)).astype(
            np.float32
        )
        expected = cv2.resize(centred, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        blob, im_scale = image_blob(image, table=table)
        assert im_scale == scale
        np.testing.assert_array_equal(blob.view(np.uint32), expected.transpose(2, 0, 1).view(np.uint32))


def test_prepared_blobs_pickle_and_give_the_same_regions(detector: BottomUpAttentionDetector) -> None:
    images = _images()
    maker = pickle.loads(pickle.dumps(detector.preparer()))  # as a forkserver worker receives it
    prepared = [pickle.loads(pickle.dumps(maker(image))) for image in images]
    batch, sizes = pad_blobs(prepared)
    reference, _, reference_sizes = detector.preprocess(images)
    assert sizes == reference_sizes and torch.equal(batch, reference)
    for a, b in zip(detector.detect_prepared(prepared), detector.detect(images), strict=True):
        _same(a, b)


def test_device_nms_backend_equals_host_backend(detector: BottomUpAttentionDetector) -> None:
    """The batched fixed-point NMS kernels (what an accelerator runs) against the CPU reference loops, bit for
    bit, in every branch of generate_tsv's rule (adaptive 10-100 boxes, and fixed 36: fewer or more)."""
    images = _images()
    branches = set()
    configs = (
        detector.config,
        detector.config.with_box_mode("fixed"),
        DetectorConfig.tiny(min_boxes=8, max_boxes=12),
    )
    for config in configs:
        model = BottomUpAttentionDetector(config)
        model.load_state_dict(detector.state_dict())
        host = model.detect(images, nms="host")
        device = model.detect(images, nms="device")
        for a, b in zip(host, device, strict=True):
            _same(a, b)
        branches |= {regions.branch for regions in host}
    assert len(branches) >= 2, branches


def test_batched_detect_equals_the_per_image_trace(detector: BottomUpAttentionDetector) -> None:
    images = _images()
    detected = detector.detect(images)
    traced = [trace.detections for trace in detector.trace(images)]
    for a, b in zip(detected, traced, strict=True):
        np.testing.assert_array_equal(a.object_ids, b.object_ids)
        np.testing.assert_array_equal(a.attribute_ids, b.attribute_ids)
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-4)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
        assert a.branch == b.branch and a.problem is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fast_modes_keep_the_proposals(detector: BottomUpAttentionDetector, precision: str) -> None:
    images = _images()[:2]
    exact = detector.trace(images)
    fast = detector.trace(images, precision=precision)  # type: ignore[arg-type]
    for a, b in zip(exact, fast, strict=True):
        assert torch.equal(a.proposals.boxes, b.proposals.boxes)  # backbone and RPN stay float32
        assert torch.equal(a.res4, b.res4)
        deviation = (a.heads.pool5 - b.heads.pool5).abs().max() / a.heads.pool5.abs().max()
        assert 0 < deviation < 0.05  # res5 did run in the low dtype, and stayed close


def test_non_finite_values_flag_the_image(detector: BottomUpAttentionDetector) -> None:
    broken = BottomUpAttentionDetector(detector.config)
    broken.load_state_dict(detector.state_dict())
    with torch.no_grad():
        broken.roi_heads.box_predictor.cls_score.bias[3] = float("nan")
    for nms in ("host", "device"):
        results = broken.detect(_images()[:2], nms=nms)  # type: ignore[arg-type]
        for regions in results:
            assert regions.problem is not None and "class probabilities" in regions.problem
    assert all(r.problem is None for r in detector.detect(_images()[:2]))


def test_unknown_options_are_refused(detector: BottomUpAttentionDetector) -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        detector.detect(_images()[:1], precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown nms backend"):
        detector.detect(_images()[:1], nms="gpu")  # type: ignore[arg-type]
