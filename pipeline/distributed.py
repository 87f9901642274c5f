"""Multi-process training through `torchrun` (DistributedDataParallel), one process per device.

Batch semantics (why the training math does not depend on the number of processes):
the configured `batch_size` is the GLOBAL batch. Each of the `world_size` ranks encodes a disjoint slice of
`batch_size // world_size` pairs, the encoded region and word embeddings of all ranks are gathered
(`gather_with_grad`), and every rank computes the same global B x B score matrix and hardest-negative loss.
The gather's backward sums the gradient over ranks (a reduce-scatter), and DDP then averages parameter
gradients over ranks, so each parameter receives exactly the single-process gradient of the global batch.
A 2-process run therefore follows the same optimisation as a single process with the same global batch
(up to float summation order). The global batch must be divisible by the world size.

Launch: `torchrun --nproc_per_node N -m stages.cli train ...`. Rank 0 writes checkpoints, metrics and
progress; the others wait at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    gather_group: object | None = None  # process group reserved for the embedding gather
    owns_process_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and shows progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the torchrun environment variables are present (with a world size above one)."""
    return all(name in os.environ for name in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


class DeviceError(UserError):
    """A device string that torch does not understand, or CUDA asked for where there is none."""


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when available, else CPU; anything else is parsed by torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"device {device!r} is not a valid torch device: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def init_distributed(device: str | torch.device = "auto", timeout_minutes: int = 60) -> DistributedContext:
    """Join the torchrun process group if launched by torchrun, else return a single-process context.

    On CUDA every rank uses `cuda:LOCAL_RANK` and NCCL; on CPU the gloo backend.
    """
    base_device = resolve_device(device)
    if not launched_by_torchrun():
        return DistributedContext(device=base_device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if base_device.type == "cuda":
        local_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(local_device)
        backend = "nccl"
    else:
        local_device = torch.device("cpu")
        backend = "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        owns = True
    gather_group = dist.new_group(backend=backend)
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=local_device,
        backend=backend,
        gather_group=gather_group,
        owns_process_group=owns,
    )


def shutdown(context: DistributedContext) -> None:
    """Leave the process group if this context created it."""
    if context.enabled and context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if context.enabled:
        dist.barrier()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """DistributedDataParallel around `model` when several ranks run, else the model itself."""
    if not context.enabled:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_max(value: int, context: DistributedContext) -> int:
    """The maximum of an integer over all ranks."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=context.gather_group)
    return int(tensor.item())


def all_reduce_mean(value: float, context: DistributedContext) -> float:
    """The mean of a float over all ranks (for logging)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=context.gather_group)
    return float(tensor.item()) / context.world_size


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the incoming gradients over ranks (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: object, world_size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.size = group, rank, tensor.shape[0]
        pieces = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.size
        return grad[start : start + ctx.size], None, None, None


def pad_dim(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `tensor` along `dim` up to `size` (padding is masked downstream by the lengths)."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [0, missing]
    return F.pad(tensor, pad)


def gather_with_grad(
    tensor: torch.Tensor, context: DistributedContext, pad_dims: tuple[int, ...] = ()
) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, keeping gradients flowing back to the local slice.

    Dims listed in `pad_dims` may differ between ranks (caption length, region count); they are zero-padded
    to the largest size first. All ranks must hold the same number of rows.
    """
    if not context.enabled:
        return tensor
    for dim in pad_dims:
        tensor = pad_dim(tensor, dim, all_reduce_max(tensor.shape[dim], context))
    if tensor.requires_grad:
        return _GatherWithGrad.apply(tensor, context.gather_group, context.world_size, context.rank)
    pieces = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(pieces, tensor.contiguous(), group=context.gather_group)
    return torch.cat(pieces, dim=0)
