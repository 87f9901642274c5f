"""Optimizers beyond `torch.optim`: the Adam update of torch 0.3/0.4, which the official SCAN runs used.

torch >= 1.x moved Adam's epsilon inside the bias correction of the second moment, so the same moments give a
slightly different step (README §8.4 of the official-SCAN fixtures: up to half the learning rate per element
after three steps). `LegacyAdam` reproduces the old update so that official training can be matched exactly.
Its state keys (`step`, `exp_avg`, `exp_avg_sq`) are those of `torch.optim.Adam`, so checkpoints save and
restore it through the same code (`pipeline.checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LegacyAdam(torch.optim.Optimizer):
    """Adam as torch 0.3/0.4 computed it: `p <- p - lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)`.

    `weight_decay` adds `wd * p` to the gradient (L2, as the old Adam did). `step` is kept as a Python int,
    as torch 0.4 kept it: the bias corrections are then computed in double precision, exactly as there.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient (sparse gradients are not supported)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise RuntimeError("LegacyAdam does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                param.addcdiv_(exp_avg, denom, value=-step_size)
        return loss
