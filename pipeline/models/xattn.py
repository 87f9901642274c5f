"""SCAN's stacked cross-attention score (Lee et al. ECCV 2018), computed blockwise and fast.

The scoring follows the official SCAN code formula for formula (checked against its outputs by the
conformance tests). What makes it fast:

* All word-region dot products of a block of images x captions come from ONE matrix product
  `(images*regions, d) @ (d, captions*words)`. That product is the dominant cost; everything else works on
  its output, which is `d` times smaller than the attended vectors the original builds.
* The cosine between a query and its attended vector never builds the attended vector:
  `<q, a_q> = sum_x alpha[q, x] s[x, q]` and `||a_q||^2 = alpha[q] G alpha[q]^T` with `G` the small Gram
  matrix of the context vectors of one image (t2i) or one caption (i2t); we divide by the actual `||q||`.
* The score tensor of a block is laid out context-major, `(context items, context len, query items,
  query len)`, for both directions, so the Gram product is a plain batched matmul with no transposed copy.

Padding never influences a score: padded rows are zeroed on the way in, excluded from every normalisation,
softmax and aggregation through masks, so their stored values (even NaN) do not matter.

`l1norm` and `clipped_l1norm` crash in the official code (`NameError: l1norm_d`); here they are OUR
EXTENSION, defined by analogy with `l2norm`: `x / (sum_q |x| + 1e-8)` over the query axis, `clipped_l1norm`
applying LeakyReLU(0.1) first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.config import AGGREGATIONS, DIRECTIONS, RAW_FEATURE_NORMS

BlockSize = int | tuple[int, int]

# Images x captions per block. On a CPU small blocks keep the score tensor (36*12*16*64 floats, 1.7 MB)
# near the caches; on a GPU large blocks keep the device busy. Both bound memory.
DEFAULT_CPU_BLOCK: tuple[int, int] = (16, 64)
DEFAULT_GPU_BLOCK: tuple[int, int] = (256, 1024)

_EPS = 1e-8  # the official epsilon: added to norms in l2norm, clamp of the cosine denominator
_LEAKY_SLOPE = 0.1
# Normalisations whose output lies in [-1, 1]: softmax over contexts needs no max-shift for them.
_BOUNDED_NORMS = frozenset({"softmax", "clipped_l2norm", "l2norm", "l1norm", "clipped_l1norm"})
_MAX_UNSHIFTED_LAMBDA = 60.0  # exp(60) is far from float32 overflow (3.4e38 ~ exp(88))


def _check_choice(option: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not supported; allowed values: {', '.join(allowed)}")


@dataclass(frozen=True)
class XAttnOptions:
    """The options of one cross-attention similarity, validated once."""

    direction: str
    raw_feature_norm: str
    agg: str
    lambda_softmax: float
    lambda_lse: float

    def __post_init__(self) -> None:
        _check_choice("direction", self.direction, DIRECTIONS)
        _check_choice("raw_feature_norm", self.raw_feature_norm, RAW_FEATURE_NORMS)
        _check_choice("agg", self.agg, AGGREGATIONS)
        if not self.lambda_softmax > 0:
            raise ValueError(f"lambda_softmax must be > 0, got {self.lambda_softmax!r}")
        if self.agg == "LogSumExp" and not self.lambda_lse > 0:
            raise ValueError(f"lambda_lse must be > 0 for agg='LogSumExp', got {self.lambda_lse!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type accumulates in float32 (half exp overflows)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_block(block_size: BlockSize | None, device: torch.device) -> tuple[int, int]:
    if block_size is None:
        return DEFAULT_GPU_BLOCK if device.type == "cuda" else DEFAULT_CPU_BLOCK
    if isinstance(block_size, int):
        block = (block_size, block_size)
    else:
        block = tuple(int(b) for b in block_size)
        if len(block) != 2:
            raise ValueError(f"block_size must be an int or (images, captions), got {block_size!r}")
    if min(block) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    return block  # type: ignore[return-value]


def _check_lengths(
    name: str, lengths: Tensor | Sequence[int], count: int, max_len: int, device: torch.device
) -> Tensor:
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (count,):
        raise ValueError(f"{name} must have shape ({count},), got {tuple(lengths.shape)}")
    if count and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise ValueError(
            f"{name} must lie in [1, {max_len}], got values in [{int(lengths.min())}, {int(lengths.max())}]"
        )
    return lengths.long()


def _check_inputs(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor | Sequence[int],
    region_lengths: Tensor | Sequence[int] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    if images.dim() != 3:
        raise ValueError(f"images must be (n_images, regions, d), got shape {tuple(images.shape)}")
    if captions.dim() != 3:
        raise ValueError(f"captions must be (n_captions, words, d), got shape {tuple(captions.shape)}")
    if images.shape[2] != captions.shape[2]:
        raise ValueError(
            "images and captions must share the embedding size, "
            f"got d={images.shape[2]} and d={captions.shape[2]}"
        )
    if not (images.dtype.is_floating_point and captions.dtype.is_floating_point):
        raise ValueError(
            f"images and captions must be floating point, got {images.dtype} and {captions.dtype}"
        )
    if images.device != captions.device:
        raise ValueError(f"images ({images.device}) and captions ({captions.device}) must be on one device")
    if images.dtype != captions.dtype:
        common = torch.promote_types(images.dtype, captions.dtype)
        images, captions = images.to(common), captions.to(common)
    n_img, n_regions, _ = images.shape
    n_cap, n_words, _ = captions.shape
    cap_lens = _check_lengths("caption_lengths", caption_lengths, n_cap, n_words, images.device)
    reg_lens = None
    if region_lengths is not None:
        reg_lens = _check_lengths("region_lengths", region_lengths, n_img, n_regions, images.device)
    elif n_regions < 1:
        raise ValueError("images must have at least one region")
    return images, captions, cap_lens, reg_lens


@dataclass
class _Side:
    """One side (images or captions) of a block, prepared for the kernel."""

    vectors: Tensor  # (B, N, d) input dtype; padding rows zeroed once sliced into a block
    pad: Tensor | None  # (B, N) bool, True on padding; None when the block has none (or not sliced yet)
    lengths: Tensor  # (B,) valid items per row
    norms: Tensor  # (B, N) actual L2 norms, compute dtype
    gram: Tensor  # (B, N, N) Gram matrix of the (zeroed) rows, compute dtype


def _padding_mask(lengths: Tensor, n_rows: int) -> Tensor | None:
    """(B, N) bool, True beyond each row's length; None when nothing is padded."""
    if bool((lengths >= n_rows).all()):
        return None
    return torch.arange(n_rows, device=lengths.device)[None, :] >= lengths[:, None]


def _zero_padding(vectors: Tensor, pad: Tensor | None) -> Tensor:
    """Padding may hold anything (even NaN): replace it by zeros so it cannot leak through products."""
    if pad is None:
        return vectors
    # clone + row fill: much faster than a broadcast masked_fill over every element
    zeroed = vectors.contiguous().clone()
    zeroed.view(-1, zeroed.shape[2]).index_fill_(0, pad.reshape(-1).nonzero().squeeze(1), 0.0)
    return zeroed


def _prepare_side(
    vectors: Tensor, lengths: Tensor | None, compute_dtype: torch.dtype, chunk: int = 1024
) -> _Side:
    """Norms and Gram matrices of every row, once for the whole input (in chunks, bounded memory)."""
    n_items, n_rows, _ = vectors.shape
    if lengths is None:
        lengths = torch.full((n_items,), n_rows, dtype=torch.long, device=vectors.device)
    norms = torch.empty(n_items, n_rows, dtype=compute_dtype, device=vectors.device)
    gram = torch.empty(n_items, n_rows, n_rows, dtype=compute_dtype, device=vectors.device)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        upcast = _zero_padding(vectors[start:stop], _padding_mask(lengths[start:stop], n_rows)).to(
            compute_dtype
        )
        with torch.autocast(vectors.device.type, enabled=False):
            norms[start:stop] = torch.linalg.vector_norm(upcast, dim=2)
            gram[start:stop] = torch.bmm(upcast, upcast.transpose(1, 2))
    return _Side(vectors=vectors, pad=None, lengths=lengths, norms=norms, gram=gram)


def _slice_side(side: _Side, start: int, stop: int) -> _Side:
    """The rows [start, stop) of a prepared side, with their padding zeroed and masked."""
    lengths = side.lengths[start:stop]
    pad = _padding_mask(lengths, side.vectors.shape[1])
    return _Side(
        vectors=_zero_padding(side.vectors[start:stop], pad),
        pad=pad,
        lengths=lengths,
        norms=side.norms[start:stop],
        gram=side.gram[start:stop],
    )


def _normalise_over_queries(scores: Tensor, query_pad: Tensor | None, norm: str) -> Tensor:
    """First normalisation (README §2 step 2): over the query axis, the last axis of `scores`.

    Never modifies `scores` (the raw products are still needed); returns `scores` itself for `no_norm`.
    Padded queries have zero scores (their vectors are zeroed), so they drop out of the L1/L2 sums by
    themselves; only the softmax needs an explicit mask.
    """
    if norm == "no_norm":
        return scores
    if norm == "softmax":
        if query_pad is not None:
            scores = scores.masked_fill(query_pad[None, None], float("-inf"))
        return torch.softmax(scores, dim=-1)
    if norm.startswith("clipped"):
        scores = F.leaky_relu(scores, _LEAKY_SLOPE)
        if norm == "clipped":
            return scores
    if norm.endswith("l2norm"):
        denominator = torch.linalg.vector_norm(scores, dim=-1, keepdim=True)
    else:  # l1norm, clipped_l1norm: our extension
        denominator = scores.abs().sum(dim=-1, keepdim=True)
    denominator = denominator + _EPS if denominator.requires_grad else denominator.add_(_EPS)
    # A fresh tensor from leaky_relu may be divided in place; otherwise divide out of place.
    return (
        scores.div_(denominator)
        if norm.startswith("clipped") and not scores.requires_grad
        else scores / denominator
    )


def _attend_over_contexts(
    normalised: Tensor, context_pad: Tensor | None, norm: str, lambda_softmax: float, reuse: bool
) -> Tensor:
    """Attention (README §2 step 3): softmax with temperature lambda_softmax over the context axis (dim 1).

    `reuse` allows overwriting `normalised` (a temporary); each later step works in place on a tensor it
    owns, except where autograd needs the value.
    """
    logits = normalised.mul_(lambda_softmax) if reuse else normalised * lambda_softmax
    if context_pad is not None:
        # Padded context items are whole (query rows x query len) slabs: fill only those rows.
        padded_rows = context_pad.reshape(-1).nonzero().squeeze(1)
        logits.view(-1, logits.shape[2] * logits.shape[3]).index_fill_(0, padded_rows, float("-inf"))
    if not logits.requires_grad and norm in _BOUNDED_NORMS and lambda_softmax <= _MAX_UNSHIFTED_LAMBDA:
        # Logits are bounded by lambda_softmax: exp cannot overflow, so skip the max-shift passes.
        weights = logits.exp_()
        return weights.div_(weights.sum(dim=1, keepdim=True))
    return torch.softmax(logits, dim=1)


def _block_relevance(
    context: _Side, query: _Side, options: XAttnOptions, compute_dtype: torch.dtype, keep_attention: bool
) -> tuple[Tensor, Tensor | None]:
    """Relevance of every query item of every (context row, query row) pair of one block.

    Returns relevance `(Bx, Bq, Nq)` and, when asked, attention `(Bx, Nx, Bq, Nq)` (context-major).
    """
    n_ctx, ctx_len, dim = context.vectors.shape
    n_query, query_len, _ = query.vectors.shape
    # The one large matrix product: every context-query dot product of the block (the only step autocast
    # may run in half precision; everything after it accumulates in compute_dtype).
    raw = torch.mm(context.vectors.reshape(-1, dim), query.vectors.reshape(-1, dim).t())
    with torch.autocast(raw.device.type, enabled=False):
        return _relevance_from_scores(
            raw.to(compute_dtype).view(n_ctx, ctx_len, n_query, query_len),
            context,
            query,
            options,
            keep_attention,
        )


def _relevance_from_scores(
    raw: Tensor, context: _Side, query: _Side, options: XAttnOptions, keep_attention: bool
) -> tuple[Tensor, Tensor | None]:
    """Steps 2-5 of README §2 on the raw scores `(Bx, Nx, Bq, Nq)` of one block."""
    n_ctx, ctx_len, n_query, query_len = raw.shape
    normalised = _normalise_over_queries(raw, query.pad, options.raw_feature_norm)
    attention = _attend_over_contexts(
        normalised,
        context.pad,
        options.raw_feature_norm,
        options.lambda_softmax,
        reuse=normalised is not raw and not normalised.requires_grad,
    )
    # <q, a_q> = sum_x alpha[x, q] s[x, q]
    numerator = torch.linalg.vecdot(attention, raw, dim=1)
    # ||a_q||^2 = alpha G alpha^T, one small batched matmul per context row
    gram_attention = torch.bmm(context.gram, attention.view(n_ctx, ctx_len, n_query * query_len))
    squared_norm = torch.linalg.vecdot(attention, gram_attention.view_as(attention), dim=1)
    denominator = (squared_norm.clamp_min(0.0).sqrt() * query.norms[None]).clamp_min(_EPS)
    relevance = numerator / denominator
    return relevance, (attention if keep_attention else None)


def _aggregate(relevance: Tensor, query: _Side, agg: str, lambda_lse: float) -> Tensor:
    """Aggregation over the query axis (README §2 step 6), padded queries excluded: `(Bx, Bq)`."""
    pad = None if query.pad is None else query.pad[None]
    if agg == "LogSumExp":
        logits = relevance * lambda_lse
        if pad is not None:
            logits = logits.masked_fill(pad, float("-inf"))
        return torch.logsumexp(logits, dim=-1) / lambda_lse  # max-shifted inside
    if agg == "Max":
        return (relevance if pad is None else relevance.masked_fill(pad, float("-inf"))).amax(dim=-1)
    total = (relevance if pad is None else relevance.masked_fill(pad, 0.0)).sum(dim=-1)
    if agg == "Sum":
        return total
    return total / query.lengths[None].to(total.dtype)  # Mean


def _context_and_query(direction: str, image_side: _Side, caption_side: _Side) -> tuple[_Side, _Side]:
    return (image_side, caption_side) if direction == "t2i" else (caption_side, image_side)


def _orient(block: Tensor, direction: str) -> Tensor:
    """Kernel output is (context rows, query rows); scores are stored (images, captions)."""
    return block if direction == "t2i" else block.t()


def xattn_scores(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor | Sequence[int],
    *,
    direction: str,
    raw_feature_norm: str,
    agg: str,
    lambda_softmax: float,
    lambda_lse: float,
    region_lengths: Tensor | Sequence[int] | None = None,
    block_size: BlockSize | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Cross-attention similarity of every image with every caption: `(n_images, n_captions)`.

    `images` (n_images, regions, d) and `captions` (n_captions, words, d) are encoder outputs, used as
    stored (never re-normalised). `region_lengths` marks images with fewer regions than the padded size.
    `block_size` is images x captions per block (an int means the same for both; None picks a device
    default); memory grows with regions * words * block images * block captions. Half-precision inputs
    are multiplied in their own dtype and accumulated in float32; the result is float32 (float64 for
    float64 inputs). `progress` is called with the number of pairs finished after each block.
    Differentiable when the inputs require grad.
    """
    options = XAttnOptions(direction, raw_feature_norm, agg, float(lambda_softmax), float(lambda_lse))
    images, captions, cap_lens, reg_lens = _check_inputs(images, captions, caption_lengths, region_lengths)
    compute_dtype = _compute_dtype(images.dtype)
    image_block, caption_block = _resolve_block(block_size, images.device)
    n_img, n_cap = images.shape[0], captions.shape[0]
    all_images = _prepare_side(images, reg_lens, compute_dtype)
    all_captions = _prepare_side(captions, cap_lens, compute_dtype)
    rows: list[Tensor] = []
    for c0 in range(0, n_cap, caption_block):
        c1 = min(c0 + caption_block, n_cap)
        caption_side = _slice_side(all_captions, c0, c1)
        column: list[Tensor] = []
        for i0 in range(0, n_img, image_block):
            i1 = min(i0 + image_block, n_img)
            image_side = _slice_side(all_images, i0, i1)
            context, query = _context_and_query(options.direction, image_side, caption_side)
            relevance, _ = _block_relevance(context, query, options, compute_dtype, keep_attention=False)
            scores = _aggregate(relevance, query, options.agg, options.lambda_lse)
            column.append(_orient(scores, options.direction))
            if progress is not None:
                progress((i1 - i0) * (c1 - c0))
        rows.append(torch.cat(column, dim=0))
    if not rows:
        return torch.zeros(n_img, n_cap, dtype=compute_dtype, device=images.device)
    return torch.cat(rows, dim=1)


def xattn_scores_from_products(
    products: Tensor,
    image_gram: Tensor,
    caption_gram: Tensor,
    caption_lengths: Tensor | Sequence[int],
    *,
    direction: str,
    raw_feature_norm: str,
    agg: str,
    lambda_softmax: float,
    lambda_lse: float,
    region_lengths: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """The same score as `xattn_scores`, from the region-word dot products and Gram matrices alone.

    SCAN's score never needs the vectors themselves, only every region . word product and the Gram matrix
    of each image's regions and each caption's words (see the module docstring); vectors' norms are the
    square roots of the Gram diagonals. This entry point is for callers that have those numbers another
    way: a search index stands each region in by its k-means centroid, gathering products and Gram
    matrices from small centroid tables, and so scores a thousand candidates without touching one vector.

    `products` (n_images, regions, n_captions, words); `image_gram` (n_images, regions, regions);
    `caption_gram` (n_captions, words, words). Padded entries may hold anything. One block, no autograd
    promises beyond `xattn_scores`'; returns (n_images, n_captions) in float32 (float64 for float64).
    """
    options = XAttnOptions(direction, raw_feature_norm, agg, float(lambda_softmax), float(lambda_lse))
    if products.dim() != 4 or image_gram.dim() != 3 or caption_gram.dim() != 3:
        raise ValueError(
            "products must be (images, regions, captions, words) and the Gram matrices 3-D, got "
            f"{tuple(products.shape)}, {tuple(image_gram.shape)}, {tuple(caption_gram.shape)}"
        )
    n_img, n_regions, n_cap, n_words = products.shape
    if image_gram.shape != (n_img, n_regions, n_regions) or caption_gram.shape != (n_cap, n_words, n_words):
        raise ValueError(
            f"Gram matrices {tuple(image_gram.shape)} and {tuple(caption_gram.shape)} do not fit products "
            f"{tuple(products.shape)}"
        )
    compute_dtype = _compute_dtype(products.dtype)
    device = products.device
    cap_lens = _check_lengths("caption_lengths", caption_lengths, n_cap, n_words, device)
    reg_lens = (
        torch.full((n_img,), n_regions, dtype=torch.long, device=device)
        if region_lengths is None
        else _check_lengths("region_lengths", region_lengths, n_img, n_regions, device)
    )
    sides: list[_Side] = []
    for gram, lengths in ((image_gram, reg_lens), (caption_gram, cap_lens)):
        pad = _padding_mask(lengths, gram.shape[1])
        gram = gram.to(compute_dtype)
        if pad is not None:
            gram = gram.masked_fill(pad[:, :, None] | pad[:, None, :], 0.0)
        norms = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(0.0).sqrt()
        sides.append(_Side(vectors=gram, pad=pad, lengths=lengths, norms=norms, gram=gram))
    image_side, caption_side = sides
    raw = products.to(compute_dtype)
    for pad, view in (
        (image_side.pad, (slice(None), slice(None), None, None)),
        (caption_side.pad, (None, None)),
    ):
        if pad is not None:
            raw = raw.masked_fill(pad[view], 0.0)
    context, query = _context_and_query(options.direction, image_side, caption_side)
    if options.direction != "t2i":  # context-major: (captions, words, images, regions)
        raw = raw.permute(2, 3, 0, 1).contiguous()
    with torch.autocast(device.type, enabled=False):
        relevance, _ = _relevance_from_scores(raw, context, query, options, keep_attention=False)
        return _orient(_aggregate(relevance, query, options.agg, options.lambda_lse), options.direction)


@dataclass(frozen=True)
class XAttnIntermediates:
    """Per-query relevance and attention of every pair, NaN where a query or context item is padding.

    t2i: relevance (n_img, n_cap, words), attention (n_img, n_cap, words, regions).
    i2t: relevance (n_img, n_cap, regions), attention (n_img, n_cap, regions, words).
    """

    relevance: Tensor
    attention: Tensor


def xattn_relevance(
    images: Tensor,
    captions: Tensor,
    caption_lengths: Tensor | Sequence[int],
    *,
    direction: str,
    raw_feature_norm: str,
    lambda_softmax: float,
    region_lengths: Tensor | Sequence[int] | None = None,
) -> XAttnIntermediates:
    """Relevance and attention before aggregation, for debugging and conformance (whole input, one block)."""
    options = XAttnOptions(direction, raw_feature_norm, "Mean", float(lambda_softmax), 1.0)
    images, captions, cap_lens, reg_lens = _check_inputs(images, captions, caption_lengths, region_lengths)
    compute_dtype = _compute_dtype(images.dtype)
    image_side = _slice_side(_prepare_side(images, reg_lens, compute_dtype), 0, images.shape[0])
    caption_side = _slice_side(_prepare_side(captions, cap_lens, compute_dtype), 0, captions.shape[0])
    context, query = _context_and_query(options.direction, image_side, caption_side)
    relevance, attention = _block_relevance(context, query, options, compute_dtype, keep_attention=True)
    assert attention is not None
    nan = float("nan")
    if query.pad is not None:
        relevance = relevance.masked_fill(query.pad[None], nan)
        attention = attention.masked_fill(query.pad[None, None], nan)
    if context.pad is not None:
        attention = attention.masked_fill(context.pad[:, :, None, None], nan)
    # attention (Bx, Nx, Bq, Nq) -> (Bx, Bq, Nq, Nx)
    attention = attention.permute(0, 2, 3, 1)
    if options.direction == "i2t":  # context rows are captions: swap to (images, captions, ...)
        relevance = relevance.transpose(0, 1)
        attention = attention.transpose(0, 1)
    return XAttnIntermediates(relevance=relevance.contiguous(), attention=attention.contiguous())
