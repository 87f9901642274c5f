"""Typed configuration of the bottom-up-attention detector.

Every architectural size and every test-time constant of the Caffe reference lives here, so the full
model (`DetectorConfig()`) and a tiny one for fast tests (`DetectorConfig.tiny()`) run the same code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Caffe's BGR pixel means (py-faster-rcnn `cfg.PIXEL_MEANS`).
CAFFE_PIXEL_MEANS_BGR: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)


class DetectorConfig(BaseModel):
    """Architecture and test-time settings of the ResNet C4 Faster R-CNN with the attribute head."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Backbone (ResNet C4, frozen BN, stride in the 1x1 conv1 of each block).
    stem_channels: int = Field(64, ge=1)
    stage_blocks: tuple[int, int, int] = (3, 4, 23)  # res2, res3, res4
    stage_bottleneck_channels: tuple[int, int, int] = (64, 128, 256)
    stage_out_channels: tuple[int, int, int] = (256, 512, 1024)
    res5_blocks: int = Field(3, ge=1)
    res5_bottleneck_channels: int = Field(512, ge=1)
    res5_out_channels: int = Field(2048, ge=1)  # = region feature dimension
    res5_dilation: int = Field(2, ge=1)
    bn_eps: float = Field(1e-5, gt=0)
    pixel_means_bgr: tuple[float, float, float] = CAFFE_PIXEL_MEANS_BGR

    # RPN and anchors (Caffe `generate_anchors`: ratio-major, "+1" boxes centred at (base-1)/2).
    rpn_channels: int = Field(512, ge=1)
    feature_stride: int = Field(16, ge=1)
    anchor_base_size: int = Field(16, ge=1)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)

    # Heads.
    num_classes: int = Field(1600, ge=1)  # object classes without background
    num_attributes: int = Field(400, ge=1)  # attributes without "no attribute"
    attr_embed_dim: int = Field(256, ge=1)
    attr_hidden_dim: int = Field(512, ge=1)
    pooled_size: int = Field(14, ge=1)

    # Test-time constants of the Caffe reference.
    test_scale: int = Field(600, ge=8)
    max_size: int = Field(1000, ge=8)
    pre_nms_top_n: int = Field(6000, ge=1)
    post_nms_top_n: int = Field(300, ge=1)
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    rpn_min_size: float = Field(16.0, ge=0)

    # Region selection (generate_tsv).
    box_mode: Literal["fixed", "adaptive"] = "fixed"
    min_boxes: int = Field(36, ge=1)
    max_boxes: int = Field(36, ge=1)
    conf_thresh: float = Field(0.2, ge=0, le=1)
    nms_thresh: float = Field(0.3, gt=0, le=1)

    @model_validator(mode="after")
    def _check_consistency(self) -> DetectorConfig:
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes ({self.min_boxes}) must not exceed max_boxes ({self.max_boxes})")
        if self.test_scale > self.max_size:
            raise ValueError(f"test_scale ({self.test_scale}) must not exceed max_size ({self.max_size})")
        if any(b < 1 for b in self.stage_blocks):
            raise ValueError(f"stage_blocks must all be >= 1, got {self.stage_blocks}")
        if not self.anchor_ratios or not self.anchor_scales:
            raise ValueError("anchor_ratios and anchor_scales must not be empty")
        return self

    @property
    def num_anchors(self) -> int:
        """Anchors per feature cell."""
        return len(self.anchor_ratios) * len(self.anchor_scales)

    @property
    def feature_dim(self) -> int:
        """Dimension of one region feature (pool5)."""
        return self.res5_out_channels

    def with_box_mode(self, box_mode: Literal["fixed", "adaptive", "36"]) -> DetectorConfig:
        """The same detector with generate_tsv's fixed 36 boxes or the adaptive 10-100 rule (conf 0.2)."""
        if box_mode in ("fixed", "36"):
            return self.model_copy(update={"box_mode": "fixed", "min_boxes": 36, "max_boxes": 36})
        if box_mode == "adaptive":
            return self.model_copy(update={"box_mode": "adaptive", "min_boxes": 10, "max_boxes": 100})
        raise ValueError(f"unknown box mode {box_mode!r}; expected 'fixed' (36 boxes) or 'adaptive' (10-100)")

    @classmethod
    def adaptive(cls, **overrides: object) -> DetectorConfig:
        """Full-size detector with the adaptive 10-100 boxes rule."""
        return cls(**{"box_mode": "adaptive", "min_boxes": 10, "max_boxes": 100, **overrides})

    @classmethod
    def tiny(cls, **overrides: object) -> DetectorConfig:
        """Same code, small widths/depths/class counts: a random-init detector that runs in milliseconds."""
        values: dict[str, object] = {
            "stem_channels": 8,
            "stage_blocks": (1, 1, 2),
            "stage_bottleneck_channels": (4, 8, 16),
            "stage_out_channels": (16, 32, 64),
            "res5_blocks": 1,
            "res5_bottleneck_channels": 16,
            "res5_out_channels": 64,
            "rpn_channels": 32,
            "num_classes": 20,
            "num_attributes": 10,
            "attr_embed_dim": 8,
            "attr_hidden_dim": 16,
            "pooled_size": 7,
            "test_scale": 128,
            "max_size": 224,
            "pre_nms_top_n": 600,
            "post_nms_top_n": 60,
            "rpn_min_size": 4.0,
        }
        values.update(overrides)
        return cls(**values)
