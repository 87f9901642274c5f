"""Ensembles: similarity matrices of separately trained models, averaged (SCAN's published ensembles)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.models.scan import SCAN
from pipeline.models.xattn import BlockSize


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


@torch.no_grad()
def encode_and_score(
    model: SCAN,
    region_features: Tensor,
    token_ids: Tensor,
    caption_lengths: Tensor,
    region_lengths: Tensor | None = None,
    *,
    batch_size: int = 128,
    block_size: BlockSize | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Encode all images and captions with `model` (in eval mode, by batches) and score them blockwise."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        image_parts, caption_parts = [], []
        for start in range(0, region_features.shape[0], batch_size):
            lengths = (
                None if region_lengths is None else region_lengths[start : start + batch_size].to(device)
            )
            image_parts.append(
                model.encode_images(region_features[start : start + batch_size].to(device), lengths)
            )
        for start in range(0, token_ids.shape[0], batch_size):
            caption_parts.append(
                model.encode_captions(
                    token_ids[start : start + batch_size].to(device),
                    caption_lengths[start : start + batch_size],
                )
            )
        img_emb, cap_emb = torch.cat(image_parts), torch.cat(caption_parts)
        return model.similarity(
            img_emb,
            cap_emb,
            caption_lengths.to(device),
            None if region_lengths is None else region_lengths.to(device),
            block_size=block_size,
            progress=progress,
        )
    finally:
        model.train(was_training)


def ensemble_scores(
    models: Sequence[SCAN],
    region_features: Tensor,
    token_ids: Tensor,
    caption_lengths: Tensor,
    region_lengths: Tensor | None = None,
    *,
    batch_size: int = 128,
    block_size: BlockSize | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Score the same images and captions with every model, then average the matrices."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}")
    return average_scores(
        [
            encode_and_score(
                model,
                region_features,
                token_ids,
                caption_lengths,
                region_lengths,
                batch_size=batch_size,
                block_size=block_size,
                device=device,
                progress=progress,
            )
            for model in models
        ]
    )
