"""Caffe ResNet C4 with frozen batch norm: stem, res2-res4 (the backbone) and the bottlenecks res5 reuses.

Module and parameter names follow the detectron2/HF state-dict layout
(`backbone.res4.7.conv2.norm.running_var`) so a checkpoint loads by name. Padded batches: `valid_sizes` gives
each image's (h, w) at the input; the padded area is zeroed wherever a spatial kernel would otherwise read it,
so each image's outputs equal a one-image run.

`folded=True` runs a block with each frozen BN folded into its convolution (one conv with bias, in the input's
dtype): res5's low-precision path, where per-call BN kernels and re-casting frozen weights would cost time.
The default (unfolded) path is the Caffe-exact float32 arithmetic.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

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


# (data_ptr, _version, shape, dtype, device) of one source tensor of a folded conv: any change to the tensor
# (load_state_dict, .to(), in-place edits, a replaced .data) changes its stamp.
_Stamp = tuple[int, int, torch.Size, torch.dtype, torch.device]


def _stamp(tensor: torch.Tensor) -> _Stamp | None:
    """The tensor's identity-and-contents stamp; None for inference tensors, which have no version counter."""
    if tensor.is_inference():
        return None
    return (tensor.data_ptr(), tensor._version, tensor.shape, tensor.dtype, tensor.device)


@dataclass(frozen=True)
class _FoldedEntry:
    """A cached folded (weight, bias) and the exact source tensors and stamps it was computed from."""

    sources: tuple[weakref.ref[torch.Tensor], ...]
    stamps: tuple[_Stamp | None, ...]
    eps: float
    weight: torch.Tensor
    bias: torch.Tensor

    def matches(
        self, sources: tuple[torch.Tensor, ...], stamps: tuple[_Stamp | None, ...], eps: float
    ) -> bool:
        same_objects = all(ref() is tensor for ref, tensor in zip(self.sources, sources, strict=True))
        return same_objects and self.stamps == stamps and self.eps == eps


class ConvNorm(nn.Module):
    """Bias-free convolution followed by frozen BN (detectron2's `Conv2d(norm=FrozenBN)`)."""

    _folded_cache: dict[tuple[torch.dtype, torch.device], _FoldedEntry]

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
        # Plain attribute, not a buffer: never in the state dict; emptied by .to()/.half() and when pickled.
        self._folded_cache = {}

    def _fold_sources(self) -> tuple[torch.Tensor, ...]:
        norm = self.norm
        return (self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)

    def _fold(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """conv weight * BN scale and BN shift, computed in float64 (float32 on MPS), then cast once."""
        norm = self.norm
        wide = torch.float32 if self.weight.device.type == "mps" else torch.float64
        # Normal (not inference) tensors, so the cache also serves calls made outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            scale = norm.weight.to(wide) * (norm.running_var.to(wide) + norm.eps).rsqrt()
            shift = norm.bias.to(wide) - norm.running_mean.to(wide) * scale
            weight = self.weight.to(wide) * scale.reshape(-1, 1, 1, 1)
            return (
                weight.to(device=device, dtype=dtype).contiguous(),
                shift.to(device=device, dtype=dtype).contiguous(),
            )

    def folded(self, dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the conv with the frozen BN folded in, in `dtype` on `device`.

        Cached per (dtype, device) so frozen weights are not re-cast on every call; an entry is recomputed
        when the conv weight or any BN buffer was replaced or changed (load_state_dict, .to(), in-place
        edits). Inference tensors (no version counter) are folded afresh on every call.
        """
        device = torch.device(device)
        sources = self._fold_sources()
        stamps = tuple(_stamp(tensor) for tensor in sources)
        key = (dtype, device)
        entry = self._folded_cache.get(key)
        eps = float(self.norm.eps)
        if entry is not None and entry.matches(sources, stamps, eps):
            return entry.weight, entry.bias
        weight, bias = self._fold(dtype, device)
        if all(stamp is not None for stamp in stamps):
            refs = tuple(weakref.ref(tensor) for tensor in sources)
            self._folded_cache[key] = _FoldedEntry(refs, stamps, eps, weight, bias)
        else:
            self._folded_cache.pop(key, None)
        return weight, bias

    def _apply(self, fn: Any, recurse: bool = True) -> ConvNorm:
        self._folded_cache = {}  # .to()/.cuda()/.half(): drop copies on the old device at once
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_folded_cache"] = {}  # weak references cannot be pickled; a copy refolds on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_folded_cache" not in self.__dict__:
            self._folded_cache = {}

    def forward(self, x: torch.Tensor, folded: bool = False) -> torch.Tensor:
        """Conv then frozen BN; `folded`: one conv with the cached folded weight and bias in x's dtype."""
        if folded:
            weight, bias = self.folded(x.dtype, x.device)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
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

    def forward(
        self, x: torch.Tensor, valid_sizes: Sizes | None = None, folded: bool = False
    ) -> torch.Tensor:
        """`valid_sizes` are the per-image valid sizes of the *output* (None: no padding in the batch);
        `folded`: every conv with its BN folded in (res5's low-precision path, see `ConvNorm.folded`)."""
        branch = F.relu_(self.conv1(x, folded))
        branch = zero_padding(branch, valid_sizes)  # conv2's 3x3 kernel must see zeros past the image
        branch = F.relu_(self.conv2(branch, folded))
        branch = self.conv3(branch, folded)
        identity = x if self.shortcut is None else self.shortcut(x, folded)
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
