"""The bottom-up-attention detector: decoded BGR images in, generate_tsv regions (boxes, 2048-d features) out.

It does no file I/O (no images, weights or vocabularies): callers decode images, load weights into it and
write stores; class ids are vocabulary line numbers that callers name. Several images share one backbone
pass as a zero-padded batch; every stage that could read the padding is masked so each image's result equals
a one-image run (up to float summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Literal

import numpy as np
import torch
from torch import nn

from extractors.bua.backbone import ResNetC4Backbone
from extractors.bua.config import DetectorConfig
from extractors.bua.precision import (
    PRECISIONS,
    Precision,
    backbone_fp32_mode,
    check_precision,
    default_channels_last,
    fp32_matmul_precision,
    res5_dtype,
)
from extractors.bua.preprocess import (
    BlobMaker,
    PreparedImage,
    check_image,
    feature_size,
    pad_blobs,
    size_problem,
)
from extractors.bua.proposals import (
    PaddedProposals,
    ProposalGenerator,
    Proposals,
    per_image_tensor,
    proposal_layer,
    proposal_layer_padded,
)
from extractors.bua.roi_head import RoIHeadOutput, RoIHeads
from extractors.bua.selection import (
    BRANCHES,
    Selection,
    per_class_max_conf,
    per_class_max_conf_padded,
    select_regions,
    select_regions_padded,
    top_labels,
)

__all__ = ["PRECISIONS", "BottomUpAttentionDetector", "ImageTrace", "Precision", "RegionDetections"]

# Where the proposal and per-class NMS run: "host" (the CPU reference loops, image by image), "device" (the
# batched fixed-point kernels on the detector's device, no per-image synchronisation) or "auto" (device on
# an accelerator, host on the CPU, where the loops are faster).
NmsBackend = Literal["auto", "host", "device"]
NMS_BACKENDS: tuple[str, ...] = ("auto", "host", "device")

# What `detect` checks for NaN/inf per image, in the order of the counts it reports.
_FINITENESS_CHECKS = (
    "proposal scores",
    "class probabilities",
    "attribute probabilities",
    "boxes",
    "features",
)


@dataclass
class RegionDetections:
    """One image's regions: boxes in original pixels, pool5 features, 0-based object/attribute vocab ids.

    `problem` says what was not finite (NaN/inf scores, probabilities, boxes or features) when the image's
    regions cannot be trusted: such a result must become an error record, never a stored row.
    """

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    features: np.ndarray  # (n, D) float32
    object_ids: np.ndarray  # (n,) int64, line numbers of objects_vocab.txt (0-based)
    object_conf: np.ndarray  # (n,) float32
    attribute_ids: np.ndarray  # (n,) int64, line numbers of attributes_vocab.txt (0-based)
    attribute_conf: np.ndarray  # (n,) float32
    image_w: int
    image_h: int
    problem: str | None = None
    branch: str = ""  # generate_tsv's selection branch (see selection.BRANCHES)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class ImageTrace:
    """Every intermediate of one image (for conformance tests and debugging)."""

    im_scale: float
    im_info: tuple[float, float, float]
    blob: torch.Tensor  # (3, H', W')
    res4: torch.Tensor  # (C4, H4, W4)
    rpn_logits: torch.Tensor  # (A, H4, W4)
    rpn_deltas: torch.Tensor  # (4A, H4, W4)
    proposals: Proposals
    proposals_orig: torch.Tensor  # (R, 4)
    heads: RoIHeadOutput
    selection: Selection
    detections: RegionDetections
    extra: dict[str, object] = field(default_factory=dict)


def _scatter_rows(heads: RoIHeadOutput, rows: torch.Tensor, total: int) -> RoIHeadOutput:
    """Head outputs of the rows `rows` placed in `total` zero rows (the padded (B*P) layout)."""

    def place(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros((total, *values.shape[1:]))
        out[rows] = values
        return out

    return heads.map(place)


class BottomUpAttentionDetector(nn.Module):
    """ResNet C4 Faster R-CNN with the attribute head, Caffe test-time semantics, generate_tsv selection.

    Two paths share every module: `detect` (batched and device-resident: proposals, per-class NMS, selection
    and the gather of the kept regions stay on the device, and one device-to-host copy per batch brings the
    results back) and `trace` (image by image on the host, keeping every intermediate; the conformance path).
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DetectorConfig()
        self.backbone = ResNetC4Backbone(self.config)
        self.proposal_generator = ProposalGenerator(self.config)
        self.roi_heads = RoIHeads(self.config)
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.backbone.stem.conv1.weight.device

    # ---------------------------------------------------------------------------------------------- stages
    def preparer(self) -> BlobMaker:
        """The host preprocessing (Caffe blob and scale) as a picklable callable for loader workers."""
        cfg = self.config
        return BlobMaker(cfg.test_scale, cfg.max_size, tuple(cfg.pixel_means_bgr))

    def prepare(self, images_bgr: Sequence[np.ndarray]) -> list[PreparedImage]:
        """Blobs of decoded uint8 HxWx3 BGR images, each checked with its position in the message."""
        maker = self.preparer()
        prepared = []
        for index, image in enumerate(images_bgr):
            check_image(image, f"image {index}")
            prepared.append(maker(image))
        return prepared

    def preprocess(
        self, images_bgr: Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
        """Zero-padded (B, 3, Hmax, Wmax) blob batch, per-image im_scale and blob sizes."""
        prepared = self.prepare(images_bgr)
        batch, sizes = pad_blobs(prepared)
        return batch, [item.im_scale for item in prepared], sizes

    def rpn(self, res4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness logits (B, A, H4, W4) and deltas (B, 4A, H4, W4), float32."""
        logits, deltas = self.proposal_generator.rpn_head(res4)
        return logits.float(), deltas.float()

    def _backbone_rpn(
        self, batch: torch.Tensor, sizes: list[tuple[int, int]], precision: Precision
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """res4, RPN logits and deltas in float32 (TF32 in "tf32" mode): the fast modes keep the proposals."""
        padded = any(size != sizes[0] for size in sizes)
        with fp32_matmul_precision(backbone_fp32_mode(precision)):
            res4 = self.backbone(batch, sizes if padded else None)["res4_out"]
            logits, deltas = self.rpn(res4)
        return res4, logits, deltas

    def _heads(
        self, res4: torch.Tensor, rois: torch.Tensor, precision: Precision, roi_chunk_size: int
    ) -> RoIHeadOutput:
        """res5 in the mode's dtype (float32, or bf16/fp16 with BN folded), heads in float32."""
        low = res5_dtype(precision)
        with fp32_matmul_precision(backbone_fp32_mode(precision)):
            return self.roi_heads(
                res4,
                rois,
                roi_chunk_size,
                dtype=low,
                channels_last=default_channels_last(res4.device),
            )

    def proposals(
        self,
        fg_prob: torch.Tensor,
        deltas: torch.Tensor,
        im_info: tuple[float, float, float],
        full_nms: bool = False,
    ) -> Proposals:
        """Caffe proposal layer for one image's (A, H4, W4) fg probabilities and (4A, H4, W4) deltas."""
        cfg = self.config
        return proposal_layer(
            fg_prob,
            deltas,
            self.proposal_generator.cell_anchors,
            im_info,
            feature_stride=cfg.feature_stride,
            pre_nms_top_n=cfg.pre_nms_top_n,
            post_nms_top_n=cfg.post_nms_top_n,
            nms_thresh=cfg.rpn_nms_thresh,
            min_size=cfg.rpn_min_size,
            full_nms=full_nms,
        )

    def select(self, boxes_orig: torch.Tensor, cls_prob: torch.Tensor) -> Selection:
        cfg = self.config
        return select_regions(
            boxes_orig,
            cls_prob,
            conf_thresh=cfg.conf_thresh,
            nms_thresh=cfg.nms_thresh,
            min_boxes=cfg.min_boxes,
            max_boxes=cfg.max_boxes,
        )

    # ------------------------------------------------------------------------------------------- public API
    def image_size_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size cannot be detected on (extreme aspect ratio), else None: lets a runner
        refuse such an image alone instead of failing the batch it is in."""
        return size_problem(height, width, self.config.test_scale, self.config.max_size)

    @torch.inference_mode()
    def detect(
        self,
        images_bgr: Sequence[np.ndarray],
        *,
        precision: Precision = "exact",
        roi_chunk_size: int = 300,
        nms: NmsBackend = "auto",
    ) -> list[RegionDetections]:
        """Regions of several decoded uint8 HxWx3 BGR images, computed in one padded forward pass."""
        check_precision(precision)
        return self.detect_prepared(
            self.prepare(images_bgr), precision=precision, roi_chunk_size=roi_chunk_size, nms=nms
        )

    @torch.inference_mode()
    def detect_prepared(
        self,
        prepared: Sequence[PreparedImage],
        *,
        precision: Precision = "exact",
        roi_chunk_size: int = 300,
        nms: NmsBackend = "auto",
    ) -> list[RegionDetections]:
        """`detect` for images already made into blobs (by `preparer()`, e.g. in loader workers).

        Nothing waits for the device per image: the blob batch goes over from page-locked memory without
        blocking, proposals, NMS, selection and the gather of the kept regions run batched on the device, the
        host reads the proposal counts once per batch (res5 runs on surviving proposals only), and the batch's
        results come back in one device-to-host copy.
        """
        check_precision(precision)
        if nms not in NMS_BACKENDS:
            raise ValueError(f"unknown nms backend {nms!r}; expected one of {', '.join(NMS_BACKENDS)}")
        if len(prepared) == 0:
            return []
        device = self.device
        on_device = nms == "device" or (nms == "auto" and device.type != "cpu")
        batch, sizes = pad_blobs(prepared, pin_memory=device.type == "cuda")
        batch = batch.to(device, non_blocking=True)
        res4, logits, deltas = self._backbone_rpn(batch, sizes, precision)
        im_infos = [
            (float(h), float(w), float(np.float32(item.im_scale)))
            for (h, w), item in zip(sizes, prepared, strict=True)
        ]
        feature_sizes = [(feature_size(h), feature_size(w)) for h, w in sizes]
        props = self._padded_proposals(torch.sigmoid(logits), deltas, im_infos, feature_sizes, on_device)
        num_images, per_image = props.boxes.shape[:2]
        # res5 dominates the cost, so it runs on the surviving proposals only: the one host sync of the batch
        # (small images keep far fewer than post_nms_top_n proposals).
        counts = props.counts.tolist()
        surviving = [index * per_image + k for index, count in enumerate(counts) for k in range(count)]
        rows = per_image_tensor(surviving, torch.long, device)
        image_index = torch.arange(num_images, device=device, dtype=torch.float32).repeat_interleave(
            per_image
        )
        rois = torch.cat((image_index[:, None], props.boxes.reshape(-1, 4)), dim=1)
        heads = _scatter_rows(self._heads(res4, rois[rows], precision, roi_chunk_size), rows, len(rois))
        return self._regions_padded(props, heads, im_infos, prepared, on_device)

    def _regions_padded(
        self,
        props: PaddedProposals,
        heads: RoIHeadOutput,
        im_infos: list[tuple[float, float, float]],
        prepared: Sequence[PreparedImage],
        on_device: bool,
    ) -> list[RegionDetections]:
        """`detect` after the heads: per-class NMS, the generate_tsv rule and the gather of the kept regions,
        batched, then the one copy to the host (benchmarks/extract_host.py times this step as is)."""
        num_images, per_image = props.boxes.shape[:2]
        scales = per_image_tensor([info[2] for info in im_infos], torch.float32, props.boxes.device)
        # float32 division by float32(im_scale), as the reference under NumPy 1.x.
        boxes_orig = props.boxes / scales[:, None, None]
        cls_prob = heads.cls_prob.reshape(num_images, per_image, -1)
        cfg = self.config
        if on_device:
            max_conf, _ = per_class_max_conf_padded(boxes_orig, cls_prob, props.counts, cfg.nms_thresh)
        else:
            max_conf = self._host_max_conf(boxes_orig, cls_prob, props.counts)
        keep, keep_counts, branch = select_regions_padded(
            max_conf,
            props.counts,
            conf_thresh=cfg.conf_thresh,
            min_boxes=cfg.min_boxes,
            max_boxes=cfg.max_boxes,
        )
        packed = self._pack_kept(props, heads, boxes_orig, keep, keep_counts, branch)
        return self._unpack(packed.cpu().numpy(), prepared, keep.shape[1])  # the one copy to the host

    def _padded_proposals(
        self,
        fg_prob: torch.Tensor,
        deltas: torch.Tensor,
        im_infos: list[tuple[float, float, float]],
        feature_sizes: list[tuple[int, int]],
        on_device: bool,
    ) -> PaddedProposals:
        """Each image's proposals as (B, P, 4) rows and counts: batched on the device, or image by image."""
        cfg = self.config
        if on_device:
            return proposal_layer_padded(
                fg_prob,
                deltas,
                self.proposal_generator.cell_anchors,
                im_infos,
                feature_sizes,
                feature_stride=cfg.feature_stride,
                pre_nms_top_n=cfg.pre_nms_top_n,
                post_nms_top_n=cfg.post_nms_top_n,
                nms_thresh=cfg.rpn_nms_thresh,
                min_size=cfg.rpn_min_size,
            )
        per_image = cfg.post_nms_top_n
        boxes = fg_prob.new_zeros((len(im_infos), per_image, 4))
        scores = fg_prob.new_zeros((len(im_infos), per_image))
        counts = []
        for index, (im_info, (feat_h, feat_w)) in enumerate(zip(im_infos, feature_sizes, strict=True)):
            props = self.proposals(
                fg_prob[index, :, :feat_h, :feat_w], deltas[index, :, :feat_h, :feat_w], im_info
            )
            count = props.boxes.shape[0]
            boxes[index, :count] = props.boxes
            scores[index, :count] = props.scores
            counts.append(count)
        return PaddedProposals(boxes, scores, torch.tensor(counts, dtype=torch.long, device=fg_prob.device))

    def _host_max_conf(
        self, boxes: torch.Tensor, cls_prob: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """max_conf (B, P) by the CPU reference sweep, image by image (padding rows 0)."""
        max_conf = boxes.new_zeros(boxes.shape[:2])
        for index, count in enumerate(counts.tolist()):
            conf, _ = per_class_max_conf(
                boxes[index, :count], cls_prob[index, :count], self.config.nms_thresh
            )
            max_conf[index, :count] = conf
        return max_conf

    @staticmethod
    def _pack_kept(
        props: PaddedProposals,
        heads: RoIHeadOutput,
        boxes_orig: torch.Tensor,
        keep: torch.Tensor,
        keep_counts: torch.Tensor,
        branch: torch.Tensor,
    ) -> torch.Tensor:
        """(B, width) float32 rows: kept features, boxes, labels, confidences, then count, branch and the
        non-finite counts; one tensor so the batch crosses to the host in one copy."""
        num_images, per_image = props.boxes.shape[:2]
        valid = torch.arange(per_image, device=keep.device)[None, :] < props.counts[:, None]  # (B, P)
        kept_valid = torch.arange(keep.shape[1], device=keep.device)[None, :] < keep_counts[:, None]

        def take(values: torch.Tensor) -> torch.Tensor:  # (B*P, ...) rows -> (B, M, ...) kept rows
            rows = values.reshape(num_images, per_image, -1)
            return rows.gather(1, keep[:, :, None].expand(-1, -1, rows.shape[2]))

        features = take(heads.pool5.float())
        boxes = boxes_orig.gather(1, keep[:, :, None].expand(-1, -1, 4))
        object_conf, object_ids = take(heads.cls_prob)[:, :, 1:].max(dim=2)
        attribute_conf, attribute_ids = take(heads.attr_prob)[:, :, 1:].max(dim=2)

        def nonfinite(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # per image count
            bad = ~torch.isfinite(values.reshape(num_images, rows.shape[1], -1)).all(dim=2)
            return (bad & rows).sum(dim=1).float()

        problems = torch.stack(
            (
                nonfinite(props.scores, valid),
                nonfinite(heads.cls_prob, valid),
                nonfinite(heads.attr_prob, valid),
                nonfinite(boxes, kept_valid),
                nonfinite(features, kept_valid),
            ),
            dim=1,
        )
        return torch.cat(
            (
                features.reshape(num_images, -1),
                boxes.reshape(num_images, -1),
                object_ids.float(),  # class ids are exact in float32 (far below 2**24)
                object_conf.float(),
                attribute_ids.float(),
                attribute_conf.float(),
                keep_counts[:, None].float(),
                branch[:, None].float(),
                problems,
            ),
            dim=1,
        )

    def _unpack(
        self, packed: np.ndarray, prepared: Sequence[PreparedImage], max_kept: int
    ) -> list[RegionDetections]:
        """The host side of `_pack_kept`: one RegionDetections per image."""
        dim = self.config.feature_dim
        bounds = np.cumsum([0, max_kept * dim, max_kept * 4, max_kept, max_kept, max_kept, max_kept, 1, 1])
        results = []
        for row, item in zip(packed, prepared, strict=True):
            parts = [row[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
            features, boxes, object_ids, object_conf, attribute_ids, attribute_conf, count, branch = parts
            n = int(count[0])
            problems = row[bounds[-1] :]
            problem = None
            if problems.any():
                problem = "not finite: " + ", ".join(
                    f"{name} ({int(value)} rows)"
                    for name, value in zip(_FINITENESS_CHECKS, problems, strict=True)
                    if value
                )
            results.append(
                RegionDetections(
                    boxes=boxes.reshape(max_kept, 4)[:n].copy(),
                    features=features.reshape(max_kept, dim)[:n].copy(),
                    object_ids=object_ids[:n].astype(np.int64),
                    object_conf=object_conf[:n].copy(),
                    attribute_ids=attribute_ids[:n].astype(np.int64),
                    attribute_conf=attribute_conf[:n].copy(),
                    image_w=item.image_w,
                    image_h=item.image_h,
                    problem=problem,
                    branch=BRANCHES[int(branch[0])],
                )
            )
        return results

    @torch.inference_mode()
    def trace(
        self,
        images_bgr: Sequence[np.ndarray],
        *,
        precision: Precision = "exact",
        roi_chunk_size: int = 300,
        full_nms: bool = False,
    ) -> list[ImageTrace]:
        """Image by image on the host after the shared forward pass, keeping every intermediate (blob, res4,
        RPN maps, proposals, head outputs, selection): the reference `detect` is tested against."""
        check_precision(precision)
        if len(images_bgr) == 0:
            return []
        device = self.device
        batch, scales, sizes = self.preprocess(images_bgr)
        batch = batch.to(device)
        res4, logits, deltas = self._backbone_rpn(batch, sizes, precision)
        fg_prob = torch.sigmoid(logits)
        per_image: list[tuple[Proposals, tuple[float, float, float], int, int]] = []
        rois = []
        for index, ((blob_h, blob_w), scale) in enumerate(zip(sizes, scales, strict=True)):
            feat_h, feat_w = feature_size(blob_h), feature_size(blob_w)
            im_info = (float(blob_h), float(blob_w), float(np.float32(scale)))
            props = self.proposals(
                fg_prob[index, :, :feat_h, :feat_w], deltas[index, :, :feat_h, :feat_w], im_info, full_nms
            )
            per_image.append((props, im_info, feat_h, feat_w))
            batch_index = torch.full((props.boxes.shape[0], 1), float(index), device=device)
            rois.append(torch.cat((batch_index, props.boxes), dim=1))
        heads = self._heads(res4, torch.cat(rois), precision, roi_chunk_size)
        traces = []
        start = 0
        for index, (props, im_info, feat_h, feat_w) in enumerate(per_image):
            rows = slice(start, start + props.boxes.shape[0])
            start = rows.stop
            image_heads = heads.map(itemgetter(rows))
            # float32 division by float32(im_scale), as the reference under NumPy 1.x.
            boxes_orig = props.boxes / torch.tensor(im_info[2], dtype=torch.float32, device=device)
            selection = self.select(boxes_orig, image_heads.cls_prob)
            detections = self._regions(images_bgr[index], boxes_orig, image_heads, selection)
            traces.append(
                ImageTrace(
                    im_scale=scales[index],
                    im_info=im_info,
                    blob=batch[index, :, : sizes[index][0], : sizes[index][1]],
                    res4=res4[index, :, :feat_h, :feat_w].float(),
                    rpn_logits=logits[index, :, :feat_h, :feat_w],
                    rpn_deltas=deltas[index, :, :feat_h, :feat_w],
                    proposals=props,
                    proposals_orig=boxes_orig,
                    heads=image_heads,
                    selection=selection,
                    detections=detections,
                )
            )
        return traces

    @staticmethod
    def _regions(
        image: np.ndarray, boxes_orig: torch.Tensor, heads: RoIHeadOutput, selection: Selection
    ) -> RegionDetections:
        keep = selection.keep
        object_ids, object_conf = top_labels(heads.cls_prob[keep])
        attribute_ids, attribute_conf = top_labels(heads.attr_prob[keep])
        return RegionDetections(
            boxes=boxes_orig[keep].float().cpu().numpy(),
            features=heads.pool5[keep].float().cpu().numpy(),
            object_ids=object_ids.cpu().numpy().astype(np.int64),
            object_conf=object_conf.float().cpu().numpy(),
            attribute_ids=attribute_ids.cpu().numpy().astype(np.int64),
            attribute_conf=attribute_conf.float().cpu().numpy(),
            image_w=int(image.shape[1]),
            image_h=int(image.shape[0]),
            branch=selection.branch,
        )
