"""Caffe ResNet C4 with frozen batch norm: stem, res2-res4 (the backbone) and the bottlenecks res5 reuses.

Module and parameter names follow the detectron2/HF state-dict layout
(`backbone.res4.7.conv2.norm.running_var`) so a checkpoint loads by name. Padded batches: `valid_sizes` gives
each image's (h, w) at the input; the padded area is zeroed wherever a spatial kernel would otherwise read it,
so each image's outputs equal a one-image run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from extractors.bua.config import DetectorConfig

Sizes = list[tuple[int, int]]


def zero_padding(x: torch.Tensor, valid_sizes: Sizes | None) -> torch.Tensor:
    """Zero everything outside each image's valid (h, w) top-left region (in place; inference only)."""
    if valid_sizes is None:
        return x
    height, width = x.shape[-2:]
    for index, (valid_h, valid_w) in enumerate(valid_sizes):
        if valid_h < height:
            x[index, :, valid_h:, :] = 0
        if valid_w < width:
            x[index, :, :, valid_w:] = 0
    return x


def _halve(sizes: Sizes | None) -> Sizes | None:
    """Valid size after a stride-2 1x1 conv or a 7x7/2 pad-3 conv: ceil(n / 2)."""
    return None if sizes is None else [(-(-h // 2), -(-w // 2)) for h, w in sizes]


def _after_ceil_pool(sizes: Sizes | None) -> Sizes | None:
    """Valid size after the 3x3/2, pad 0, ceil-mode max-pool: ceil((n - 3) / 2) + 1."""
    return None if sizes is None else [(-(-(h - 3) // 2) + 1, -(-(w - 3) // 2) + 1) for h, w in sizes]


class FrozenBatchNorm2d(nn.Module):
    """Inference-mode BN with fixed statistics: (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_channels))
        self.register_buffer("bias", torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)


class ConvNorm(nn.Module):
    """Bias-free convolution followed by frozen BN (detectron2's `Conv2d(norm=FrozenBN)`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, kernel_size, kernel_size), requires_grad=False
        )
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.norm = FrozenBatchNorm2d(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation)
        return self.norm(y)


class Bottleneck(nn.Module):
    """Caffe bottleneck: stride in the 1x1 conv1, 3x3 conv2 (maybe dilated), 1x1 conv3, shortcut."""

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.stride = stride
        if in_channels != out_channels or stride != 1:
            self.shortcut: ConvNorm | None = ConvNorm(in_channels, out_channels, 1, stride=stride, eps=eps)
        else:
            self.shortcut = None
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride, eps=eps)
        self.conv2 = ConvNorm(
            bottleneck_channels, bottleneck_channels, 3, padding=dilation, dilation=dilation, eps=eps
        )
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, eps=eps)
        # A near-identity init keeps random-weight (tiny) detectors numerically tame over many blocks.
        nn.init.normal_(self.conv3.norm.weight, 0.2, 0.02)

    def forward(self, x: torch.Tensor, valid_sizes: Sizes | None = None) -> torch.Tensor:
        """`valid_sizes` are the per-image valid sizes of the *output* (None: no padding in the batch)."""
        branch = F.relu_(self.conv1(x))
        branch = zero_padding(branch, valid_sizes)  # conv2's 3x3 kernel must see zeros past the image
        branch = F.relu_(self.conv2(branch))
        branch = self.conv3(branch)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(branch + identity)


def make_stage(
    num_blocks: int,
    in_channels: int,
    bottleneck_channels: int,
    out_channels: int,
    *,
    first_stride: int,
    dilation: int = 1,
    eps: float = 1e-5,
) -> nn.Sequential:
    """A ResNet stage: block 0 carries the stride and the projection shortcut, the rest identity shortcuts."""
    blocks = [
        Bottleneck(
            in_channels if i == 0 else out_channels,
            bottleneck_channels,
            out_channels,
            stride=first_stride if i == 0 else 1,
            dilation=dilation,
            eps=eps,
        )
        for i in range(num_blocks)
    ]
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """conv1 7x7/2 pad 3 -> BN -> ReLU -> max-pool 3x3/2 pad 0 with ceil mode (Caffe pooling)."""

    def __init__(self, out_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3, eps=eps)

    def forward(self, x: torch.Tensor, valid_sizes: Sizes | None = None) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        # Post-ReLU values are >= 0, so zeros in the padded area never win a max over a window that holds at
        # least one valid value: the ceil-mode pool then equals Caffe's clipped windows.
        x = zero_padding(x, _halve(valid_sizes))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4Backbone(nn.Module):
    """Stem + res2 (stride 1) + res3 (stride 2) + res4 (stride 2): the stride-16 feature map `res4`."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        eps = config.bn_eps
        bottlenecks = config.stage_bottleneck_channels
        outs = config.stage_out_channels
        self.stem = Stem(config.stem_channels, eps)
        self.res2 = make_stage(
            config.stage_blocks[0], config.stem_channels, bottlenecks[0], outs[0], first_stride=1, eps=eps
        )
        self.res3 = make_stage(
            config.stage_blocks[1], outs[0], bottlenecks[1], outs[1], first_stride=2, eps=eps
        )
        self.res4 = make_stage(
            config.stage_blocks[2], outs[1], bottlenecks[2], outs[2], first_stride=2, eps=eps
        )

    @staticmethod
    def _run_stage(stage: nn.Sequential, x: torch.Tensor, out_sizes: Sizes | None) -> torch.Tensor:
        for block in stage:
            x = block(x, out_sizes)
        return x

    def forward(
        self, blob: torch.Tensor, valid_sizes: Sizes | None = None, *, return_stages: bool = False
    ) -> dict[str, torch.Tensor]:
        """`res4_out` of a (B, 3, H', W') blob (every stage with `return_stages`).

        `valid_sizes` are the per-image (H', W') of a zero-padded batch (None: one image or equal sizes).
        """
        outputs: dict[str, torch.Tensor] = {}
        x = self.stem(blob, valid_sizes)
        sizes = _after_ceil_pool(_halve(valid_sizes))
        if return_stages:
            outputs["stem_out"] = x
        x = self._run_stage(self.res2, x, sizes)
        if return_stages:
            outputs["res2_out"] = x
        sizes = _halve(sizes)
        x = self._run_stage(self.res3, x, sizes)
        if return_stages:
            outputs["res3_out"] = x
        sizes = _halve(sizes)
        x = self._run_stage(self.res4, x, sizes)
        outputs["res4_out"] = zero_padding(x, sizes)  # the RPN's 3x3 conv and RoI pooling read past edges
        return outputs

    def conv1_output(self, blob: torch.Tensor) -> torch.Tensor:
        """Stem before the max-pool (conv1 -> BN -> ReLU); only for locating conformance errors."""
        return F.relu(self.stem.conv1(blob))
