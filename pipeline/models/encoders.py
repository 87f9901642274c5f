"""SCAN's two encoders: region features -> region embeddings, token ids -> word embeddings.

Both end in the official L2 normalisation `x / (sqrt(sum x^2) + 1e-8)` (epsilon added to the norm, as the
original, so the conformance fixtures' numbers stay reachable) and output exact zeros at padded positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

L2_EPS = 1e-8


def l2norm(x: Tensor, dim: int = -1, eps: float = L2_EPS) -> Tensor:
    """The official SCAN normalisation: epsilon added to the norm, not a clamp."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def _valid_mask(lengths: Tensor, max_len: int, device: torch.device) -> Tensor:
    """(B, max_len) bool, True on positions below each row's length."""
    return torch.arange(max_len, device=device)[None, :] < lengths.to(device)[:, None]


class ImageEncoder(nn.Module):
    """Linear(img_dim -> embed_size) per region, then L2 normalisation (unless `no_imgnorm`)."""

    def __init__(self, img_dim: int, embed_size: int, *, no_imgnorm: bool = False) -> None:
        super().__init__()
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's Xavier init: uniform(-r, r), r = sqrt(6) / sqrt(in + out), bias 0."""
        bound = math.sqrt(6.0) / math.sqrt(self.fc.in_features + self.fc.out_features)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, region_features: Tensor, region_lengths: Tensor | None = None) -> Tensor:
        """(B, R, img_dim) -> (B, R, embed_size); regions at or beyond `region_lengths` come out as 0."""
        if region_features.dim() != 3 or region_features.shape[2] != self.fc.in_features:
            raise ValueError(
                f"region_features must be (batch, regions, {self.fc.in_features}), "
                f"got shape {tuple(region_features.shape)}"
            )
        embedded = self.fc(region_features)
        if not self.no_imgnorm:
            embedded = l2norm(embedded, dim=-1)
        if region_lengths is not None:
            valid = _valid_mask(region_lengths, region_features.shape[1], embedded.device)
            embedded = embedded.masked_fill(~valid[:, :, None], 0.0)  # even NaN padding becomes 0
        return embedded


class TextEncoder(nn.Module):
    """Word embedding -> GRU (bidirectional directions averaged) -> per-word L2 normalisation."""

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = True,
        no_txtnorm: bool = False,
    ) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.bidirectional = bidirectional
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialises the word embedding uniform(-0.1, 0.1); the GRU keeps torch's default."""
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, token_ids: Tensor, caption_lengths: Tensor) -> Tensor:
        """(B, L) token ids with lengths (B,) -> (B, L, embed_size); positions >= length are exactly 0."""
        if token_ids.dim() != 2:
            raise ValueError(f"token_ids must be (batch, words), got shape {tuple(token_ids.shape)}")
        lengths = torch.as_tensor(caption_lengths)
        if lengths.shape != (token_ids.shape[0],):
            raise ValueError(
                f"caption_lengths must have shape ({token_ids.shape[0]},), got {tuple(lengths.shape)}"
            )
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > token_ids.shape[1]):
            raise ValueError(f"caption_lengths must lie in [1, {token_ids.shape[1]}]")
        words = self.embed(token_ids)
        packed = pack_padded_sequence(words, lengths.cpu().long(), batch_first=True, enforce_sorted=False)
        output, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(output, batch_first=True, total_length=token_ids.shape[1])
        if self.bidirectional:
            padded = (padded[:, :, : self.embed_size] + padded[:, :, self.embed_size :]) / 2
        if not self.no_txtnorm:
            padded = l2norm(padded, dim=-1)  # zero rows stay zero: 0 / (0 + eps)
        return padded
