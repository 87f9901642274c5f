"""The bottom-up-attention detector: decoded BGR images in, generate_tsv regions (boxes, 2048-d features) out.

It does no file I/O (no images, weights or vocabularies): callers decode images, load weights into it and
write stores; class ids are vocabulary line numbers that callers name. Several images share one backbone
pass as a zero-padded batch; every stage that could read the padding is masked so each image's result equals
a one-image run (up to float summation order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from extractors.bua.backbone import ResNetC4Backbone
from extractors.bua.config import DetectorConfig
from extractors.bua.preprocess import check_image, feature_size, image_blob, size_problem
from extractors.bua.proposals import ProposalGenerator, Proposals, proposal_layer
from extractors.bua.roi_head import RoIHeadOutput, RoIHeads
from extractors.bua.selection import Selection, per_class_max_conf_batch, select_regions, top_labels

Precision = Literal["exact", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("exact", "tf32", "bf16", "fp16")


@dataclass
class RegionDetections:
    """One image's regions: boxes in original pixels, pool5 features, 0-based object/attribute vocab ids."""

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    features: np.ndarray  # (n, D) float32
    object_ids: np.ndarray  # (n,) int64, line numbers of objects_vocab.txt (0-based)
    object_conf: np.ndarray  # (n,) float32
    attribute_ids: np.ndarray  # (n,) int64, line numbers of attributes_vocab.txt (0-based)
    attribute_conf: np.ndarray  # (n,) float32
    image_w: int
    image_h: int

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


@contextlib.contextmanager
def precision_mode(precision: Precision, device: torch.device) -> Iterator[None]:
    """float32 with TF32 off ("exact"), TF32 ("tf32"), or bf16/fp16 autocast; restores the TF32 flags."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class BottomUpAttentionDetector(nn.Module):
    """ResNet C4 Faster R-CNN with the attribute head, Caffe test-time semantics, generate_tsv selection."""

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
    def preprocess(
        self, images_bgr: Sequence[np.ndarray]
    ) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
        """Zero-padded (B, 3, Hmax, Wmax) blob batch, per-image im_scale and blob sizes."""
        blobs, scales = [], []
        for index, image in enumerate(images_bgr):
            check_image(image, f"image {index}")
            blob, scale = image_blob(
                image, self.config.test_scale, self.config.max_size, self.config.pixel_means_bgr
            )
            blobs.append(blob)
            scales.append(scale)
        sizes = [(b.shape[1], b.shape[2]) for b in blobs]
        max_h = max(h for h, _ in sizes)
        max_w = max(w for _, w in sizes)
        batch = np.zeros((len(blobs), 3, max_h, max_w), dtype=np.float32)
        for index, blob in enumerate(blobs):
            batch[index, :, : blob.shape[1], : blob.shape[2]] = blob
        return torch.from_numpy(batch), scales, sizes

    def rpn(self, res4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness logits (B, A, H4, W4) and deltas (B, 4A, H4, W4), float32."""
        logits, deltas = self.proposal_generator.rpn_head(res4)
        return logits.float(), deltas.float()

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

    def select(
        self,
        boxes_orig: torch.Tensor,
        cls_prob: torch.Tensor,
        max_conf: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Selection:
        cfg = self.config
        return select_regions(
            boxes_orig,
            cls_prob,
            conf_thresh=cfg.conf_thresh,
            nms_thresh=cfg.nms_thresh,
            min_boxes=cfg.min_boxes,
            max_boxes=cfg.max_boxes,
            max_conf=max_conf,
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
    ) -> list[RegionDetections]:
        """Regions of several decoded uint8 HxWx3 BGR images, computed in one padded forward pass."""
        traces = self.trace(images_bgr, precision=precision, roi_chunk_size=roi_chunk_size)
        return [trace.detections for trace in traces]

    @torch.inference_mode()
    def trace(
        self,
        images_bgr: Sequence[np.ndarray],
        *,
        precision: Precision = "exact",
        roi_chunk_size: int = 300,
        full_nms: bool = False,
    ) -> list[ImageTrace]:
        """`detect` keeping every intermediate (blob, res4, RPN maps, proposals, head outputs, selection)."""
        if len(images_bgr) == 0:
            return []
        device = self.device
        batch, scales, sizes = self.preprocess(images_bgr)
        batch = batch.to(device)
        padded = any(size != sizes[0] for size in sizes)
        with precision_mode(precision, device):
            res4 = self.backbone(batch, sizes if padded else None)["res4_out"]
            logits, deltas = self.rpn(res4)
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
            heads = self.roi_heads(res4, torch.cat(rois), roi_chunk_size)
        image_heads_list: list[RoIHeadOutput] = []
        boxes_orig_list: list[torch.Tensor] = []
        start = 0
        for props, im_info, _, _ in per_image:
            count = props.boxes.shape[0]
            rows = slice(start, start + count)
            start += count
            image_heads_list.append(
                RoIHeadOutput(
                    pool5=heads.pool5[rows],
                    cls_score=heads.cls_score[rows],
                    cls_prob=heads.cls_prob[rows],
                    attr_score=heads.attr_score[rows],
                    attr_prob=heads.attr_prob[rows],
                    attr_embed_index_caffe=heads.attr_embed_index_caffe[rows],
                )
            )
            # float32 division by float32(im_scale), as the reference under NumPy 1.x.
            boxes_orig_list.append(props.boxes / torch.tensor(im_info[2], dtype=torch.float32, device=device))
        # On an accelerator the per-class NMS of all images runs as one sweep (one step per proposal rank);
        # on the CPU image by image (numpy), where stacking gains nothing.
        batch_max_conf: list[tuple[torch.Tensor, torch.Tensor]] | list[None] = [None] * len(per_image)
        if device.type != "cpu":
            batch_max_conf = per_class_max_conf_batch(
                boxes_orig_list, [h.cls_prob for h in image_heads_list], self.config.nms_thresh
            )
        traces = []
        for index, (props, im_info, feat_h, feat_w) in enumerate(per_image):
            image_heads, boxes_orig = image_heads_list[index], boxes_orig_list[index]
            selection = self.select(boxes_orig, image_heads.cls_prob, batch_max_conf[index])
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
        )
