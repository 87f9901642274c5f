"""RoI pooling 14x14 at 1/16 on res4, res5 (stride 1, dilation 2), mean pool to pool5, class/attribute heads.

`torchvision.ops.roi_pool` on float32 has exactly the Caffe ROIPooling arithmetic: coordinates rounded half
away from zero, float32 bin bounds, empty bins give 0. Head outputs are returned in *Caffe order*
(background / "no attribute" at index 0) while the weights keep the HF layout (background in the last row).

Fast modes pass `dtype` (bfloat16/float16): RoI pooling stays float32, then only res5 runs in that dtype, with
each frozen BN folded into its convolution (cached weights) and optionally channels_last; the spatial mean
and the heads stay float32. With `dtype=None` res5 is the Caffe-exact float32 arithmetic, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from extractors.bua.backbone import make_stage
from extractors.bua.config import DetectorConfig


class BoxPredictor(nn.Module):
    """Class scores (C+1 rows, background last), unused box regression, and the attribute branch."""

    def __init__(self, feature_dim: int, config: DetectorConfig) -> None:
        super().__init__()
        self.cls_score = nn.Linear(feature_dim, config.num_classes + 1)
        self.bbox_pred = nn.Linear(feature_dim, 4 * config.num_classes)  # part of the checkpoint, unused here
        self.cls_embedding = nn.Embedding(config.num_classes + 1, config.attr_embed_dim)
        self.fc_attr = nn.Linear(feature_dim + config.attr_embed_dim, config.attr_hidden_dim)
        self.attr_score = nn.Linear(config.attr_hidden_dim, config.num_attributes + 1)
        for layer in (self.cls_score, self.bbox_pred, self.fc_attr, self.attr_score):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self.requires_grad_(False)

    def forward(self, pool5: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits and probabilities in Caffe order, computed in float32 whatever the autocast state."""
        with torch.autocast(device_type=pool5.device.type, enabled=False):
            pool5 = pool5.float()
            cls_score_hf = F.linear(pool5, self.cls_score.weight.float(), self.cls_score.bias.float())
            # The attribute embedding takes the argmax over all C+1 scores, background included (ArgMax).
            embed_index_hf = cls_score_hf.argmax(dim=1)
            embedding = self.cls_embedding.weight.float()[embed_index_hf]
            hidden = F.relu(
                F.linear(
                    torch.cat((pool5, embedding), dim=1),
                    self.fc_attr.weight.float(),
                    self.fc_attr.bias.float(),
                )
            )
            attr_score_hf = F.linear(hidden, self.attr_score.weight.float(), self.attr_score.bias.float())
            cls_score = _background_first(cls_score_hf)
            attr_score = _background_first(attr_score_hf)
            num_classes = cls_score_hf.shape[1] - 1
            embed_index = torch.where(embed_index_hf == num_classes, 0, embed_index_hf + 1)
            return {
                "cls_score": cls_score,
                "cls_prob": torch.softmax(cls_score, dim=1),
                "attr_score": attr_score,
                "attr_prob": torch.softmax(attr_score, dim=1),
                "attr_embed_index_caffe": embed_index,
            }


def _background_first(scores_hf: torch.Tensor) -> torch.Tensor:
    """HF order (background last) -> Caffe order (background at index 0)."""
    return torch.cat((scores_hf[:, -1:], scores_hf[:, :-1]), dim=1)


@dataclass
class RoIHeadOutput:
    """Per-RoI outputs; class/attribute arrays in Caffe order."""

    pool5: torch.Tensor  # (R, D) float32
    cls_score: torch.Tensor  # (R, C+1)
    cls_prob: torch.Tensor  # (R, C+1)
    attr_score: torch.Tensor  # (R, A+1)
    attr_prob: torch.Tensor  # (R, A+1)
    attr_embed_index_caffe: torch.Tensor  # (R,)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> RoIHeadOutput:
        """Every output passed through `function` (rows sliced, scattered, ...), so no field is forgotten."""
        return RoIHeadOutput(**{item.name: function(getattr(self, item.name)) for item in fields(self)})


class RoIHeads(nn.Module):
    """RoI max pooling on res4, res5 with stride 1 and dilation 2, mean pool, heads."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.pooled_size = config.pooled_size
        self.spatial_scale = 1.0 / config.feature_stride
        self.res5 = make_stage(
            config.res5_blocks,
            config.stage_out_channels[2],
            config.res5_bottleneck_channels,
            config.res5_out_channels,
            first_stride=1,
            dilation=config.res5_dilation,
            eps=config.bn_eps,
        )
        self.box_predictor = BoxPredictor(config.res5_out_channels, config)

    def pool(self, res4: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """(K, C, P, P) RoI max pooling; rois (K, 5) = (batch index, x1, y1, x2, y2) in blob pixels."""
        with torch.autocast(device_type=res4.device.type, enabled=False):
            pooled = roi_pool(
                res4.float(), rois.float(), (self.pooled_size, self.pooled_size), self.spatial_scale
            )
        return pooled.to(res4.dtype)

    def res5_low_precision(
        self, pooled: torch.Tensor, dtype: torch.dtype, channels_last: bool = False
    ) -> torch.Tensor:
        """(K, D) float32 spatial means of res5 run in `dtype` with folded BN on (K, C, P, P) pooled RoIs.

        Autocast is switched off so `dtype` alone decides (and folded weights are not re-cast per call).
        """
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            x = pooled.to(dtype=dtype, memory_format=memory_format)
            for block in self.res5:
                x = block(x, folded=True)
            # Accumulate in float32 without materialising a float32 copy of the (K, D, P, P) map.
            return x.mean(dim=(2, 3), dtype=torch.float32)

    def pool5_features(
        self,
        res4: torch.Tensor,
        rois: torch.Tensor,
        chunk_size: int = 100,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """(K, D) float32 region features: res5 over pooled RoIs, then the spatial mean (chunked).

        `dtype` None: float32 res5 exactly as Caffe (`channels_last` is then ignored, so the exact path never
        changes); a floating dtype: res5 in that dtype with folded BN (see `res5_low_precision`).
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"res5 dtype must be a floating-point dtype, got {dtype}")
        if rois.shape[0] == 0:
            return res4.new_zeros((0, self.box_predictor.cls_score.in_features), dtype=torch.float32)
        features = []
        for start in range(0, rois.shape[0], max(1, chunk_size)):
            x = self.pool(res4, rois[start : start + chunk_size])
            if dtype is not None:
                features.append(self.res5_low_precision(x, dtype, channels_last))
                continue
            for block in self.res5:
                x = block(x)
            features.append(x.float().mean(dim=(2, 3)))
        return torch.cat(features)

    def forward(
        self,
        res4: torch.Tensor,
        rois: torch.Tensor,
        chunk_size: int = 100,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> RoIHeadOutput:
        """pool5 features (res5 in `dtype` when given) and the float32 class/attribute heads."""
        pool5 = self.pool5_features(res4, rois, chunk_size, dtype=dtype, channels_last=channels_last)
        heads = self.box_predictor(pool5)
        return RoIHeadOutput(pool5=pool5, **heads)


def roi_feature_coords(boxes: torch.Tensor, spatial_scale: float = 1.0 / 16) -> torch.Tensor:
    """(gx1, gy1, gx2, gy2) grid cells of boxes, rounded half away from zero (Caffe; not torch.round)."""
    scaled = boxes.to(torch.float32) * spatial_scale
    return (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.long)
