"""Ensembles: similarity matrices of separately trained models, averaged (SCAN's published ensembles).

Scoring each member is `pipeline.evaluation` (`ensemble_scores`, `evaluate_run`); this is the averaging.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def average_scores(score_matrices: Sequence[Tensor | np.ndarray]) -> Tensor:
    """Element-wise mean of two or more `(n_images, n_captions)` score matrices of one shape."""
    if len(score_matrices) < 2:
        raise ValueError(f"an ensemble needs at least 2 score matrices, got {len(score_matrices)}")
    tensors = [torch.as_tensor(matrix) for matrix in score_matrices]
    reference = tensors[0]
    for index, tensor in enumerate(tensors):
        if tensor.dim() != 2:
            raise ValueError(
                f"score matrix {index} must be 2-D (images, captions), got shape {tuple(tensor.shape)}"
            )
        if tensor.shape != reference.shape:
            raise ValueError(
                f"score matrix {index} has shape {tuple(tensor.shape)}, "
                f"score matrix 0 has {tuple(reference.shape)}"
            )
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    total = torch.zeros(reference.shape, dtype=dtype, device=reference.device)
    for tensor in tensors:
        total += tensor.to(device=reference.device, dtype=dtype)
    return total / len(tensors)
