"""Precision modes on the CPU: the new fp32_precision API only, BN folding and its cache, res5 in bf16/fp16.

Measured on the tiny seeded detector (CPU, torch 2.11): res5 in bfloat16 strays from exact float32 pool5 by a
max |diff| / max |exact| of ~2e-3, float16 by ~2e-4; folded float32 BN by ~2e-7; channels_last changes
nothing beyond low-precision rounding (often bit-identical on the CPU). The tolerances below leave ~5x margin.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from extractors.bua.backbone import ConvNorm
from extractors.bua.config import DetectorConfig
from extractors.bua.detector import BottomUpAttentionDetector
from extractors.bua.precision import (
    PRECISIONS,
    backbone_fp32_mode,
    default_channels_last,
    fp32_matmul_precision,
    res5_dtype,
)

BF16_MAX_REL = 1e-2  # measured ~1.6e-3
FP16_MAX_REL = 1e-3  # measured ~2e-4
FOLDED_FP32_MAX_REL = 1e-5  # measured ~2e-7


def _new_api() -> tuple[str, str]:
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


@pytest.fixture(autouse=True)
def _restore_new_api() -> Iterator[None]:
    """Tests set process-wide precision values; put them back so no other test inherits them."""
    saved = _new_api()
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.fixture(scope="module")
def tiny() -> BottomUpAttentionDetector:
    torch.manual_seed(0)
    return BottomUpAttentionDetector(DetectorConfig.tiny())


def _res4_and_rois(detector: BottomUpAttentionDetector, count: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """res4 of two seeded random blobs and `count` seeded RoIs over them (blob pixels)."""
    generator = torch.Generator().manual_seed(1)
    blob = torch.rand(2, 3, 128, 160, generator=generator) * 255 - 120
    with torch.inference_mode():
        res4 = detector.backbone(blob)["res4_out"]
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([120.0, 90.0])
    size = torch.rand(count, 2, generator=generator) * 60 + 8
    index = torch.randint(0, 2, (count, 1), generator=generator).float()
    return res4, torch.cat((index, corner, corner + size), dim=1)


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _randomise_bn(conv: ConvNorm, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    channels = conv.norm.weight.shape[0]
    with torch.no_grad():
        conv.norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        conv.norm.bias.copy_(torch.randn(channels, generator=generator))
        conv.norm.running_mean.copy_(torch.randn(channels, generator=generator))
        conv.norm.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.1)


# ---- mode names
def test_mode_mapping_and_names() -> None:
    assert PRECISIONS == ("exact", "tf32", "bf16", "fp16")
    assert [backbone_fp32_mode(p) for p in PRECISIONS] == ["ieee", "tf32", "ieee", "ieee"]
    assert [res5_dtype(p) for p in PRECISIONS] == [None, None, torch.bfloat16, torch.float16]
    for bad in ("fp8", "TF32", ""):
        with pytest.raises(ValueError, match="expected one of exact, tf32, bf16, fp16"):
            res5_dtype(bad)
        with pytest.raises(ValueError, match="unknown precision"):
            backbone_fp32_mode(bad)
    assert default_channels_last("cuda") and default_channels_last(torch.device("cpu"))
    assert not default_channels_last("meta")


# ---- torch's new fp32_precision API
def test_fp32_matmul_precision_sets_and_restores() -> None:
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's own default for cuDNN convolutions
    with fp32_matmul_precision("ieee"):
        assert _new_api() == ("ieee", "ieee")
        with fp32_matmul_precision("tf32"):
            assert _new_api() == ("tf32", "tf32")
        assert _new_api() == ("ieee", "ieee")
    assert _new_api() == ("none", "tf32")
    with pytest.raises(KeyError, match="boom"), fp32_matmul_precision("ieee"):
        assert _new_api() == ("ieee", "ieee")
        raise KeyError("boom")
    assert _new_api() == ("none", "tf32")
    with pytest.raises(ValueError, match="unknown fp32 precision"), fp32_matmul_precision("high"):  # type: ignore[arg-type]
        pass
    assert _new_api() == ("none", "tf32")


def test_fp32_matmul_precision_never_touches_legacy_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    # Something else in the process used the new API first: torch now refuses the legacy read.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="legacy and new APIs"):
        _ = torch.backends.cuda.matmul.allow_tf32
    with fp32_matmul_precision("ieee"):
        assert _new_api() == ("ieee", "ieee")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"

    # And the legacy flags are never read nor written, whatever state they are in.
    def refuse(*_: object) -> None:
        raise AssertionError("legacy allow_tf32 flag used")

    monkeypatch.setattr(torch._C, "_get_cublas_allow_tf32", refuse)
    monkeypatch.setattr(torch._C, "_set_cublas_allow_tf32", refuse)
    monkeypatch.setattr(type(torch.backends.cudnn), "allow_tf32", property(refuse, refuse))
    with pytest.raises(AssertionError, match="legacy"):
        _ = torch.backends.cudnn.allow_tf32  # the trap is armed
    for mode in ("ieee", "tf32"):
        with fp32_matmul_precision(mode):  # type: ignore[arg-type]
            assert _new_api() == (mode, mode)


# ---- BN folding
def test_folded_convnorm_equals_unfolded() -> None:
    torch.manual_seed(0)
    conv = ConvNorm(16, 24, 3, padding=2, dilation=2)
    _randomise_bn(conv, seed=1)
    x = torch.randn(3, 16, 11, 13)
    unfolded = conv(x)
    folded = conv(x, folded=True)
    assert _max_rel(folded, unfolded) < FOLDED_FP32_MAX_REL
    plain = torch.nn.functional.conv2d(x, conv.weight, None, 1, 2, 2)
    assert _max_rel(plain, unfolded) > 0.1  # the BN did something the folded conv had to reproduce
    low = conv(x.bfloat16(), folded=True)
    assert low.dtype == torch.bfloat16 and _max_rel(low.float(), unfolded) < BF16_MAX_REL


def test_folded_cache_is_reused_and_invalidated() -> None:
    torch.manual_seed(0)
    conv = ConvNorm(8, 8, 1)
    _randomise_bn(conv, seed=2)
    cpu = torch.device("cpu")
    with torch.inference_mode():  # the detector folds under inference mode
        weight, bias = conv.folded(torch.bfloat16, cpu)
    assert not weight.is_inference()  # so the cache also serves calls outside inference mode
    again = conv.folded(torch.bfloat16, "cpu")
    assert again[0] is weight and again[1] is bias
    assert conv.folded(torch.float16, cpu)[0] is not weight  # one entry per dtype
    assert conv.folded(torch.bfloat16, cpu)[0] is weight

    other = ConvNorm(8, 8, 1)
    _randomise_bn(other, seed=3)
    conv.load_state_dict(other.state_dict())
    reloaded = conv.folded(torch.bfloat16, cpu)[0]
    assert reloaded is not weight
    assert torch.equal(reloaded, other.folded(torch.bfloat16, cpu)[0])

    with torch.no_grad():
        conv.norm.running_var.mul_(4.0)
    after_var = conv.folded(torch.float32, cpu)
    assert torch.allclose(after_var[0], conv.folded(torch.float32, cpu)[0])
    x = torch.randn(2, 8, 5, 5)
    assert _max_rel(conv(x, folded=True), conv(x)) < FOLDED_FP32_MAX_REL
    with torch.no_grad():
        conv.weight.add_(1.0)  # in place on the conv weight
    assert _max_rel(conv(x, folded=True), conv(x)) < FOLDED_FP32_MAX_REL
    conv.norm.bias = torch.zeros(8)  # a replaced buffer
    assert _max_rel(conv(x, folded=True), conv(x)) < FOLDED_FP32_MAX_REL


def test_folded_cache_stays_out_of_state_dict_copies_and_moves() -> None:
    torch.manual_seed(0)
    conv = ConvNorm(4, 6, 3, padding=1)
    _randomise_bn(conv, seed=4)
    keys = set(conv.state_dict())
    weight = conv.folded(torch.bfloat16, "cpu")[0]
    assert set(conv.state_dict()) == keys and not any("fold" in key for key in keys)
    x = torch.randn(1, 4, 6, 6)
    expected = conv(x, folded=True)
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert torch.equal(clone(x, folded=True), expected)
        assert clone.folded(torch.bfloat16, "cpu")[0] is not weight
    moved = conv.to("cpu", torch.float64)
    assert moved is conv and conv.folded(torch.bfloat16, "cpu")[0] is not weight
    assert conv.folded(torch.float64, "cpu")[0].dtype == torch.float64


# ---- res5 in low precision
def test_pool5_exact_path_is_bit_identical_to_the_blocks(tiny: BottomUpAttentionDetector) -> None:
    res4, rois = _res4_and_rois(tiny)
    heads = tiny.roi_heads
    with torch.inference_mode():
        x = heads.pool(res4, rois)
        for block in heads.res5:
            x = block(x)
        direct = x.float().mean(dim=(2, 3))
        assert torch.equal(heads.pool5_features(res4, rois), direct)
        assert torch.equal(heads.pool5_features(res4, rois, chunk_size=7), direct)
        # channels_last is a low-precision option only: the exact path keeps its layout and arithmetic.
        assert torch.equal(heads.pool5_features(res4, rois, dtype=None, channels_last=True), direct)
        assert torch.equal(heads(res4, rois).pool5, direct)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.bfloat16, BF16_MAX_REL), (torch.float16, FP16_MAX_REL)]
)
def test_pool5_low_precision_is_close_to_exact(
    tiny: BottomUpAttentionDetector, dtype: torch.dtype, tolerance: float
) -> None:
    res4, rois = _res4_and_rois(tiny)
    heads = tiny.roi_heads
    with torch.inference_mode():
        exact = heads(res4, rois)
        fast = heads(res4, rois, chunk_size=16, dtype=dtype)
        # The dtype decides, not an autocast region around the call.
        with torch.autocast("cpu", dtype=torch.bfloat16 if dtype == torch.float16 else torch.float16):
            under_autocast = heads.pool5_features(res4, rois, chunk_size=16, dtype=dtype)
    assert fast.pool5.dtype == torch.float32 and fast.cls_prob.dtype == torch.float32
    error = _max_rel(fast.pool5, exact.pool5)
    assert 0 < error < tolerance  # not bit-identical: res5 really ran in the low dtype
    assert torch.equal(under_autocast, fast.pool5)
    np.testing.assert_allclose(fast.cls_prob.numpy(), exact.cls_prob.numpy(), atol=tolerance)
    with pytest.raises(ValueError, match="floating-point"):
        heads.pool5_features(res4, rois, dtype=torch.int32)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.bfloat16, BF16_MAX_REL), (torch.float16, FP16_MAX_REL)]
)
def test_channels_last_matches_contiguous(
    tiny: BottomUpAttentionDetector, dtype: torch.dtype, tolerance: float
) -> None:
    res4, rois = _res4_and_rois(tiny)
    heads = tiny.roi_heads
    seen: list[tuple[bool, torch.dtype, object]] = []  # what res5's first block receives

    def record(_: torch.nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, object]) -> None:
        seen.append(
            (args[0].is_contiguous(memory_format=torch.channels_last), args[0].dtype, kwargs.get("folded"))
        )

    hook = heads.res5[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            contiguous = heads.pool5_features(res4, rois, dtype=dtype)
            channels_last = heads.pool5_features(res4, rois, dtype=dtype, channels_last=True)
            exact = heads.pool5_features(res4, rois)
    finally:
        hook.remove()
    assert seen == [(False, dtype, True), (True, dtype, True), (False, torch.float32, None)]
    assert _max_rel(channels_last, contiguous) < tolerance
    assert _max_rel(channels_last, exact) < tolerance
