"""MMCA (Multi-Modality Cross Attention, Wei et al. CVPR 2020), exactly as shared/reference/mmca.md says.

Design note: which part implements which section of mmca.md.

* `MMCAConfig` (§0; defined torch-free in `pipeline/models/config.py`, re-exported here): the six options with
  the paper's defaults; `num_heads` must divide `embed_size`.
* `TransformerUnit` (§2.1): bias-free fused Q/K/V and W_O, one softmax per head scaled by sqrt(d_k), post-LN
  (eps 1e-5), FFN of width d. Split into `attend` and `finish` so that the cross unit can start from Q/K/V
  computed once per item (§5.1). The self unit's attention is torch's fused `scaled_dot_product_attention`
  with a boolean key mask; when intermediates are recorded, the same softmax is spelled out. For the cross
  unit, `own_keys` computes once per item each query's softmax part over its own item's keys (peak, sum,
  weighted values: the §5.1 intra-modality block) and `attend_across` adds a pair's cross-modal keys by the
  log-sum-exp rescaling of online softmax: exact up to rounding.
* `CNNHead` (§2.3, §2.4): windows 1, 2, 3 with right zero padding, so every window has the caption's n
  positions; ReLU, max over those n positions, FC, l2 with the epsilon added to the norm (A1, A13, A25).
  All taps of all windows are one GEMM `(rows, D_in) @ (D_in, 6F)`; the windows are sums of shifted taps,
  built in place; the max over positions comes before the bias and the ReLU (equal, rounding is monotonic).
* `MMCA.encode_images` (§2.2) and `MMCA.encode_captions` (§2.3) compute everything that is per item once:
  i0 or c0, the cross-module inputs R or E_d, the cross unit's Q/K/V of those rows split into heads, and
  the own-key softmax parts (§5.1).
* `MMCA.cross_embeddings` (§2.4) runs the cross unit and the heads on a batch of pairs: per pair only the
  cross-modal logits (regions x words, words x regions) and their merge; then the region rows and the word
  rows of all pairs go through W_O, the FFN and the cross CNN as large GEMMs. Each pair's keys are its own
  valid regions and words (padded keys get a -inf logit, §2.7). No Python loop over pairs.
* `MMCA.similarity` / `score_matrix` (§2.5, §5.1): S = i0.c0 + alpha * i1.c1 over blocks of images x captions,
  items sorted by length so that trimming a block to its longest item leaves little padding, memory bounded
  by the block size, an optional progress callback. `forward` is the in-batch (B, B) matrix for the loss
  of §2.6 (`pipeline.models.losses.hardest_negative_triplet_loss`, full S for all B^2 pairs, A22).
* `MMCA.two_stage_scores` (§5.3): shortlists by S0 with ties to the lower index, full S on the union of the
  shortlisted pairs (each pair once), -inf elsewhere.
* `MMCA.intermediates`: the tensors of the fixtures' `intermediates.npz`, for debugging a mismatch.
* `load_reference_weights` (§3): the only place that knows the 44 reference names; it concatenates
  query/key/value into the fused Q/K/V weight and refuses a missing, unknown or misshapen name by name.

Padding (§2.7): padded rows may hold anything, NaN and inf included. They are overwritten with zeros
(`masked_fill`, out of place: the caller's tensors are never changed) before any product, masked with -inf
before every softmax and max and with 0 before every sum; a block is trimmed to its own longest item, and
a block without padding skips the masks.
float16/bfloat16 keep the softmax, the LayerNorm statistics, the norms and the pooled sums in float32.

Choices of mmca.md we doubt (implemented as specified anyway):
* A1: Eq. 7 writes LayerNorm for c0; the spec uses l2 only. LayerNorm followed by l2 would honour both.
* A2/A3: the cross module stacks R (before self-attention) with a new `word_fc` projection of raw BERT rows;
  the self branch's CNN reads raw 768-d BERT rows while the cross branch never sees them unprojected.
* A15/A27: no dropout anywhere, although the Transformer recipe the paper follows has dropout 0.1.
* A16: [CLS] and [SEP] count as words, so they take part in the max pooling and in the cross attention.
* §0 asks that S not depend on padded or block sizes: true to rounding only (BLAS kernels depend on shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.config import MMCAConfig
from pipeline.models.encoders import l2norm

__all__ = [
    "DEFAULT_CPU_BLOCK",
    "DEFAULT_GPU_BLOCK",
    "MMCA",
    "CNNHead",
    "MMCACaptions",
    "MMCAConfig",
    "MMCAImages",
    "OwnKeys",
    "TransformerUnit",
    "load_reference_weights",
    "reference_weight_shapes",
    "shortlists",
]

BlockSize = int | tuple[int, int]

# Images x captions per block. At the paper's sizes (36 regions, ~20 tokens) one pair holds ~0.15 M floats
# of activations under no_grad. CPU: 64 pairs (~40 MB, float32) keep them in the caches; on a 2-vCPU EPYC,
# 256 pairs were 1.25x and 1024 pairs 1.9x slower per pair (benchmarks/mmca_eval.py). GPU: 8192 pairs
# (~5 GB) amortise the ~60 kernel launches of a block (an estimate: not measured on a GPU yet).
DEFAULT_CPU_BLOCK: tuple[int, int] = (4, 16)
DEFAULT_GPU_BLOCK: tuple[int, int] = (32, 256)
_ENCODE_CHUNK = 256  # items per chunk of the per-item encoders: bounds the (chunk, h, K, K) attention
LAYER_NORM_EPS = 1e-5  # mmca.md §1, A12: torch's default; 1e-6 fails the float64 fixtures
CNN_WINDOWS: tuple[int, ...] = (1, 2, 3)
_HALF = (torch.float16, torch.bfloat16)
_OWN_FIELDS = ("peak", "total", "weighted")

Trace = dict[str, Tensor]


@dataclass(frozen=True)
class OwnKeys:
    """Per query row and head, a softmax over the row's own item's valid keys only, left unnormalised:
    peak logit, sum of exp(logit - peak) and sum of exp(logit - peak) v (float32 in half precision)."""

    peak: Tensor  # (n, h, T), no gradient: a stabiliser that cancels out
    total: Tensor  # (n, h, T)
    weighted: Tensor  # (n, h, T, d_k)

    def take(self, index: Tensor, rows: int) -> OwnKeys:
        """The items `index`, trimmed to their first `rows` query rows."""
        return OwnKeys(*(getattr(self, name)[:, :, :rows].index_select(0, index) for name in _OWN_FIELDS))


def _wide(x: Tensor) -> Tensor:
    """Half precision keeps softmax, LayerNorm statistics, norms and sums in float32 (mmca.md §2.7 rule 5)."""
    return x.float() if x.dtype in _HALF else x


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    if x.dtype not in _HALF:
        return norm(x)
    weight, bias = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


def _padding(lengths: Tensor, size: int) -> Tensor:
    """(B, size) bool, True at the positions at or beyond each item's length."""
    return torch.arange(size, device=lengths.device) >= lengths[:, None]


def _zero_rows(x: Tensor, pad: Tensor) -> Tensor:
    """Padded rows may hold anything, even NaN or inf: overwrite them with zeros (a 0/1 product would turn
    inf into NaN), out of place so that the caller's tensor stays unchanged."""
    return x.masked_fill(pad[..., None], 0.0)


def _padding_if_any(lengths: Tensor, size: int) -> Tensor | None:
    """`_padding`, or None when every item fills all `size` rows (no mask pass needed)."""
    return None if int(lengths.min()) == size else _padding(lengths, size)


def _mean_unit(x: Tensor, pad: Tensor | None, lengths: Tensor) -> Tensor:
    """l2(mean over each item's own valid rows), Eq. 5: (B, T, d) -> (B, d); `pad` None: no padded rows."""
    # Masking, then one sum: padded rows never enter it; the divisor is the item's count, not T (§2.7.3).
    total = (_wide(x) if pad is None else _wide(x).masked_fill(pad[..., None], 0.0)).sum(dim=-2)
    return l2norm(total / lengths[:, None].to(total.dtype)).to(x.dtype)


class TransformerUnit(nn.Module):
    """One post-LN Transformer layer (mmca.md §2.1): bias-free multi-head attention, FFN of width d."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the width {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: W_Q, then W_K, then W_V (A8: no biases)
        self.out = nn.Linear(dim, dim, bias=False)  # W_O
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(dim, dim)  # A11: width d, as Eq. 4 writes
        self.fc2 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def attend(self, qkv: Tensor, key_pad: Tensor, trace: Trace | None = None) -> Tensor:
        """Multi-head attention output after W_O, `(B, T, d)`, from the stacked projections `(B, T, 3d)`.

        `key_pad` `(B, T)` is True on keys that do not exist; every row must have a valid key.
        """
        batch, tokens, width = qkv.shape
        head_dim = width // (3 * self.num_heads)
        # head j owns columns j*d_k ... (j+1)*d_k - 1 of Q, K and V (the nn.MultiheadAttention layout)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4)
        scale = 1.0 / math.sqrt(head_dim)  # A9: sqrt(d_k), not sqrt(d)
        if trace is None:
            # The fused kernel never stores the (B, h, T, T) weights, the largest per-pair tensor; masked keys
            # get weight exactly 0 and half-precision inputs keep the softmax in float32. ~3x faster on a CPU.
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=~key_pad[:, None, None, :], scale=scale)
        else:  # the same function spelled out, to record the weights
            logits = torch.matmul(q, k.transpose(-1, -2)) * scale
            # A padded key gets logit -inf: weight exactly 0, one softmax over the valid keys only (A7, A14).
            logits = logits.masked_fill(key_pad[:, None, None, :], float("-inf"))
            weights = torch.softmax(_wide(logits), dim=-1).to(qkv.dtype)
            trace["attention"] = weights
            heads = torch.matmul(weights, v)
        heads = heads.transpose(1, 2).reshape(batch, tokens, width // 3)
        attended = self.out(heads)
        if trace is not None:
            trace["attention_out"] = attended
        return attended

    def finish(self, x: Tensor, attended: Tensor, trace: Trace | None = None) -> Tensor:
        """Residual + LayerNorm, FFN, residual + LayerNorm (post-LN, A12).

        Without a trace, `attended` is overwritten: at the pair level every pass over the rows counts.
        """
        x1 = _layer_norm(self.norm1, x + attended if trace is not None else attended.add_(x))
        y = _layer_norm(self.norm2, self.fc2(self.fc1(x1).relu_()).add_(x1))
        if trace is not None:
            trace["norm1_out"] = x1
            trace["out"] = y
        return y

    def forward(self, x: Tensor, key_pad: Tensor, trace: Trace | None = None) -> Tensor:
        """`(B, T, d)` -> `(B, T, d)`; rows at padded positions come out as garbage the caller must mask."""
        return self.finish(x, self.attend(self.qkv(x), key_pad, trace), trace)

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v `(B, h, T, d_k)` from `(B, T, 3d)`, in float32 for half-precision models (§2.7 rule 5)."""
        head_dim = qkv.shape[-1] // (3 * self.num_heads)
        q, k, v = _wide(qkv).unflatten(-1, (3, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def own_keys(self, qkv: Tensor, key_pad: Tensor) -> OwnKeys:
        """The part of every query's softmax over its own item's valid keys (§5.1, intra-modality block).

        Computed once per item, so that a pair only adds the other item's keys (`attend_across`).
        """
        q, k, v = self.split_heads(qkv)
        logits = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
        logits.masked_fill_(key_pad[:, None, None, :], float("-inf"))  # padded keys: weight exactly 0
        # The peak only keeps exp() in range; S does not depend on it, so no gradient flows through it.
        peak = logits.detach().amax(dim=-1)
        weights = torch.exp(logits - peak[..., None])
        return OwnKeys(peak, weights.sum(dim=-1), torch.matmul(weights, v))

    def attend_across(
        self, query: Tensor, own: OwnKeys, key: Tensor, value: Tensor, key_pad: Tensor | None
    ) -> Tensor:
        """Heads `(P, T, d)` (before W_O) of queries `(P, h, T, d_k)` whose keys are their own item's (`own`,
        precomputed) plus the other item's `key`/`value` `(P, h, T', d_k)`, padded where `key_pad` `(P, T')`
        (None: no padded key).

        One softmax over both key sets, merged by the log-sum-exp rescaling of online softmax: exact up to
        rounding (§5.1), and the per-pair work is only the cross-modal logits.
        """
        query, key, value = _wide(query), _wide(key), _wide(value)
        logits = torch.matmul(query, key.transpose(-1, -2)).mul_(1.0 / math.sqrt(query.shape[-1]))
        if key_pad is not None:
            logits.masked_fill_(key_pad[:, None, None, :], float("-inf"))
        peak = torch.maximum(own.peak, logits.detach().amax(dim=-1))  # both finite: every item has a key
        own_scale = torch.exp(own.peak - peak)
        weights = logits.sub_(peak[..., None]).exp_()
        total = torch.addcmul(weights.sum(dim=-1), own.total, own_scale)
        heads = torch.matmul(weights, value).addcmul_(own.weighted, own_scale[..., None])
        heads = heads.div_(total[..., None]).transpose(1, 2)
        return heads.flatten(2).to(self.out.weight.dtype)


class CNNHead(nn.Module):
    """Text CNN of mmca.md §2.3: windows 1, 2, 3 over n positions each, ReLU, max, FC, l2."""

    def __init__(self, in_dim: int, filters: int, out_dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, filters, window) for window in CNN_WINDOWS)
        self.fc = nn.Linear(len(CNN_WINDOWS) * filters, out_dim)

    def forward(self, z: Tensor, pad: Tensor | None, trace: Trace | None = None) -> Tensor:
        """`(B, n, in_dim)` rows, whose padded rows (`pad`; None: none) must be exact zeros, -> `(B, out_dim)`
        unit vectors."""
        widths = [conv.kernel_size[0] for conv in self.convs]
        filters = self.convs[0].out_channels
        # Every tap of every window in one GEMM, tap 0 of all windows first, then tap 1, then tap 2, so that
        # the window sums build up in place in the first len(windows)*F columns: conv.weight[:, :, t]
        # multiplies row t of a window.
        taps = F.linear(
            z,
            torch.cat(
                [
                    conv.weight[:, :, t]
                    for t in range(max(widths))
                    for conv in self.convs
                    if t < conv.kernel_size[0]
                ]
            ),
        )
        sums = taps[..., : len(widths) * filters]
        column = sums.shape[-1]
        for t in range(1, max(widths)):
            # windows wider than t add row p + t's tap t; the rows past the block's end are the zero rows
            # appended to Z (A13), and rows n ... inside the block are zeroed padding, so they add nothing
            first = next(index for index, width in enumerate(widths) if width > t)
            count = (len(widths) - first) * filters
            sums[:, : z.shape[1] - t, first * filters :] += taps[:, t:, column : column + count]
            column += count
        bias = torch.cat([conv.bias for conv in self.convs])
        if trace is not None:
            for index in range(len(widths)):
                trace[f"conv{index + 1}"] = F.relu(sums + bias)[..., index * filters : (index + 1) * filters]
        # Positions >= n do not exist: -inf, then one max over positions. max_p ReLU(b + y_p) equals
        # ReLU(b + max_p y_p) exactly (rounding is monotonic), so the bias and the ReLU run once per caption.
        if pad is not None:
            sums.masked_fill_(pad[..., None], float("-inf"))
        features = F.relu(sums.amax(dim=1) + bias)
        projected = self.fc(features)  # window 1 first (§3: columns 0...F-1 of fc.weight)
        if trace is not None:
            trace["pooled"] = features
            trace["fc"] = projected
        return l2norm(_wide(projected)).to(z.dtype)  # A1: l2 with the epsilon added to the norm


@dataclass(frozen=True)
class MMCAImages:
    """What MMCA computes once per image (mmca.md §2.2, §5.1)."""

    embedding: Tensor  # (n, d) i0
    regions: Tensor  # (n, K, d) R = region FC output; padded rows zero
    cross_heads: Tensor  # (3, n, h, K, d_k) Q, K, V of R in the cross unit, split into heads
    lengths: Tensor  # (n,) int64 valid regions
    cross_own: OwnKeys  # each region query's softmax part over its image's own regions


@dataclass(frozen=True)
class MMCACaptions:
    """What MMCA computes once per caption (mmca.md §2.3, §5.1)."""

    embedding: Tensor  # (n, d) c0
    words: Tensor  # (n, N, d) E_d = word FC output; padded rows zero
    cross_heads: Tensor  # (3, n, h, N, d_k) Q, K, V of E_d in the cross unit, split into heads
    lengths: Tensor  # (n,) int64 valid tokens
    cross_own: OwnKeys  # each word query's softmax part over its caption's own words


def _heads(qkv: Tensor, unit: TransformerUnit) -> Tensor:
    """`(n, T, 3d)` -> `(3, n, h, T, d_k)`, contiguous: a pair's gather then copies each item once."""
    return torch.stack(unit.split_heads(qkv)).to(qkv.dtype).contiguous()


def _resolve_block(block_size: BlockSize | None, device: torch.device) -> tuple[int, int]:
    if block_size is None:
        return DEFAULT_GPU_BLOCK if device.type == "cuda" else DEFAULT_CPU_BLOCK
    if isinstance(block_size, int):
        block: tuple[Any, ...] = (block_size, block_size)
    elif isinstance(block_size, (tuple, list)):
        block = tuple(block_size)
    else:
        block = ()
    if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block):
        raise ValueError(f"block_size must be an int >= 1 or (images, captions), got {block_size!r}")
    return block  # type: ignore[return-value]


def shortlists(self_scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """First stage of §5.3 on S0 `(n_img, n_cap)`: each image's top-k captions `(n_img, k')` and each
    caption's top-k images `(n_cap, k'')`, best first, equal scores to the lower index; k' = min(k, n_cap).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    by_image = torch.sort(self_scores, dim=1, descending=True, stable=True).indices[:, :k]
    by_caption = torch.sort(self_scores.t(), dim=1, descending=True, stable=True).indices[:, :k]
    return by_image, by_caption


class MMCA(nn.Module):
    """MMCA on precomputed BERT outputs: self-attention module, cross-attention module, S = S0 + alpha S1."""

    def __init__(self, config: MMCAConfig) -> None:
        super().__init__()
        self.config = config
        d, heads, filters = config.embed_size, config.num_heads, config.cnn_filters
        self.image_fc = nn.Linear(config.img_dim, d)  # A20: with bias, raw features, no activation
        self.image_self = TransformerUnit(d, heads)
        self.text_self = CNNHead(config.bert_dim, filters, d)
        self.word_fc = nn.Linear(config.bert_dim, d)  # A2: BERT rows to d for the cross module
        self.cross = TransformerUnit(d, heads)  # A5: its own weights
        self.text_cross = CNNHead(d, filters, d)

    # ---- input checks -------------------------------------------------------------------------------
    def _check(self, name: str, features: Tensor, lengths: Tensor | Sequence[int], width: int) -> Tensor:
        """Shapes, dtype and lengths of one side; returns the lengths as int64 on the features' device."""
        if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[2] != width:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{name}_features must be a tensor (items, rows, {width}), got {shape}")
        n_items, n_rows, _ = features.shape
        if n_items < 1 or n_rows < 1:
            raise ValueError(
                f"{name}_features needs at least one item and one row, got {tuple(features.shape)}"
            )
        dtype = self.image_fc.weight.dtype
        if features.dtype != dtype:
            raise ValueError(
                f"{name}_features are {features.dtype} but the model is {dtype}: cast one of them"
            )
        lengths = torch.as_tensor(lengths, device=features.device)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"{name}_lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.shape != (n_items,):
            raise ValueError(f"{name}_lengths must have shape ({n_items},), got {tuple(lengths.shape)}")
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > n_rows:
            raise ValueError(f"{name}_lengths must lie in [1, {n_rows}], got values in [{low}, {high}]")
        return lengths.long()

    # ---- per item (§2.2, §2.3, §5.1) --------------------------------------------------------------------
    def _encode_image_chunk(
        self, features: Tensor, lengths: Tensor, trace: Trace | None = None
    ) -> MMCAImages:
        pad = _padding(lengths, features.shape[1])
        regions = _zero_rows(self.image_fc(_zero_rows(features, pad)), pad)  # R; padded rows 0, not the bias
        if trace is not None:
            trace["fc_out"] = regions
        attended = self.image_self(regions, pad, trace)
        embedding = _mean_unit(attended, pad, lengths)  # i0, Eq. 5
        qkv = self.cross.qkv(regions)
        return MMCAImages(embedding, regions, _heads(qkv, self.cross), lengths, self.cross.own_keys(qkv, pad))

    def _encode_caption_chunk(
        self, features: Tensor, lengths: Tensor, trace: Trace | None = None
    ) -> MMCACaptions:
        pad = _padding(lengths, features.shape[1])
        words = _zero_rows(features, pad)  # E; the CNN's overhanging windows read these zero rows (§2.7.4)
        embedding = self.text_self(words, pad, trace)  # c0, Eq. 6-7
        projected = _zero_rows(self.word_fc(words), pad)  # E_d
        if trace is not None:
            trace["fc_out"] = projected
        qkv = self.cross.qkv(projected)
        return MMCACaptions(
            embedding, projected, _heads(qkv, self.cross), lengths, self.cross.own_keys(qkv, pad)
        )

    def encode_images(self, region_features: Tensor, region_lengths: Tensor | Sequence[int]) -> MMCAImages:
        """(n, K, img_dim) region features and (n,) counts -> i0 and the cross inputs, once per image."""
        lengths = self._check("region", region_features, region_lengths, self.config.img_dim)
        parts = [
            self._encode_image_chunk(
                region_features[start : start + _ENCODE_CHUNK], lengths[start : start + _ENCODE_CHUNK]
            )
            for start in range(0, region_features.shape[0], _ENCODE_CHUNK)
        ]
        return MMCAImages(
            embedding=torch.cat([part.embedding for part in parts]),
            regions=torch.cat([part.regions for part in parts]),
            cross_heads=torch.cat([part.cross_heads for part in parts], dim=1),
            lengths=lengths,
            cross_own=OwnKeys(
                *(torch.cat([getattr(part.cross_own, name) for part in parts]) for name in _OWN_FIELDS)
            ),
        )

    def encode_captions(self, word_features: Tensor, word_lengths: Tensor | Sequence[int]) -> MMCACaptions:
        """(n, N, bert_dim) BERT outputs and (n,) token counts -> c0 and the cross inputs, per caption."""
        lengths = self._check("word", word_features, word_lengths, self.config.bert_dim)
        parts = [
            self._encode_caption_chunk(
                word_features[start : start + _ENCODE_CHUNK], lengths[start : start + _ENCODE_CHUNK]
            )
            for start in range(0, word_features.shape[0], _ENCODE_CHUNK)
        ]
        return MMCACaptions(
            embedding=torch.cat([part.embedding for part in parts]),
            words=torch.cat([part.words for part in parts]),
            cross_heads=torch.cat([part.cross_heads for part in parts], dim=1),
            lengths=lengths,
            cross_own=OwnKeys(
                *(torch.cat([getattr(part.cross_own, name) for part in parts]) for name in _OWN_FIELDS)
            ),
        )

    # ---- per pair (§2.4) --------------------------------------------------------------------------------
    def _cross_pairs(
        self,
        images: MMCAImages,
        captions: MMCACaptions,
        image_index: Tensor,
        caption_index: Tensor,
        trace: Trace | None = None,
    ) -> tuple[Tensor, Tensor]:
        region_lengths = images.lengths[image_index]
        word_lengths = captions.lengths[caption_index]
        # Trim to the longest item of these pairs: less work, and the padded sizes cannot matter anyway.
        n_regions, n_words = int(region_lengths.max()), int(word_lengths.max())
        if trace is not None:
            return self._cross_pairs_traced(
                images,
                captions,
                image_index,
                caption_index,
                _padding(region_lengths, n_regions),
                _padding(word_lengths, n_words),
                trace,
            )
        # Blocks of items of one length (similarity sorts by length) skip every masking pass.
        region_pad = _padding_if_any(region_lengths, n_regions)
        word_pad = _padding_if_any(word_lengths, n_words)
        # Y = [R; E_d], regions first (A3); each query attends over its pair's k_i regions and n_c words.
        # Only the cross-modal logits are per pair: each query's softmax over its own item's keys was
        # computed once per item (§5.1) and is merged here. The region rows and the word rows then go
        # through W_O, the FFN and the LayerNorms as two large GEMM batches (the unit is row-wise there).
        unit = self.cross
        # index_select, not advanced indexing: the same contiguous copies, ~9x faster on a CPU
        region = images.cross_heads[..., :n_regions, :].index_select(1, image_index)  # (3, P, h, K, d_k)
        word = captions.cross_heads[..., :n_words, :].index_select(1, caption_index)
        region_heads = unit.attend_across(
            region[0], images.cross_own.take(image_index, n_regions), word[1], word[2], word_pad
        )
        word_heads = unit.attend_across(
            word[0], captions.cross_own.take(caption_index, n_words), region[1], region[2], region_pad
        )
        region_rows = images.regions[:, :n_regions].index_select(0, image_index)
        word_rows = captions.words[:, :n_words].index_select(0, caption_index)
        region_out = unit.finish(region_rows, unit.out(region_heads))
        word_out = unit.finish(word_rows, unit.out(word_heads))
        i1 = _mean_unit(region_out, region_pad, region_lengths)
        # Padded word rows are zeroed so the CNN windows that overhang n read zeros, as in §2.3.
        if word_pad is not None:
            word_out.masked_fill_(word_pad[..., None], 0.0)
        c1 = self.text_cross(word_out, word_pad)
        return i1, c1

    def _cross_pairs_traced(
        self,
        images: MMCAImages,
        captions: MMCACaptions,
        image_index: Tensor,
        caption_index: Tensor,
        region_pad: Tensor,
        word_pad: Tensor,
        trace: Trace,
    ) -> tuple[Tensor, Tensor]:
        """The cross module spelled out on the stacked rows, recording the intermediates (debugging)."""
        n_regions, n_words = region_pad.shape[1], word_pad.shape[1]
        stacked = torch.cat(
            [images.regions[image_index, :n_regions], captions.words[caption_index, :n_words]], dim=1
        )
        heads = torch.cat(
            [
                images.cross_heads[:, image_index, :, :n_regions],
                captions.cross_heads[:, caption_index, :, :n_words],
            ],
            dim=3,
        )
        qkv = heads.permute(1, 3, 0, 2, 4).flatten(2)  # (P, T, 3d) in the fused Q/K/V column order
        trace["input"] = stacked
        out = self.cross.finish(
            stacked, self.cross.attend(qkv, torch.cat([region_pad, word_pad], dim=1), trace), trace
        )
        i1 = _mean_unit(out[:, :n_regions], region_pad, images.lengths[image_index])
        c1 = self.text_cross(_zero_rows(out[:, n_regions:], word_pad), word_pad, trace)
        return i1, c1

    def cross_embeddings(
        self, images: MMCAImages, captions: MMCACaptions, image_index: Tensor, caption_index: Tensor
    ) -> tuple[Tensor, Tensor]:
        """i1 and c1 `(P, d)` of the pairs (image_index[p], caption_index[p]), all in one batch."""
        image_index, caption_index = torch.as_tensor(image_index), torch.as_tensor(caption_index)
        if image_index.shape != caption_index.shape or image_index.dim() != 1 or image_index.numel() == 0:
            raise ValueError(
                "image_index and caption_index must be non-empty 1-D index tensors of one length"
            )
        device = images.lengths.device
        return self._cross_pairs(images, captions, image_index.to(device), caption_index.to(device))

    def _pair_scores(
        self,
        images: MMCAImages,
        captions: MMCACaptions,
        self_scores: Tensor,
        image_index: Tensor,
        caption_index: Tensor,
    ) -> Tensor:
        i1, c1 = self._cross_pairs(images, captions, image_index, caption_index)
        cross = torch.linalg.vecdot(_wide(i1), _wide(c1))
        return self_scores[image_index, caption_index] + self.config.alpha * cross  # §2.5

    def self_scores(self, images: MMCAImages, captions: MMCACaptions) -> Tensor:
        """S0 = i0 . c0 for every pair `(n_img, n_cap)` (float32 for half-precision models)."""
        return _wide(images.embedding) @ _wide(captions.embedding).t()

    def similarity(
        self,
        images: MMCAImages,
        captions: MMCACaptions,
        *,
        block_size: BlockSize | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """S `(n_img, n_cap)` of every pair, blockwise (§5.1).

        `block_size` is images x captions per block (an int: the same for both; None: a device default);
        memory grows with block pairs x (regions + words). `progress` gets the pairs done after each block.
        """
        n_img, n_cap = images.embedding.shape[0], captions.embedding.shape[0]
        image_block, caption_block = _resolve_block(block_size, images.embedding.device)
        self_scores = self.self_scores(images, captions)
        # Blocks of items of similar length: each block is trimmed to its longest item, so sorting by length
        # removes nearly all padded rows (12-20 tokens per caption: ~20% of the word rows). S[i, c] is
        # per pair, so the order changes nothing but rounding.
        image_order = torch.sort(images.lengths, stable=True).indices
        caption_order = torch.sort(captions.lengths, stable=True).indices
        rows: list[Tensor] = []
        for i_start in range(0, n_img, image_block):
            block_images = image_order[i_start : i_start + image_block]
            columns: list[Tensor] = []
            for c_start in range(0, n_cap, caption_block):
                block_captions = caption_order[c_start : c_start + caption_block]
                image_index = block_images.repeat_interleave(block_captions.numel())
                caption_index = block_captions.repeat(block_images.numel())
                scores = self._pair_scores(images, captions, self_scores, image_index, caption_index)
                columns.append(scores.view(block_images.numel(), block_captions.numel()))
                if progress is not None:
                    progress(scores.numel())
            rows.append(torch.cat(columns, dim=1))
        ordered = torch.cat(rows, dim=0)
        unsorted = ordered[torch.argsort(image_order)][:, torch.argsort(caption_order)]
        return unsorted.to(images.embedding.dtype)

    def score_matrix(
        self,
        region_features: Tensor,
        region_lengths: Tensor,
        word_features: Tensor,
        word_lengths: Tensor,
        *,
        block_size: BlockSize | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """`S[i, c]` of §2.5 for every image i and caption c, in the inputs' dtype: exact (§5.1)."""
        images = self.encode_images(region_features, region_lengths)
        captions = self.encode_captions(word_features, word_lengths)
        return self.similarity(images, captions, block_size=block_size, progress=progress)

    def forward(
        self, region_features: Tensor, region_lengths: Tensor, word_features: Tensor, word_lengths: Tensor
    ) -> Tensor:
        """In-batch scores `(B, B)` for the loss: image i against caption j, positives on the diagonal."""
        batch = max(region_features.shape[0], word_features.shape[0])
        return self.score_matrix(
            region_features, region_lengths, word_features, word_lengths, block_size=batch
        )

    def two_stage_scores(
        self,
        region_features: Tensor,
        region_lengths: Tensor,
        word_features: Tensor,
        word_lengths: Tensor,
        k: int,
        *,
        block_size: BlockSize | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Re-ranking scores of §5.3: `(i2t, t2i)`, each `(n_img, n_cap)`, full S on the shortlisted pairs
        (by S0, top k per image resp. per caption) and -inf elsewhere. `block_size` bounds the pairs per batch
        (images x captions); `progress` gets the number of pairs done after each batch."""
        images = self.encode_images(region_features, region_lengths)
        captions = self.encode_captions(word_features, word_lengths)
        self_scores = self.self_scores(images, captions)
        by_image, by_caption = shortlists(self_scores, k)
        i2t_mask = torch.zeros_like(self_scores, dtype=torch.bool).scatter_(1, by_image, True)
        t2i_mask = torch.zeros_like(self_scores, dtype=torch.bool).t().scatter_(1, by_caption, True).t()
        image_index, caption_index = (i2t_mask | t2i_mask).nonzero(as_tuple=True)  # a pair in both: once
        # Batches of pairs of similar lengths, as in `similarity`: little padding after trimming.
        lengths = (
            images.lengths[image_index] * (int(captions.lengths.max()) + 1) + captions.lengths[caption_index]
        )
        order = torch.sort(lengths, stable=True).indices
        image_index, caption_index = image_index[order], caption_index[order]
        image_block, caption_block = _resolve_block(block_size, self_scores.device)
        chunk = image_block * caption_block
        parts: list[Tensor] = []
        for start in range(0, image_index.numel(), chunk):
            stop = min(start + chunk, image_index.numel())
            parts.append(
                self._pair_scores(
                    images, captions, self_scores, image_index[start:stop], caption_index[start:stop]
                )
            )
            if progress is not None:
                progress(stop - start)
        full = torch.full_like(self_scores, float("-inf")).index_put(
            (image_index, caption_index), torch.cat(parts)
        )
        dtype = images.embedding.dtype
        i2t = full.masked_fill(~i2t_mask, float("-inf")).to(dtype)
        t2i = full.masked_fill(~t2i_mask, float("-inf")).to(dtype)
        return i2t, t2i

    # ---- debugging --------------------------------------------------------------------------------------
    def intermediates(
        self,
        region_features: Tensor,
        region_lengths: Tensor,
        word_features: Tensor,
        word_lengths: Tensor,
        pairs: Sequence[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """The tensors of the fixtures' `intermediates.npz` (README §1.5), NaN where an entry does not exist;
        `pairs` are the (image, caption) debug pairs. One batch, for small inputs."""
        region_lengths = self._check("region", region_features, region_lengths, self.config.img_dim)
        word_lengths = self._check("word", word_features, word_lengths, self.config.bert_dim)
        nan = float("nan")
        image_trace: Trace = {}
        caption_trace: Trace = {}
        images = self._encode_image_chunk(region_features, region_lengths, image_trace)
        captions = self._encode_caption_chunk(word_features, word_lengths, caption_trace)
        region_pad = _padding(region_lengths, region_features.shape[1])
        word_pad = _padding(word_lengths, word_features.shape[1])
        result = {
            "image_fc_out": image_trace["fc_out"].masked_fill(region_pad[..., None], nan),
            "image_self_attention": image_trace["attention"]
            .masked_fill(region_pad[:, None, :, None], nan)
            .masked_fill(region_pad[:, None, None, :], nan),
            "image_self_out": image_trace["out"].masked_fill(region_pad[..., None], nan),
            "word_fc_out": caption_trace["fc_out"].masked_fill(word_pad[..., None], nan),
            "text_self_pooled": caption_trace["pooled"],
            "text_self_fc": caption_trace["fc"],
        }
        for window in range(1, len(CNN_WINDOWS) + 1):
            result[f"text_self_conv{window}"] = caption_trace[f"conv{window}"].masked_fill(
                word_pad[..., None], nan
            )
        device = region_lengths.device
        for number, (image, caption) in enumerate(pairs):
            trace: Trace = {}
            index = torch.tensor([image, caption], device=device)
            self._cross_pairs(images, captions, index[:1], index[1:], trace)  # one pair: no padding at all
            prefix = f"pair{number}__"
            result[prefix + "index"] = index
            for name in ("input", "attention", "attention_out", "norm1_out", "out"):
                result[f"{prefix}cross_{name}"] = trace[name][0]
            for name in [f"conv{w}" for w in range(1, len(CNN_WINDOWS) + 1)] + ["pooled", "fc"]:
                result[f"{prefix}text_cross_{name}"] = trace[name][0]
        return result


# ---- reference weights (§3) -------------------------------------------------------------------------------
_UNIT_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "ffn.fc1.weight": "fc1.weight",
    "ffn.fc1.bias": "fc1.bias",
    "ffn.fc2.weight": "fc2.weight",
    "ffn.fc2.bias": "fc2.bias",
    "attention.output.weight": "out.weight",
}
_QKV_ORDER = ("query", "key", "value")  # the row blocks of the fused `qkv.weight`


def _reference_targets(model: MMCA) -> dict[str, tuple[Tensor, slice | None]]:
    """Reference name -> (the model's parameter, the rows of it that the array fills, or None for all)."""
    params = dict(model.named_parameters())
    targets: dict[str, tuple[Tensor, slice | None]] = {
        name: (params[name], None)
        for name in ("image_fc.weight", "image_fc.bias", "word_fc.weight", "word_fc.bias")
    }
    d = model.config.embed_size
    for unit in ("image_self", "cross"):
        for position, part in enumerate(_QKV_ORDER):
            targets[f"{unit}.attention.{part}.weight"] = (
                params[f"{unit}.qkv.weight"],
                slice(position * d, (position + 1) * d),
            )
        for reference, own in _UNIT_NAMES.items():
            targets[f"{unit}.{reference}"] = (params[f"{unit}.{own}"], None)
    for head in ("text_self", "text_cross"):
        for position, window in enumerate(CNN_WINDOWS):
            for kind in ("weight", "bias"):
                targets[f"{head}.conv{window}.{kind}"] = (params[f"{head}.convs.{position}.{kind}"], None)
        for kind in ("weight", "bias"):
            targets[f"{head}.fc.{kind}"] = (params[f"{head}.fc.{kind}"], None)
    return targets


def reference_weight_shapes(model: MMCA) -> dict[str, tuple[int, ...]]:
    """The 44 reference names of mmca.md §3 with the shapes this model expects."""
    return {
        name: tuple(target.shape if rows is None else target[rows].shape)
        for name, (target, rows) in _reference_targets(model).items()
    }


def load_reference_weights(model: MMCA, weights: Mapping[str, Any]) -> None:
    """Copy the 44 reference arrays (numpy or torch, mmca.md §3) into `model`, converting each to its
    parameter's dtype and device; all names and shapes are checked before anything is copied."""
    targets = _reference_targets(model)
    unknown = sorted(set(weights) - set(targets))
    if unknown:
        raise ValueError(
            f"unknown reference weight(s): {', '.join(map(repr, unknown))} (mmca.md §3 has 44 names)"
        )
    missing = sorted(set(targets) - set(weights))
    if missing:
        raise ValueError(f"missing reference weight(s): {', '.join(map(repr, missing))}")
    arrays: dict[str, Tensor] = {}
    for name, (target, rows) in targets.items():
        value = weights[name]
        try:
            array = value.detach() if isinstance(value, Tensor) else torch.from_numpy(np.array(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reference weight {name!r} is not a numeric array: {exc}") from None
        expected = tuple(target.shape if rows is None else target[rows].shape)
        if tuple(array.shape) != expected:
            raise ValueError(f"reference weight {name!r} has shape {tuple(array.shape)}, expected {expected}")
        if array.dtype == torch.bool or array.dtype.is_complex or not torch.isfinite(array.double()).all():
            raise ValueError(f"reference weight {name!r} must hold finite real numbers")
        arrays[name] = array
    with torch.no_grad():
        for name, (target, rows) in targets.items():
            (target if rows is None else target[rows]).copy_(
                arrays[name]
            )  # casts once, to the parameter's dtype
