"""Tell a sticky device fault from an error of one input.

After an illegal memory access, a device-side assert or an ECC error, a CUDA context is unusable: every later
kernel fails. Retrying image by image would then record every remaining image as failed; a long run must
instead stop at once, keep what it finished and say why, so that a rerun on a healthy device resumes it.
Out-of-memory is not such a fault (it passes, e.g. for a smaller batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.errors import UserError

# Messages of errors after which the CUDA context cannot run anything (CUDA runtime, cuBLAS, cuDNN).
STICKY_MARKERS: tuple[str, ...] = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
    "hardware stack error",
    "cuda error: launch failure",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudaerrorlaunchfailure",
)


class DeviceFaultError(UserError):
    """The device failed in a way no later work on it can survive; the run stopped, finished work kept."""


def _probe(device: torch.device) -> None:
    """Raise if the device can no longer run a kernel and copy its result back."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        (torch.ones(1, device=device) + 1).cpu()


def device_fault(
    exc: BaseException, device: torch.device, probe: Callable[[torch.device], None] = _probe
) -> str | None:
    """Why `exc` means the device is unusable (sticky), else None (an error of the inputs, or out of memory).

    A message naming a sticky CUDA error is a fault; on an accelerator, so is any error after which a
    one-element kernel on the device fails too.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return None
    message = " ".join(str(exc).split())
    if any(marker in message.lower() for marker in STICKY_MARKERS):
        return f"{type(exc).__name__}: {message}"
    if device.type == "cpu":
        return None
    try:
        probe(device)
    except Exception as probe_exc:  # the device itself is broken, whatever the first error said
        detail = " ".join(str(probe_exc).split())
        return f"{type(exc).__name__}: {message} (then a test kernel failed: {detail})"
    return None
