"""Caffe sort order and NMS: the host reference against a transcription of `cpu_nms`, and the batched device
methods (padded NMS, proposal layer, per-class max_conf, region selection) against the per-image reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.bua.anchors import generate_cell_anchors
from extractors.bua.nms import (
    caffe_descending,
    caffe_descending_masked,
    float32_threshold,
    greedy_nms,
    nms_padded,
    nms_padded_full,
)
from extractors.bua.proposals import proposal_layer, proposal_layer_padded
from extractors.bua.selection import (
    BRANCHES,
    per_class_max_conf,
    per_class_max_conf_padded,
    select_regions,
    select_regions_padded,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------------------- references
def cpu_nms_transcription(dets: np.ndarray, thresh: float) -> list[int]:
    """py-faster-rcnn `cpu_nms` line by line in float32 scalars; argsort()[::-1] as a reversed stable sort."""
    x1, y1, x2, y2, scores = (dets[:, k].astype(np.float32) for k in range(5))
    one = np.float32(1.0)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(scores, kind="stable")[::-1]
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    with np.errstate(all="ignore"):
        for _i in range(len(dets)):
            i = order[_i]
            if suppressed[i]:
                continue
            keep.append(int(i))
            ix1, iy1, ix2, iy2, iarea = x1[i], y1[i], x2[i], y2[i], areas[i]
            for _j in range(_i + 1, len(dets)):
                j = order[_j]
                if suppressed[j]:
                    continue
                xx1 = max(ix1, x1[j])
                yy1 = max(iy1, y1[j])
                xx2 = min(ix2, x2[j])
                yy2 = min(iy2, y2[j])
                w = max(np.float32(0.0), np.float32(xx2 - xx1 + one))
                h = max(np.float32(0.0), np.float32(yy2 - yy1 + one))
                inter = np.float32(w * h)
                ovr = np.float32(inter / np.float32(np.float32(iarea + areas[j]) - inter))
                if float(ovr) >= thresh:  # float32 IoU against the double threshold
                    suppressed[j] = True
    return keep


def hostile_boxes(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered boxes with quantised (tied) scores, duplicates, degenerate and huge boxes."""
    centres = torch.rand(count, 2, generator=generator) * 120
    sizes = torch.rand(count, 2, generator=generator) * 60 + 2
    boxes = torch.cat((centres - sizes / 2, centres + sizes / 2), dim=1)
    scores = torch.randint(0, 6, (count,), generator=generator).float() / 8  # many exact ties
    picks = torch.randperm(count, generator=generator)[:12]
    boxes[picks[:3]] = boxes[picks[3:6]]  # duplicates, some with tied scores
    scores[picks[3]] = scores[picks[0]]
    boxes[picks[6], 2] = boxes[picks[6], 0] - 5.0  # x2 < x1: negative "+1" width
    boxes[picks[7], 2] = boxes[picks[7], 0] - 1.0  # zero "+1" width
    boxes[picks[8], 3] = boxes[picks[8], 1] - 3.0  # negative height
    boxes[picks[9]] = torch.tensor([0.0, 0.0, 1e6, 1e6])  # huge
    boxes[picks[10]] = torch.tensor([5.0, 5.0, 1e6, 9.9e5])
    boxes[picks[11]] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # a single pixel
    return boxes, scores


def exact_iou_pair() -> tuple[torch.Tensor, float]:
    """Two 10x10 "+1" boxes shifted by 5 px and their float32 IoU (50 / 150)."""
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    return boxes, float(np.float32(50.0) / np.float32(150.0))


# ------------------------------------------------------------------------------------------- sort order
def test_caffe_descending_matches_reversed_stable_numpy_sort() -> None:
    rng = np.random.default_rng(0)
    for shape in ((1,), (17,), (200,), (3, 4, 50)):
        values = rng.integers(0, 4, size=shape).astype(np.float32)  # mostly ties
        expected = np.flip(np.argsort(values, axis=-1, kind="stable"), axis=-1)
        np.testing.assert_array_equal(caffe_descending(torch.from_numpy(values)).numpy(), expected)
    assert caffe_descending(torch.zeros(0)).tolist() == []


def test_caffe_descending_differs_from_stable_descending_on_ties() -> None:
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1])
    assert caffe_descending(scores).tolist() == [3, 1, 2, 0, 4]  # ties: higher index first
    assert torch.sort(scores, descending=True, stable=True).indices.tolist() == [1, 3, 0, 2, 4]


def test_masked_order_is_the_order_among_valid_entries() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (4, 60), generator=generator).float()
    valid = torch.rand(4, 60, generator=generator) < 0.6
    scores[~valid] = torch.tensor([float("nan"), float("inf"), 9.0])[torch.arange(int((~valid).sum())) % 3]
    order = caffe_descending_masked(scores, valid)
    for row in range(4):
        index = torch.nonzero(valid[row]).squeeze(1)
        count = index.numel()
        assert torch.equal(order[row, :count], index[caffe_descending(scores[row, index])])
        assert not valid[row, order[row, count:]].any()


def test_float32_threshold_reproduces_the_double_comparison() -> None:
    for thresh in (0.2, 0.3, 0.5, 0.7, 1 / 3, 0.0, 1.0):
        t32 = float32_threshold(thresh)
        near = np.float32(thresh)
        candidates = torch.tensor(
            [np.nextafter(near, np.float32(-1)), near, np.nextafter(near, np.float32(2))], dtype=torch.float32
        )
        assert torch.equal(candidates >= t32, candidates.double() >= thresh), thresh
    # 0.7 rounds down in float32: comparing with the plain Python float would wrongly pass float32(0.7).
    seven = torch.tensor([0.7], dtype=torch.float32)
    assert (
        bool(seven >= 0.7) and not bool(seven.double() >= 0.7) and not bool(seven >= float32_threshold(0.7))
    )


# ------------------------------------------------------------------------------------------- host NMS
def test_greedy_nms_matches_cpu_nms_transcription() -> None:
    generator = torch.Generator().manual_seed(2)
    pair, pair_iou = exact_iou_pair()
    for trial in range(6):
        boxes, scores = hostile_boxes(generator, 70)
        boxes[:2] = pair + 30.0 * trial  # an IoU of exactly 1/3 (float32) to hit the threshold
        scores[:2] = torch.tensor([0.95, 0.9])
        dets = torch.cat((boxes, scores[:, None]), dim=1).numpy()
        for thresh in (0.3, 0.5, 0.7, pair_iou, float(np.nextafter(np.float32(pair_iou), np.float32(1)))):
            expected = cpu_nms_transcription(dets, thresh)
            assert greedy_nms(boxes, scores, thresh).tolist() == expected, (trial, thresh)
            assert greedy_nms(boxes, scores, thresh, max_keep=5).tolist() == expected[:5]


def test_nms_threshold_is_inclusive_and_uses_plus_one_areas() -> None:
    boxes, iou = exact_iou_pair()
    scores = torch.tensor([0.9, 0.8])
    assert greedy_nms(boxes, scores, iou).tolist() == [0]  # IoU == thresh suppresses
    assert greedy_nms(boxes, scores, float(np.nextafter(np.float32(iou), np.float32(1)))).tolist() == [0, 1]
    counts = torch.tensor([2])
    keep, keep_counts = nms_padded(boxes[None], scores[None], counts, iou, 2)
    assert keep.tolist() == [[0, 0]] and keep_counts.tolist() == [1]
    # IoU 7 / 10 rounds to float32(0.7) < 0.7: kept at 0.7 (double comparison), suppressed at float32(0.7).
    seven = torch.tensor([[0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 6.0, 0.0]])
    prob = torch.tensor([[[0.0, 0.9], [0.0, 0.8]]])
    for thresh, expected in ((0.7, [0, 1]), (float(np.float32(0.7)), [0])):
        dets = torch.cat((seven, scores[:, None]), dim=1).numpy()
        assert cpu_nms_transcription(dets, thresh) == expected
        assert greedy_nms(seven, scores, thresh).tolist() == expected
        keep, keep_counts = nms_padded(seven[None], scores[None], counts, thresh, 2)
        assert keep[0, : int(keep_counts[0])].tolist() == expected
        conf, _ = per_class_max_conf_padded(seven[None], prob, counts, thresh)
        assert torch.equal(conf, torch.tensor([[0.9, 0.8 if len(expected) == 2 else 0.0]]))


def test_tie_order_changes_the_result_compared_with_stable_descending() -> None:
    """Identical boxes, equal scores: Caffe keeps the later one; a stable descending sort kept the first."""
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.8, 0.8, 0.5])
    assert greedy_nms(boxes, scores, 0.7).tolist() == [1, 2]
    assert cpu_nms_transcription(torch.cat((boxes, scores[:, None]), 1).numpy(), 0.7) == [1, 2]
    old_order = torch.sort(scores, descending=True, stable=True).indices
    assert old_order[0].item() == 0  # the old code would have kept box 0
    # and the selection's by-confidence cut: np.argsort(max_conf)[::-1][:2]
    conf = torch.tensor([0.5, 0.5, 0.5, 0.1])
    dummy_boxes, dummy_prob = torch.zeros(4, 4), torch.zeros(4, 2)
    picked = select_regions(
        dummy_boxes,
        dummy_prob,
        conf_thresh=0.9,
        min_boxes=2,
        max_boxes=3,
        max_conf=(conf, torch.ones(4).long()),
    )
    assert (picked.branch, picked.keep.tolist()) == ("fewer_than_min", [2, 1])


def test_proposal_layer_sorts_twice_like_the_reference() -> None:
    """Equal scores: the pre-NMS cut keeps the HIGHER indices (first argsort()[::-1]), and cpu_nms's second
    sort of the truncated scores reverses them again, so the output runs in ascending anchor order."""
    cell = torch.tensor([[0.0, 0.0, 31.0, 31.0]])  # one 32-px anchor; neighbours overlap with IoU 1/3
    fg_prob = torch.full((1, 1, 4), 0.5)
    deltas = torch.zeros(4, 1, 4)
    props = proposal_layer(
        fg_prob, deltas, cell, (64.0, 128.0, 1.0), pre_nms_top_n=3, post_nms_top_n=10, nms_thresh=0.7
    )
    assert props.anchor_index.tolist() == [1, 2, 3]  # old stable-descending code: [0, 1, 2]
    padded = proposal_layer_padded(
        fg_prob[None],
        deltas[None],
        cell,
        [(64.0, 128.0, 1.0)],
        [(1, 4)],
        feature_stride=16,
        pre_nms_top_n=3,
        post_nms_top_n=10,
        nms_thresh=0.7,
        min_size=16.0,
    )
    assert padded.anchor_index is not None
    assert padded.anchor_index[0, :3].tolist() == [1, 2, 3] and padded.counts.tolist() == [3]


# ------------------------------------------------------------------------------------------- padded NMS
def chain_boxes(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes each overlapping only its neighbours (IoU ~0.82 at a 0.7 threshold, ~0.67 two apart), scores in
    chain order: every decision hinges on the previous one, the worst case for the fixed point."""
    x = torch.arange(count, dtype=torch.float32) * 2.0
    boxes = torch.stack((x, torch.zeros(count), x + 19.0, torch.full((count,), 19.0)), dim=1)
    return boxes, torch.linspace(1.0, 0.5, count)


@pytest.mark.parametrize("max_elements", [2**28, 50])
def test_nms_padded_equals_greedy_per_image(max_elements: int) -> None:
    generator = torch.Generator().manual_seed(3)
    counts = [0, 1, 37, 80, 80, 12, 45]
    width = 80
    boxes = torch.full((len(counts), width, 4), float("nan"))
    scores = torch.full((len(counts), width), float("nan"))
    for index, count in enumerate(counts):
        image_boxes, image_scores = hostile_boxes(generator, max(count, 12))
        boxes[index, :count], scores[index, :count] = image_boxes[:count], image_scores[:count]
        boxes[index, count : count + 3] = 1e30  # garbage beside the NaNs in the padding rows
        scores[index, count : count + 3] = 2.0
    boxes[6, :45], scores[6, :45] = chain_boxes(45)
    for thresh, max_keep in ((0.7, 25), (0.3, 80), (0.5, 3)):
        keep, keep_counts = nms_padded(
            boxes, scores, torch.tensor(counts), thresh, max_keep, max_elements=max_elements
        )
        _, _, total = nms_padded_full(boxes, scores, torch.tensor(counts), thresh, max_keep)
        assert keep.shape == (len(counts), max_keep)
        for index, count in enumerate(counts):
            full = greedy_nms(boxes[index, :count], scores[index, :count], thresh)
            expected = full[:max_keep]
            n = int(keep_counts[index])
            assert n == expected.numel() and int(total[index]) == full.numel(), (index, thresh)
            assert keep[index, :n].tolist() == expected.tolist(), (index, thresh)
            assert not keep[index, n:].any()
    chain_keep = greedy_nms(boxes[6, :45], scores[6, :45], 0.7)
    assert chain_keep.tolist() == list(range(0, 45, 2))  # the chain really alternates


# ------------------------------------------------------------------------------------------- proposals
def random_rpn_batch(
    generator: torch.Generator, sizes: list[tuple[int, int]], num_anchors: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded maps whose padding holds high scores and wild deltas (they must be masked, not just low)."""
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    fg_prob = torch.full((len(sizes), num_anchors, max_h, max_w), 0.99)
    deltas = torch.randn(len(sizes), 4 * num_anchors, max_h, max_w, generator=generator) * 3
    for index, (h, w) in enumerate(sizes):
        quantised = torch.randint(0, levels, (num_anchors, h, w), generator=generator).float() / levels
        fg_prob[index, :, :h, :w] = quantised  # ties everywhere
        deltas[index, :, :h, :w] = torch.randn(4 * num_anchors, h, w, generator=generator) * 0.3
    return fg_prob, deltas


@pytest.mark.parametrize(
    ("pre_nms_top_n", "post_nms_top_n", "nms_thresh"), [(150, 40, 0.7), (0, 300, 0.7), (60, 300, 0.3)]
)
def test_proposal_layer_padded_equals_per_image(
    pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float
) -> None:
    generator = torch.Generator().manual_seed(4)
    cell = torch.from_numpy(generate_cell_anchors(16, (0.5, 1.0, 2.0), (2.0, 4.0)))
    sizes = [(7, 9), (5, 12), (9, 4), (1, 1)]
    im_infos = [(112.0, 144.0, 1.0), (80.0, 190.0, 0.8), (141.0, 60.0, 1.6), (16.0, 16.0, 0.5)]
    fg_prob, deltas = random_rpn_batch(generator, sizes, cell.shape[0], levels=6)
    padded = proposal_layer_padded(
        fg_prob,
        deltas,
        cell,
        im_infos,
        sizes,
        feature_stride=16,
        pre_nms_top_n=pre_nms_top_n,
        post_nms_top_n=post_nms_top_n,
        nms_thresh=nms_thresh,
        min_size=16.0,
    )
    assert padded.boxes.shape == (len(sizes), post_nms_top_n, 4)
    survivors_below_cut = False
    for index, ((h, w), info) in enumerate(zip(sizes, im_infos, strict=True)):
        reference = proposal_layer(
            fg_prob[index, :, :h, :w],
            deltas[index, :, :h, :w],
            cell,
            info,
            pre_nms_top_n=pre_nms_top_n,
            post_nms_top_n=post_nms_top_n,
            nms_thresh=nms_thresh,
            full_nms=True,
        )
        count = int(padded.counts[index])
        survivors_below_cut |= count < post_nms_top_n
        assert count == reference.boxes.shape[0]
        assert torch.equal(padded.boxes[index, :count], reference.boxes)  # bit for bit, same order
        assert torch.equal(padded.scores[index, :count], reference.scores)
        assert padded.anchor_index is not None and padded.stage_counts is not None
        assert torch.equal(padded.anchor_index[index, :count], reference.anchor_index)
        assert padded.stage_counts[index].tolist() == list(reference.counts[:4])
        assert not padded.boxes[index, count:].any() and not padded.scores[index, count:].any()
    assert survivors_below_cut  # at least the 1x1 image gives fewer than post_nms_top_n
    unpadded = padded.unpad()
    assert [p.counts[-1] for p in unpadded] == padded.counts.tolist()


def test_proposal_layer_padded_on_fixture_maps(bua_fixtures: Path) -> None:
    """The three fixture images' RPN maps in one zero-padded batch give the fixture proposals exactly."""
    names = ("landscape_500x375", "portrait_333x502", "wide_900x240")
    fixtures = [np.load(bua_fixtures / f"expected_{name}.npz") for name in names]
    maps = [(torch.from_numpy(e["rpn_fg_prob"][0]), torch.from_numpy(e["rpn_deltas"][0])) for e in fixtures]
    sizes = [tuple(fg.shape[1:]) for fg, _ in maps]
    fg_prob = torch.zeros((3, 12, max(h for h, _ in sizes), max(w for _, w in sizes)))
    deltas = torch.zeros((3, 48, *fg_prob.shape[2:]))
    for index, (fg, delta) in enumerate(maps):
        fg_prob[index, :, : fg.shape[1], : fg.shape[2]] = fg
        deltas[index, :, : fg.shape[1], : fg.shape[2]] = delta
    padded = proposal_layer_padded(
        fg_prob,
        deltas,
        torch.from_numpy(generate_cell_anchors(16, (0.5, 1.0, 2.0), (4.0, 8.0, 16.0, 32.0))),
        [tuple(float(v) for v in e["im_info"]) for e in fixtures],
        sizes,
        feature_stride=16,
        pre_nms_top_n=6000,
        post_nms_top_n=300,
        nms_thresh=0.7,
        min_size=16.0,
    )
    for index, (exp, props) in enumerate(zip(fixtures, padded.unpad(), strict=True)):
        assert list(props.counts) == exp["proposal_counts"].tolist(), index
        np.testing.assert_array_equal(props.anchor_index.numpy(), exp["proposal_anchor_index"])
        np.testing.assert_array_equal(props.scores.numpy(), exp["proposal_scores"])
        np.testing.assert_allclose(props.boxes.numpy(), exp["proposals"], atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------- selection
def random_detections(
    generator: torch.Generator, counts: list[int], width: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.full((len(counts), width, 4), float("nan"))
    prob = torch.full((len(counts), width, num_classes + 1), float("nan"))
    for index, count in enumerate(counts):
        image_boxes, _ = hostile_boxes(generator, max(count, 12))
        boxes[index, :count] = image_boxes[:count]
        levels = torch.randint(0, 5, (count, num_classes + 1), generator=generator).float()
        prob[index, :count] = levels / 8  # exact ties within and across classes
    return boxes, prob


def test_per_class_max_conf_padded_equals_per_image() -> None:
    generator = torch.Generator().manual_seed(5)
    counts = [40, 0, 7, 23, 1]
    boxes, prob = random_detections(generator, counts, 40, num_classes=6)
    for max_elements in (2**28, 2000):
        conf, conf_class = per_class_max_conf_padded(
            boxes, prob, torch.tensor(counts), 0.3, max_elements=max_elements
        )
        assert conf.dtype == torch.float32 and conf_class.dtype == torch.long
        for index, count in enumerate(counts):
            expected_conf, expected_class = per_class_max_conf(boxes[index, :count], prob[index, :count], 0.3)
            assert torch.equal(conf[index, :count], expected_conf), index
            assert torch.equal(conf_class[index, :count], expected_class), index
            assert not conf[index, count:].any() and not conf_class[index, count:].any()
    assert greedy_nms(boxes[0], prob[0, :, 1], 0.3).numel() < counts[0]  # the data makes the NMS bite


def test_select_regions_padded_equals_per_image_in_all_branches() -> None:
    generator = torch.Generator().manual_seed(6)
    width = 30
    passing = [3, 6, 12, 20, 0, 2]  # min 5, max 8: fewer, within, more, more, fewer (empty), fewer (count 2)
    counts = [30, 30, 30, 20, 0, 2]
    max_conf = torch.full((len(counts), width), float("nan"))
    seven = float(np.float32(0.7))  # below the double 0.7: must not pass
    for index, (count, n_pass) in enumerate(zip(counts, passing, strict=True)):
        low = torch.randint(0, 4, (count,), generator=generator).float() / 10  # ties among the failures
        low[low == 0] = seven if count else 0.0
        high = 0.75 + torch.randint(0, 3, (count,), generator=generator).float() / 8  # ties among passes
        chosen = torch.randperm(count, generator=generator)[:n_pass]
        row = low.clone()
        row[chosen] = high[chosen]
        max_conf[index, :count] = row
    keep, keep_counts, branch = select_regions_padded(
        max_conf, torch.tensor(counts), conf_thresh=0.7, min_boxes=5, max_boxes=8
    )
    assert keep.shape == (len(counts), 8)
    seen = set()
    for index, count in enumerate(counts):
        conf = max_conf[index, :count]
        reference = select_regions(
            torch.zeros(count, 4),
            torch.zeros(count, 2),
            conf_thresh=0.7,
            min_boxes=5,
            max_boxes=8,
            max_conf=(conf, torch.zeros(count, dtype=torch.long)),
        )
        n = int(keep_counts[index])
        assert BRANCHES[int(branch[index])] == reference.branch, index
        assert keep[index, :n].tolist() == reference.keep.tolist(), index
        assert not keep[index, n:].any()
        seen.add(reference.branch)
    assert seen == set(BRANCHES)
