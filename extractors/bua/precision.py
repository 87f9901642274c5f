"""Precision modes of the detector, and the float32 matmul/conv settings they need, via torch's new API only.

Why this module exists: on torch >= 2.9 the legacy `allow_tf32` flags raise RuntimeError once anything in the
process has used the new `fp32_precision` API, so the detector must never touch them. And the fast modes
(bf16/fp16) keep the backbone and RPN in float32 (the proposals then equal exact's) and run only res5 in the
low dtype, so a mode maps to two independent settings:

* `backbone_fp32_mode(p)`: "ieee" or "tf32" for float32 matmuls/convolutions of backbone, RPN and heads,
  applied with `fp32_matmul_precision`;
* `res5_dtype(p)`: None (res5 in float32 as in Caffe) or the low dtype res5 runs in (BN folded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

Precision = Literal["exact", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Fp32Mode = Literal["ieee", "tf32"]

_RES5_DTYPES: dict[str, torch.dtype | None] = {
    "exact": None,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_precision(precision: str) -> Precision:
    """`precision` itself if it names a mode; a ValueError listing the choices otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def backbone_fp32_mode(precision: str) -> Fp32Mode:
    """float32 arithmetic of backbone and RPN: TF32 only when asked ("tf32"); the fast modes keep IEEE float32
    there so that their proposals equal exact's."""
    return "tf32" if check_precision(precision) == "tf32" else "ieee"


def res5_dtype(precision: str) -> torch.dtype | None:
    """The dtype res5 runs in: None (float32, unchanged) for exact/tf32, bfloat16/float16 for bf16/fp16."""
    return _RES5_DTYPES[check_precision(precision)]


def default_channels_last(device: torch.device | str) -> bool:
    """Whether res5's low-precision path should use channels_last: on CUDA (tensor-core convolutions want
    NHWC) and on the CPU, where oneDNN measured faster NHWC (full res5, 32 RoIs, 2 cores: bf16 0.52 s vs
    0.57 s, fp16 ~5 s vs ~70 s); elsewhere (MPS) untested, so off."""
    return torch.device(device).type in ("cuda", "cpu")


@contextmanager
def fp32_matmul_precision(mode: Fp32Mode) -> Iterator[None]:
    """float32 CUDA matmuls (cuBLAS) and cuDNN convolutions in IEEE float32 ("ieee") or TF32 ("tf32").

    Sets `torch.backends.cuda.matmul.fp32_precision` and `torch.backends.cudnn.conv.fp32_precision` (whose
    default is "tf32"!) and restores their previous values on exit, also on an exception. Never reads or
    writes the legacy `allow_tf32` flags, which raise once the new API has been used. Harmless on a CPU-only
    machine (the settings are process-wide values that only CUDA kernels consult).
    """
    if mode not in get_args(Fp32Mode):
        raise ValueError(f"unknown fp32 precision {mode!r}; expected one of {', '.join(get_args(Fp32Mode))}")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved_matmul, saved_conv = str(matmul.fp32_precision), str(conv.fp32_precision)
    try:
        matmul.fp32_precision = mode
        conv.fp32_precision = mode
        yield
    finally:
        matmul.fp32_precision = saved_matmul
        conv.fp32_precision = saved_conv
