"""End-to-end conformance on the three fixture JPEGs with the full-size detector and the recipe weights.

One module-scoped run computes every stage (landscape alone: the one-image path; portrait + wide together: the
zero-padded batch path); each test checks one stage of it, so the ~20 s/image RoI head runs once per image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from bua_recipe import recipe_weights

from extractors.bua.config import DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector, ImageTrace
from extractors.bua.weights import load_into

IMAGES = ("landscape_500x375", "portrait_333x502", "wide_900x240")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def detector(bua_fixtures: Path) -> BottomUpAttentionDetector:
    model = BottomUpAttentionDetector(DetectorConfig())
    load_into(model, recipe_weights(str(bua_fixtures / "weights_manifest.json")))
    return model


@pytest.fixture(scope="module")
def traces(bua_fixtures: Path, detector: BottomUpAttentionDetector) -> dict[str, ImageTrace]:
    images = {name: cv2.imread(str(bua_fixtures / f"{name}.jpg")) for name in IMAGES}
    single = detector.trace([images[IMAGES[0]]])
    batched = detector.trace([images[IMAGES[1]], images[IMAGES[2]]])  # padded to 905 x 1000
    return dict(zip(IMAGES, single + batched, strict=True))


@pytest.fixture(scope="module")
def fixtures(bua_fixtures: Path) -> dict[str, dict[str, np.ndarray]]:
    return {name: dict(np.load(bua_fixtures / f"expected_{name}.npz")) for name in IMAGES}


def _stats(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    return np.array([values.mean(), values.std(), values.min(), values.max(), np.abs(values).mean()])


@pytest.mark.parametrize("name", IMAGES)
def test_res4(traces: dict[str, ImageTrace], fixtures: dict, name: str) -> None:
    exp, res4 = fixtures[name], traces[name].res4.numpy()
    assert [1, *res4.shape] == exp["res4_shape"].tolist()
    np.testing.assert_allclose(res4[:16, :4, :4], exp["res4_slice"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(res4[-16:, -4:, -4:], exp["res4_slice_bottomright"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(res4.astype(np.float64).mean(axis=(1, 2)), exp["res4_channel_mean"], atol=1e-5)
    np.testing.assert_allclose(res4.astype(np.float64).mean(axis=0), exp["res4_spatial_mean"], atol=1e-5)
    np.testing.assert_allclose(_stats(res4), exp["res4_stats"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", IMAGES)
def test_rpn_head(traces: dict[str, ImageTrace], fixtures: dict, name: str) -> None:
    exp, trace = fixtures[name], traces[name]
    np.testing.assert_allclose(trace.rpn_logits.numpy(), exp["rpn_logits"][0], atol=1e-4)
    np.testing.assert_allclose(trace.rpn_deltas.numpy(), exp["rpn_deltas"][0], atol=1e-4)
    np.testing.assert_allclose(torch.sigmoid(trace.rpn_logits).numpy(), exp["rpn_fg_prob"][0], atol=2e-5)


@pytest.mark.parametrize("name", IMAGES)
def test_proposals(traces: dict[str, ImageTrace], fixtures: dict, name: str) -> None:
    exp, proposals = fixtures[name], traces[name].proposals
    assert proposals.boxes.shape[0] == exp["proposal_counts"][-1]
    np.testing.assert_allclose(proposals.boxes.numpy(), exp["proposals"], atol=0.01, rtol=0)
    np.testing.assert_array_equal(proposals.anchor_index.numpy(), exp["proposal_anchor_index"])
    np.testing.assert_allclose(traces[name].proposals_orig.numpy(), exp["proposals_orig"], atol=0.01, rtol=0)


@pytest.mark.parametrize("name", IMAGES)
def test_roi_head(traces: dict[str, ImageTrace], fixtures: dict, name: str) -> None:
    exp, heads = fixtures[name], traces[name].heads
    np.testing.assert_allclose(heads.pool5.numpy(), exp["pool5"], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(heads.cls_prob.numpy(), exp["cls_prob"], atol=1e-5)
    np.testing.assert_allclose(heads.attr_prob.numpy(), exp["attr_prob"], atol=1e-5)


@pytest.mark.parametrize("name", IMAGES)
def test_roi_head_on_fixture_proposals(
    detector: BottomUpAttentionDetector, traces: dict[str, ImageTrace], fixtures: dict, name: str
) -> None:
    """Our res4 + the fixture's proposals (the selected rows plus the first few, to bound the CPU time)."""
    exp = fixtures[name]
    rows = np.unique(np.concatenate((exp["keep_boxes"], np.arange(4))))
    boxes = torch.from_numpy(exp["proposals"][rows])
    rois = torch.cat((torch.zeros(len(rows), 1), boxes), dim=1)
    res4 = traces[name].res4[None]
    with torch.inference_mode():
        pooled = detector.roi_heads.pool(res4, rois)
        heads = detector.roi_heads(res4, rois)
    np.testing.assert_allclose(
        pooled.double().mean(dim=(1, 2, 3)).numpy(), exp["roipool5_per_roi_mean"][rows], atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(heads.pool5.numpy(), exp["pool5"][rows], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(heads.cls_prob.numpy(), exp["cls_prob"][rows], atol=1e-5)
    np.testing.assert_allclose(heads.attr_prob.numpy(), exp["attr_prob"][rows], atol=1e-5)


@pytest.mark.parametrize("name", IMAGES)
def test_selected_regions(traces: dict[str, ImageTrace], fixtures: dict, name: str) -> None:
    exp, trace = fixtures[name], traces[name]
    regions = trace.detections
    assert trace.selection.branch == str(exp["selection_branch"])
    np.testing.assert_array_equal(trace.selection.keep.numpy(), exp["keep_boxes"])
    assert regions.num_boxes == int(exp["num_boxes"])
    assert (regions.image_w, regions.image_h) == (int(exp["image_w"]), int(exp["image_h"]))
    np.testing.assert_allclose(regions.boxes, exp["boxes"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(regions.features, exp["features"], atol=1e-4, rtol=1e-3)
    np.testing.assert_array_equal(regions.object_ids, exp["objects_id"])
    np.testing.assert_array_equal(regions.attribute_ids, exp["attrs_id"])
    np.testing.assert_allclose(regions.object_conf, exp["objects_conf"], atol=1e-5)
    np.testing.assert_allclose(regions.attribute_conf, exp["attrs_conf"], atol=1e-5)
