"""Image-text retrieval metrics (R@K, medr, meanr, rsum) and the Flickr30K / COCO evaluation protocols.

Scores are an (N, cpi * N) matrix, caption j belonging to image j // cpi (cpi = captions per image, 5).
Ranks are 0-based and follow the **optimistic tie rule**: the ground truth wins ties, i.e. a query's rank is
the number of candidates scoring strictly higher than its (best) ground truth. The original code sorts with an
unstable quicksort, so it has no defined rule; this one is deterministic, needs no sort and is bounded by the
original's possible outcomes. Top-1 is the first index of the row/column maximum.

The matrix is processed in blocks of rows (image -> text) and columns (text -> image), so a 5,000 x 25,000
COCO matrix never needs an argsort or a full-size temporary. numpy arrays and torch tensors (CPU or GPU) are
accepted; numpy arrays are wrapped without copying.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.atomic import atomic_output

Protocol = Literal["flickr30k_1k", "coco_1k", "coco_5k"]
PROTOCOLS: tuple[str, ...] = ("flickr30k_1k", "coco_1k", "coco_5k")
METRIC_KEYS: tuple[str, ...] = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "t2i_meanr",
    "rsum",
)
# Elements of one block's temporaries (about 64 MB of float32); bounds memory whatever the matrix size.
_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RetrievalRanks:
    """Per-query 0-based ranks and retrieved items for both directions.

    i2t: one query per image, over captions; t2i: one query per caption, over images. `*_topk` hold the
    indices of the `top_k` best-scoring candidates, best first (order among equal scores is unspecified).
    """

    i2t_ranks: np.ndarray  # (N,) int64
    i2t_top1: np.ndarray  # (N,) int64 caption index
    t2i_ranks: np.ndarray  # (cpi*N,) int64
    t2i_top1: np.ndarray  # (cpi*N,) int64 image index
    i2t_topk: np.ndarray | None = None  # (N, k) int64
    t2i_topk: np.ndarray | None = None  # (cpi*N, k) int64


def _as_tensor(scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        return scores.detach()
    array = np.asarray(scores)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    with warnings.catch_warnings():
        # a read-only array (np.load with mmap_mode="r") is wrapped as is: it is only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _check_shape(scores: torch.Tensor, captions_per_image: int) -> int:
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D (images, captions) matrix, got shape {tuple(scores.shape)}")
    n_images, n_captions = scores.shape
    if n_images == 0 or n_captions != captions_per_image * n_images:
        raise ValueError(
            f"scores has shape ({n_images}, {n_captions}); expected (N, {captions_per_image} * N) with "
            f"captions_per_image={captions_per_image}"
        )
    return n_images


def retrieval_ranks(
    scores: np.ndarray | torch.Tensor, captions_per_image: int = 5, *, top_k: int = 1
) -> RetrievalRanks:
    """0-based ranks of the ground truth for each query (optimistic tie rule), plus top-1 and top-k items.

    CPU input runs through numpy (its comparisons and counts are several times faster than torch's on CPU);
    tensors on an accelerator stay there and use torch.
    """
    matrix = _as_tensor(scores)
    _check_shape(matrix, captions_per_image)
    k = max(1, int(top_k))
    if matrix.device.type == "cpu":
        return _ranks_numpy(_cpu_array(matrix), captions_per_image, k)
    return _ranks_torch(matrix, captions_per_image, k)


def _cpu_array(matrix: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (half/bfloat16 are widened block by block later, not here)."""
    if matrix.dtype == torch.bfloat16:
        return matrix.float().numpy()  # numpy has no bfloat16
    return matrix.numpy()


def _topk_rows(block: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, best first (torch.topk: linear time, unlike a sort)."""
    return torch.from_numpy(np.ascontiguousarray(block)).topk(k, dim=1).indices.numpy()


def _ranks_numpy(array: np.ndarray, captions_per_image: int, k: int) -> RetrievalRanks:
    n_images, n_captions = array.shape
    compute_dtype = np.float64 if array.dtype == np.float64 else np.float32  # float16 widens exactly
    caption_index = np.arange(n_captions)
    caption_gt = array[caption_index // captions_per_image, caption_index].astype(compute_dtype)
    i2t_ranks = np.empty(n_images, dtype=np.int64)
    i2t_top1 = np.empty(n_images, dtype=np.int64)
    i2t_topk = np.empty((n_images, min(k, n_captions)), dtype=np.int64)
    t2i_ranks = np.zeros(n_captions, dtype=np.int64)
    t2i_best = np.full(n_captions, -np.inf, dtype=compute_dtype)
    t2i_top1 = np.zeros(n_captions, dtype=np.int64)
    k_images = min(k, n_images)
    t2i_top_values: torch.Tensor | None = None  # running (k, captions) best scores and their image indices
    t2i_top_images: torch.Tensor | None = None
    # One pass over blocks of image rows serves both directions: i2t is per row, t2i accumulates per column.
    rows_per_block = max(1, _BLOCK_ELEMENTS // n_captions)
    for start in range(0, n_images, rows_per_block):
        block = array[start : start + rows_per_block]
        block = block.astype(compute_dtype, copy=False)
        if np.isnan(block).any():
            raise ValueError(f"scores contain NaN (in image rows from {start}); ranks would be meaningless")
        rows = block.shape[0]
        grouped = block.reshape(rows, n_images, captions_per_image)
        best_gt = grouped[np.arange(rows), np.arange(start, start + rows)].max(axis=1)
        i2t_ranks[start : start + rows] = np.count_nonzero(block > best_gt[:, None], axis=1)
        i2t_top1[start : start + rows] = block.argmax(axis=1)
        if k > 1:
            i2t_topk[start : start + rows] = _topk_rows(block, i2t_topk.shape[1])
        t2i_ranks += np.count_nonzero(block > caption_gt[None, :], axis=0)
        if k > 1:  # merge this block's column top-k into the running one (row blocks are contiguous)
            values, images = torch.from_numpy(block).topk(min(k_images, rows), dim=0)
            images += start
            if t2i_top_values is not None and t2i_top_images is not None:
                values = torch.cat([t2i_top_values, values])
                images = torch.cat([t2i_top_images, images])
                values, order = values.topk(min(k_images, values.shape[0]), dim=0)
                images = images.gather(0, order)
            t2i_top_values, t2i_top_images = values, images
        for offset in range(rows):  # running column argmax; strict ">" keeps the first index on ties
            row = block[offset]
            np.putmask(t2i_top1, row > t2i_best, start + offset)
            np.maximum(t2i_best, row, out=t2i_best)
    if k > 1 and t2i_top_images is not None:
        t2i_topk = t2i_top_images.T.contiguous().numpy()
    else:
        t2i_topk = t2i_top1[:, None]
    return RetrievalRanks(
        i2t_ranks=i2t_ranks,
        i2t_top1=i2t_top1,
        t2i_ranks=t2i_ranks,
        t2i_top1=t2i_top1,
        i2t_topk=i2t_topk if k > 1 else i2t_top1[:, None],
        t2i_topk=t2i_topk,
    )


def _ranks_torch(matrix: torch.Tensor, captions_per_image: int, k: int) -> RetrievalRanks:
    n_images, n_captions = matrix.shape
    device = matrix.device
    i2t_ranks = torch.empty(n_images, dtype=torch.int64, device=device)
    i2t_top1 = torch.empty(n_images, dtype=torch.int64, device=device)
    i2t_topk = torch.empty((n_images, min(k, n_captions)), dtype=torch.int64, device=device)
    rows_per_block = max(1, _BLOCK_ELEMENTS // n_captions)
    for start in range(0, n_images, rows_per_block):
        block = matrix[start : start + rows_per_block]  # (B, cpi*N)
        if torch.isnan(block).any():
            raise ValueError(f"scores contain NaN (in image rows from {start}); ranks would be meaningless")
        rows = block.shape[0]
        grouped = block.reshape(rows, n_images, captions_per_image)
        image_index = torch.arange(start, start + rows, device=device)
        best_gt = grouped[torch.arange(rows, device=device), image_index].amax(dim=1)
        i2t_ranks[start : start + rows] = (block > best_gt[:, None]).sum(dim=1)
        i2t_top1[start : start + rows] = block.argmax(dim=1)
        if k > 1:
            i2t_topk[start : start + rows] = block.topk(i2t_topk.shape[1], dim=1).indices

    t2i_ranks = torch.empty(n_captions, dtype=torch.int64, device=device)
    t2i_top1 = torch.empty(n_captions, dtype=torch.int64, device=device)
    t2i_topk = torch.empty((n_captions, min(k, n_images)), dtype=torch.int64, device=device)
    cols_per_block = max(1, _BLOCK_ELEMENTS // n_images)
    for start in range(0, n_captions, cols_per_block):
        block = matrix[:, start : start + cols_per_block]  # (N, C)
        cols = block.shape[1]
        caption_index = torch.arange(start, start + cols, device=device)
        gt = block[caption_index // captions_per_image, torch.arange(cols, device=device)]
        t2i_ranks[start : start + cols] = (block > gt[None, :]).sum(dim=0)
        t2i_top1[start : start + cols] = block.argmax(dim=0)
        if k > 1:
            t2i_topk[start : start + cols] = block.topk(t2i_topk.shape[1], dim=0).indices.T

    def to_numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.cpu().numpy()

    return RetrievalRanks(
        i2t_ranks=to_numpy(i2t_ranks),
        i2t_top1=to_numpy(i2t_top1),
        t2i_ranks=to_numpy(t2i_ranks),
        t2i_top1=to_numpy(t2i_top1),
        i2t_topk=to_numpy(i2t_topk) if k > 1 else to_numpy(i2t_top1)[:, None],
        t2i_topk=to_numpy(t2i_topk) if k > 1 else to_numpy(t2i_top1)[:, None],
    )


def _direction_metrics(ranks: np.ndarray) -> tuple[float, float, float, float, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    count = len(ranks)
    r1, r5, r10 = (100.0 * float(np.count_nonzero(ranks < k)) / count for k in (1, 5, 10))
    medr = float(math.floor(float(np.median(ranks)))) + 1.0
    meanr = float(ranks.mean()) + 1.0
    return r1, r5, r10, medr, meanr


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr = floor(median)+1, meanr = mean+1 per direction; rsum of the six recalls."""
    i2t = _direction_metrics(i2t_ranks)
    t2i = _direction_metrics(t2i_ranks)
    values = [*i2t, *t2i, i2t[0] + i2t[1] + i2t[2] + t2i[0] + t2i[1] + t2i[2]]
    return dict(zip(METRIC_KEYS, values, strict=True))


def retrieval_metrics(scores: np.ndarray | torch.Tensor, captions_per_image: int = 5) -> dict[str, float]:
    """Recall metrics of a whole score matrix (keys `i2t_r1 ... rsum`, recalls in percent)."""
    ranks = retrieval_ranks(scores, captions_per_image)
    return metrics_from_ranks(ranks.i2t_ranks, ranks.t2i_ranks)


def evaluate_protocol(
    scores: np.ndarray | torch.Tensor, protocol: str, captions_per_image: int = 5
) -> dict[str, Any]:
    """Metrics under a named protocol, as a flat dict: metric keys, `protocol`, `num_images`, `num_captions`.

    - `flickr30k_1k` and `coco_5k`: the whole matrix at once (1,000 x 5,000 and 5,000 x 25,000 on the real
      test sets; other sizes are computed as given, `num_images` records the size).
    - `coco_1k`: five folds of N/5 images with their captions (diagonal blocks); the metric keys hold the mean
      over folds (medr/meanr averaged too, as the original), `folds` the per-fold metric dicts.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    matrix = _as_tensor(scores)
    n_images = _check_shape(matrix, captions_per_image)
    result: dict[str, Any] = {
        "protocol": protocol,
        "num_images": n_images,
        "num_captions": n_images * captions_per_image,
    }
    if protocol != "coco_1k":
        result.update(retrieval_metrics(matrix, captions_per_image))
        return result
    if n_images % 5:
        raise ValueError(f"coco_1k needs the image count to split into 5 equal folds; got {n_images} images")
    fold_images = n_images // 5
    fold_captions = fold_images * captions_per_image
    folds = [
        retrieval_metrics(
            matrix[f * fold_images : (f + 1) * fold_images, f * fold_captions : (f + 1) * fold_captions],
            captions_per_image,
        )
        for f in range(5)
    ]
    result.update({key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS})
    result["images_per_fold"] = fold_images
    result["folds"] = folds
    return result


def write_metrics_json(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write metrics as indented JSON, atomically."""
    path = Path(path)
    text = json.dumps(metrics, indent=2, default=_json_default) + "\n"
    with atomic_output(path) as tmp_path:
        tmp_path.write_text(text)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


RANKS_SCHEMA = pa.schema(
    [
        pa.field("query_type", pa.string(), nullable=False),  # "i2t" (image query) or "t2i" (caption query)
        pa.field("query_index", pa.int32(), nullable=False),  # image index (i2t) or caption index (t2i)
        pa.field("image_index", pa.int32(), nullable=False),  # the query's (ground-truth) image
        pa.field("image_id", pa.string()),
        pa.field("caption", pa.string()),  # the query caption (t2i); null for image queries
        pa.field("rank", pa.int32(), nullable=False),  # 0-based, optimistic tie rule
        pa.field("top1", pa.int32(), nullable=False),  # caption index (i2t) or image index (t2i)
        pa.field("topk", pa.list_(pa.int32()), nullable=False),  # best-first retrieved indices
    ]
)


def ranks_table(
    ranks: RetrievalRanks,
    *,
    captions_per_image: int = 5,
    image_ids: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
) -> pa.Table:
    """Per-query ranks, top-1 and top-k retrieved indices of both directions as one Arrow table.

    `image_ids` (one per image) and `captions` (one per caption) are optional labels for reports.
    """
    n_images = len(ranks.i2t_ranks)
    n_captions = len(ranks.t2i_ranks)
    if n_captions != n_images * captions_per_image:
        raise ValueError(
            f"{n_images} image queries and {n_captions} caption queries do not fit {captions_per_image}"
        )
    if image_ids is not None and len(image_ids) != n_images:
        raise ValueError(f"{len(image_ids)} image ids for {n_images} images")
    if captions is not None and len(captions) != n_captions:
        raise ValueError(f"{len(captions)} captions for {n_captions} caption queries")
    caption_image = np.arange(n_captions) // captions_per_image
    i2t_topk = ranks.i2t_topk if ranks.i2t_topk is not None else ranks.i2t_top1[:, None]
    t2i_topk = ranks.t2i_topk if ranks.t2i_topk is not None else ranks.t2i_top1[:, None]

    def topk_column(topk: np.ndarray) -> pa.Array:
        width = topk.shape[1]
        offsets = np.arange(0, (len(topk) + 1) * width, width, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(topk.reshape(-1).astype(np.int32)))

    ids = list(image_ids) if image_ids is not None else None
    i2t = pa.table(
        {
            "query_type": pa.array(["i2t"] * n_images),
            "query_index": pa.array(np.arange(n_images, dtype=np.int32)),
            "image_index": pa.array(np.arange(n_images, dtype=np.int32)),
            "image_id": pa.array(ids, type=pa.string()) if ids else pa.nulls(n_images, pa.string()),
            "caption": pa.nulls(n_images, pa.string()),
            "rank": pa.array(ranks.i2t_ranks.astype(np.int32)),
            "top1": pa.array(ranks.i2t_top1.astype(np.int32)),
            "topk": topk_column(i2t_topk),
        },
        schema=RANKS_SCHEMA,
    )
    t2i = pa.table(
        {
            "query_type": pa.array(["t2i"] * n_captions),
            "query_index": pa.array(np.arange(n_captions, dtype=np.int32)),
            "image_index": pa.array(caption_image.astype(np.int32)),
            "image_id": pa.array([ids[i] for i in caption_image], type=pa.string())
            if ids
            else pa.nulls(n_captions, pa.string()),
            "caption": pa.array(list(captions), type=pa.string())
            if captions is not None
            else pa.nulls(n_captions, pa.string()),
            "rank": pa.array(ranks.t2i_ranks.astype(np.int32)),
            "top1": pa.array(ranks.t2i_top1.astype(np.int32)),
            "topk": topk_column(t2i_topk),
        },
        schema=RANKS_SCHEMA,
    )
    return pa.concat_tables([i2t, t2i])


def write_ranks_parquet(path: str | Path, table: pa.Table) -> Path:
    """Write a `ranks_table` to Parquet atomically."""
    path = Path(path)
    with atomic_output(path) as tmp_path:
        pq.write_table(table, tmp_path, compression="zstd")
    return path
