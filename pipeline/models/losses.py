"""The VSE++ / SCAN hinge triplet loss on an in-batch score matrix (README §4 of the SCAN fixtures)."""

from __future__ import annotations

import torch
from torch import Tensor


def hardest_negative_triplet_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = True) -> Tensor:
    """Bidirectional hinge loss, SUMMED over the batch (as the original, not averaged).

    `scores[i, j]` is image i against caption j, positives on the diagonal. `max_violation` keeps only the
    hardest negative per anchor (VSE++); otherwise every negative's violation is summed.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (batch, batch) matrix, got shape {tuple(scores.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    positives = scores.diagonal()
    # image i as anchor, caption j as negative / caption j as anchor, image i as negative
    cost_caption = (margin + scores - positives[:, None]).clamp(min=0)
    cost_image = (margin + scores - positives[None, :]).clamp(min=0)
    diagonal = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = cost_caption.masked_fill(diagonal, 0.0)
    cost_image = cost_image.masked_fill(diagonal, 0.0)
    if max_violation:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()
