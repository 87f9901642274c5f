"""Stage-isolated conformance of the detector (fixtures README section 7) and tiny-config behaviour."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from bua_recipe import recipe_weights

from extractors.bua.anchors import generate_cell_anchors
from extractors.bua.config import DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector
from extractors.bua.nms import caffe_descending, fixed_point_keep, greedy_nms, pack_bits, pairwise_iou
from extractors.bua.preprocess import compute_scale, feature_size, image_blob
from extractors.bua.roi_head import RoIHeadOutput, roi_feature_coords
from extractors.bua.selection import (
    _pack_bits,
    _sweep_numpy,
    per_class_max_conf,
    per_class_max_conf_padded,
    select_regions,
    select_regions_padded,
)
from extractors.bua.weights import load_into

IMAGES = ("landscape_500x375", "portrait_333x502", "wide_900x240")


@pytest.fixture(scope="module")
def detector(bua_fixtures: Path) -> BottomUpAttentionDetector:
    model = BottomUpAttentionDetector(DetectorConfig())
    load_into(model, recipe_weights(str(bua_fixtures / "weights_manifest.json")))
    return model


def expected(bua_fixtures: Path, name: str) -> np.lib.npyio.NpzFile:
    return np.load(bua_fixtures / f"expected_{name}.npz", allow_pickle=False)


# ---- preprocess
@pytest.mark.parametrize("name", IMAGES)
def test_decode_scale_and_blob(bua_fixtures: Path, name: str) -> None:
    exp = expected(bua_fixtures, name)
    image = cv2.imread(str(bua_fixtures / f"{name}.jpg"))
    np.testing.assert_array_equal(image, exp["image_bgr_uint8"])
    height, width = image.shape[:2]
    assert abs(compute_scale(height, width) - float(exp["im_scale"])) < 1e-12
    blob, im_scale = image_blob(exp["image_bgr_uint8"])
    assert [1, *blob.shape] == exp["blob_shape"].tolist()
    im_info = np.array([blob.shape[1], blob.shape[2], im_scale], dtype=np.float32)
    np.testing.assert_array_equal(im_info, exp["im_info"])
    h, w = blob.shape[1:]
    np.testing.assert_allclose(blob[:, :8, :8], exp["blob_slice_topleft"], atol=1e-4)
    np.testing.assert_allclose(
        blob[:, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4], exp["blob_slice_center"], atol=1e-4
    )
    np.testing.assert_allclose(blob[:, -8:, -8:], exp["blob_slice_bottomright"], atol=1e-4)
    np.testing.assert_allclose(blob[:, 0, :], exp["blob_row0"], atol=1e-4)
    np.testing.assert_allclose(blob[:, :, -1], exp["blob_col_last"], atol=1e-4)
    np.testing.assert_allclose(blob.astype(np.float64).mean(axis=(1, 2)), exp["blob_channel_mean"], atol=1e-4)
    assert (feature_size(h), feature_size(w)) == tuple(exp["res4_shape"][2:])


def test_bad_images_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match=r"HxWx3"):
        image_blob(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        image_blob(np.zeros((10, 10, 3), np.uint16))
    with pytest.raises(ValueError, match=r"smaller than"):
        image_blob(np.zeros((2, 5000, 3), np.uint8))


def test_caffe_anchors(bua_fixtures: Path) -> None:
    exp = expected(bua_fixtures, IMAGES[0])
    np.testing.assert_array_equal(generate_cell_anchors(16, (0.5, 1, 2), (4, 8, 16, 32)), exp["cell_anchors"])


# ---- backbone, RPN
def test_unit_backbone_every_stage(bua_fixtures: Path, detector: BottomUpAttentionDetector) -> None:
    unit = np.load(bua_fixtures / "unit_backbone.npz")
    with torch.inference_mode():
        blob = torch.from_numpy(unit["input_blob"])
        stages = detector.backbone(blob, return_stages=True)
        stages["conv1_bn_relu"] = detector.backbone.conv1_output(blob)
        stages["rpn_logits"], stages["rpn_deltas"] = detector.rpn(stages["res4_out"])
    for key in ("conv1_bn_relu", "stem_out", "res2_out", "res3_out", "res4_out", "rpn_logits", "rpn_deltas"):
        assert tuple(stages[key].shape) == unit[key].shape, key
        np.testing.assert_allclose(stages[key].numpy(), unit[key], atol=1e-4, rtol=1e-4, err_msg=key)


# ---- proposals
@pytest.mark.parametrize("name", IMAGES)
def test_proposal_layer_from_fixture_maps(
    bua_fixtures: Path, detector: BottomUpAttentionDetector, name: str
) -> None:
    exp = expected(bua_fixtures, name)
    im_info = tuple(float(v) for v in exp["im_info"])
    proposals = detector.proposals(
        torch.from_numpy(exp["rpn_fg_prob"][0]),
        torch.from_numpy(exp["rpn_deltas"][0]),
        im_info,
        full_nms=True,
    )
    assert list(proposals.counts) == exp["proposal_counts"].tolist()
    np.testing.assert_array_equal(proposals.anchor_index.numpy(), exp["proposal_anchor_index"])  # same order
    np.testing.assert_allclose(proposals.boxes.numpy(), exp["proposals"], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(proposals.scores.numpy(), exp["proposal_scores"])
    # The early-stopping NMS (stops after 300 kept) keeps the same boxes as the full run.
    fast = detector.proposals(
        torch.from_numpy(exp["rpn_fg_prob"][0]), torch.from_numpy(exp["rpn_deltas"][0]), im_info
    )
    np.testing.assert_array_equal(fast.anchor_index.numpy(), exp["proposal_anchor_index"])


def test_nms_uses_plus_one_areas_and_inclusive_threshold() -> None:
    # Two 10x10 "+1" boxes shifted by 5 px: inter 5*10 = 50, union 150, IoU = 1/3 exactly in float32 terms.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    scores = torch.tensor([0.6, 0.7])  # box 1 first
    iou = float(np.float32(50.0) / np.float32(150.0))
    assert greedy_nms(boxes, scores, iou).tolist() == [1]  # suppressed at IoU >= thresh
    assert greedy_nms(boxes, scores, iou + 1e-6).tolist() == [1, 0]
    assert greedy_nms(boxes, scores, 0.5, max_keep=1).tolist() == [1]


@pytest.mark.parametrize("name", IMAGES)
def test_roi_grid_coordinates(bua_fixtures: Path, name: str) -> None:
    exp = expected(bua_fixtures, name)
    coords = roi_feature_coords(torch.from_numpy(exp["proposals"]))
    np.testing.assert_array_equal(coords.numpy(), exp["roi_feat_coords"])


# ---- RoI head
def test_unit_roihead(bua_fixtures: Path, detector: BottomUpAttentionDetector) -> None:
    unit = np.load(bua_fixtures / "unit_roihead.npz")
    boxes = torch.from_numpy(unit["boxes"])
    np.testing.assert_array_equal(roi_feature_coords(boxes).numpy(), unit["roi_feat_coords"])
    rois = torch.cat((torch.zeros(boxes.shape[0], 1), boxes), dim=1)
    res4 = torch.from_numpy(unit["res4"])
    with torch.inference_mode():
        pooled = detector.roi_heads.pool(res4, rois)
        heads = detector.roi_heads(res4, rois)
    np.testing.assert_array_equal(pooled[:, :32].numpy(), unit["roipool5_first32ch"])
    np.testing.assert_allclose(
        pooled.double().mean(dim=(1, 2, 3)).numpy(), unit["roipool5_per_roi_mean"], atol=1e-6
    )
    np.testing.assert_allclose(heads.pool5.numpy(), unit["pool5"], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(heads.cls_score.numpy(), unit["cls_score"], atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(heads.cls_prob.numpy(), unit["cls_prob"], atol=1e-5)
    np.testing.assert_allclose(heads.attr_score.numpy(), unit["attr_score"], atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(heads.attr_prob.numpy(), unit["attr_prob"], atol=1e-5)
    np.testing.assert_array_equal(heads.attr_embed_index_caffe.numpy(), unit["attr_embed_index_caffe"])


# ---- selection
@pytest.mark.parametrize("name", IMAGES)
def test_selection_from_fixture(bua_fixtures: Path, detector: BottomUpAttentionDetector, name: str) -> None:
    exp = expected(bua_fixtures, name)
    proposals = torch.from_numpy(exp["proposals"])
    boxes_orig = proposals / torch.tensor(np.float32(exp["im_info"][2]))
    np.testing.assert_array_equal(boxes_orig.numpy(), exp["proposals_orig"])
    selection = detector.select(boxes_orig, torch.from_numpy(exp["cls_prob"]))
    np.testing.assert_array_equal(selection.max_conf.numpy().astype(np.float64), exp["max_conf"])
    assert selection.branch == str(exp["selection_branch"])
    assert int((selection.max_conf.double() >= 0.2).sum()) == int(exp["n_max_conf_ge_thresh"])
    np.testing.assert_array_equal(selection.keep.numpy(), exp["keep_boxes"])
    regions = detector._regions(
        exp["image_bgr_uint8"],
        boxes_orig,
        _fixture_heads(exp),
        selection,
    )
    np.testing.assert_allclose(regions.boxes, exp["boxes"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(regions.features, exp["features"])
    np.testing.assert_array_equal(regions.object_ids, exp["objects_id"])
    np.testing.assert_array_equal(regions.attribute_ids, exp["attrs_id"])
    np.testing.assert_array_equal(regions.object_conf, exp["objects_conf"])
    np.testing.assert_array_equal(regions.attribute_conf, exp["attrs_conf"])
    assert (regions.image_w, regions.image_h) == (int(exp["image_w"]), int(exp["image_h"]))


def _fixture_heads(exp: np.lib.npyio.NpzFile) -> RoIHeadOutput:

    cls_prob = torch.from_numpy(exp["cls_prob"])
    attr_prob = torch.from_numpy(exp["attr_prob"])
    return RoIHeadOutput(
        pool5=torch.from_numpy(exp["pool5"]),
        cls_score=cls_prob,
        cls_prob=cls_prob,
        attr_score=attr_prob,
        attr_prob=attr_prob,
        attr_embed_index_caffe=torch.zeros(cls_prob.shape[0], dtype=torch.long),
    )


def test_sweep_backends_agree() -> None:
    """Per class (with tied probabilities): the numpy bitset sweep, the fixed point and greedy_nms agree."""
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(40, 2, generator=generator) * 50
    boxes = torch.cat((boxes, boxes + 5 + torch.rand(40, 2, generator=generator) * 30), dim=1)
    prob = torch.randint(0, 4, (40, 7), generator=generator).float() / 4
    overlap = pairwise_iou(boxes, boxes).double() >= 0.3  # [j, i], j kept
    order = caffe_descending(prob.t())  # (7, 40)
    swept = torch.from_numpy(_sweep_numpy(order.numpy(), _pack_bits(overlap).numpy()))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(40).expand(7, -1))
    earlier = rank[:, None, :] < rank[:, :, None]  # [c, i, j]: j before i
    fixed = fixed_point_keep(pack_bits(overlap.t()[None] & earlier))
    assert torch.equal(swept, fixed)
    for cls in range(7):
        reference = greedy_nms(boxes, prob[:, cls], 0.3)
        assert sorted(reference.tolist()) == torch.nonzero(swept[cls]).squeeze(1).tolist()


def test_selection_branches_on_synthetic_scores() -> None:
    boxes = torch.tensor([[i * 100.0, 0.0, i * 100.0 + 50.0, 50.0] for i in range(6)])  # disjoint
    prob = torch.zeros(6, 3)
    prob[:, 1] = torch.tensor([0.1, 0.5, 0.3, 0.05, 0.2, 0.9])
    within = select_regions(boxes, prob, conf_thresh=0.2, min_boxes=2, max_boxes=4)
    assert within.branch == "within_min_max"
    assert within.keep.tolist() == [1, 2, 4, 5]  # proposal order, not confidence order
    more = select_regions(boxes, prob, conf_thresh=0.2, min_boxes=1, max_boxes=2)
    assert (more.branch, more.keep.tolist()) == ("more_than_max", [5, 1])
    fewer = select_regions(boxes, prob, conf_thresh=0.6, min_boxes=3, max_boxes=5)
    assert (fewer.branch, fewer.keep.tolist()) == ("fewer_than_min", [5, 1, 2])
    # the batched path gives the same three answers
    conf, _ = per_class_max_conf_padded(boxes[None], prob[None], torch.tensor([6]))
    assert torch.equal(conf[0], within.max_conf)
    for selection, (thresh, low, high) in ((within, (0.2, 2, 4)), (more, (0.2, 1, 2)), (fewer, (0.6, 3, 5))):
        keep, count, _ = select_regions_padded(
            conf, torch.tensor([6]), conf_thresh=thresh, min_boxes=low, max_boxes=high
        )
        assert keep[0, : int(count[0])].tolist() == selection.keep.tolist()


# ---- tiny detector
def _synthetic_images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    images = []
    for height, width in ((96, 150), (170, 90), (120, 120)):
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        cv2.rectangle(image, (width // 5, height // 4), (width // 2, height // 2), (40, 200, 90), -1)
        cv2.circle(image, (2 * width // 3, 2 * height // 3), min(height, width) // 6, (220, 60, 30), -1)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def tiny_detector() -> BottomUpAttentionDetector:
    torch.manual_seed(0)
    return BottomUpAttentionDetector(DetectorConfig.tiny())


@pytest.mark.parametrize(("box_mode", "low", "high"), [("fixed", 36, 36), ("adaptive", 10, 100)])
def test_tiny_detect_shapes(
    tiny_detector: BottomUpAttentionDetector, box_mode: str, low: int, high: int
) -> None:
    model = BottomUpAttentionDetector(tiny_detector.config.with_box_mode(box_mode))
    model.load_state_dict(tiny_detector.state_dict())
    images = _synthetic_images()
    results = model.detect(images)
    assert len(results) == len(images)
    for image, regions in zip(images, results, strict=True):
        n = regions.num_boxes
        assert low <= n <= high
        assert regions.boxes.shape == (n, 4) and regions.boxes.dtype == np.float32
        assert (
            regions.features.shape == (n, model.config.feature_dim) and regions.features.dtype == np.float32
        )
        assert regions.object_ids.shape == regions.attribute_ids.shape == (n,)
        assert regions.object_ids.max() < model.config.num_classes
        assert regions.attribute_ids.max() < model.config.num_attributes
        assert (regions.image_h, regions.image_w) == image.shape[:2]
        assert (regions.boxes[:, 2] <= image.shape[1]).all() and (regions.boxes[:, 3] <= image.shape[0]).all()
        assert (regions.boxes[:, :2] >= 0).all() and (regions.features >= 0).all()


def test_tiny_batched_equals_single(tiny_detector: BottomUpAttentionDetector) -> None:
    images = _synthetic_images()
    batched = tiny_detector.detect(images)
    for image, together in zip(images, batched, strict=True):
        alone = tiny_detector.detect([image])[0]
        np.testing.assert_array_equal(together.object_ids, alone.object_ids)
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(together.features, alone.features, atol=1e-4, rtol=1e-3)


def test_padding_is_masked(tiny_detector: BottomUpAttentionDetector) -> None:
    """Without masking, BN shifts in the padded area leak into a smaller image's res4 and RPN outputs."""
    small, large = _synthetic_images()[0], _synthetic_images()[1]
    together = tiny_detector.trace([small, large])[0]
    alone = tiny_detector.trace([small])[0]
    np.testing.assert_allclose(together.res4.numpy(), alone.res4.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(together.rpn_logits.numpy(), alone.rpn_logits.numpy(), atol=1e-4, rtol=1e-5)


def test_tiny_fast_mode_runs_and_keeps_float32_outputs(tiny_detector: BottomUpAttentionDetector) -> None:
    images = _synthetic_images()[:1]
    settings = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    exact = tiny_detector.detect(images)[0]
    fast = tiny_detector.detect(images, precision="bf16")[0]
    assert fast.features.dtype == np.float32 and fast.features.shape == exact.features.shape
    assert np.abs(fast.features - exact.features).max() < 0.5 * (np.abs(exact.features).max() + 1e-6) + 1e-2
    # The new precision API only, restored after use.
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == settings
    with pytest.raises(ValueError, match="unknown precision"):
        tiny_detector.detect(images, precision="fp8")  # type: ignore[arg-type]


def test_batched_sweep_equals_per_image_selection(bua_fixtures: Path) -> None:
    """The device path (fixed-point NMS of every image and class at once, then the padded selection) gives the
    CPU path's max_conf and keep exactly, on the fixture's three images (all selection branches) batched
    together with a ragged, shorter one."""
    boxes, probs = [], []
    for name in IMAGES:
        exp = expected(bua_fixtures, name)
        boxes.append(torch.from_numpy(exp["proposals_orig"]))
        probs.append(torch.from_numpy(exp["cls_prob"]))
    boxes.append(boxes[0][:123])  # fewer proposals: padding must neither keep nor suppress anything
    probs.append(probs[0][:123])
    counts = [b.shape[0] for b in boxes]
    padded_boxes = torch.full((len(boxes), max(counts), 4), float("nan"))
    padded_probs = torch.full((len(boxes), max(counts), probs[0].shape[1]), float("nan"))
    for index, (image_boxes, image_prob) in enumerate(zip(boxes, probs, strict=True)):
        padded_boxes[index, : counts[index]] = image_boxes
        padded_probs[index, : counts[index]] = image_prob
    conf, conf_class = per_class_max_conf_padded(padded_boxes, padded_probs, torch.tensor(counts), 0.3)
    keep, keep_counts, branch = select_regions_padded(
        conf, torch.tensor(counts), conf_thresh=0.2, min_boxes=36, max_boxes=36
    )
    for index, (image_boxes, image_prob) in enumerate(zip(boxes, probs, strict=True)):
        expected_conf, expected_class = per_class_max_conf(image_boxes, image_prob, 0.3)
        assert torch.equal(conf[index, : counts[index]], expected_conf)
        assert torch.equal(conf_class[index, : counts[index]], expected_class)
        selection = select_regions(image_boxes, image_prob, max_conf=(expected_conf, expected_class))
        assert keep[index, : int(keep_counts[index])].tolist() == selection.keep.tolist()
        assert int(branch[index]) == ("within_min_max", "fewer_than_min", "more_than_max").index(
            selection.branch
        )
    for index, name in enumerate(IMAGES):
        reference = expected(bua_fixtures, name)
        np.testing.assert_array_equal(conf[index].numpy().astype(np.float64), reference["max_conf"])
        np.testing.assert_array_equal(keep[index, : int(keep_counts[index])].numpy(), reference["keep_boxes"])
