"""Residual codes: what a row's centroid misses, product-quantised, so products can be corrected cheaply.

A row r stands in by its centroid c (`pipeline.index.kmeans`); the shortlist's estimate of a word . region
product is then w . c, and that error is what separates it from the exact ranking (benchmarks/
search_quality.py: with exact products, SCAN's score on centroids keeps every exact top-10 image; with
w . c alone, about 95 % at k = 128). The residual r - c is split into `m` sub-vectors of d / m dimensions,
each replaced by the nearest of `K` (<= 256) sub-centroids learnt by k-means on a sample (PQ, as FAISS's
IVF-PQ and PLAID's residual compression do), so a row costs m bytes beyond its centroid id. At query time
a table of every word . sub-centroid (L x m x K, a few microseconds) turns each corrected product
w . c + sum_j w_j . q_j into m table lookups: no row is decoded and nothing scales with d per candidate.

Files: `<side>_residual_codebooks.npy` (m, K, d / m) float32; per shard `<side>_residuals/res-<shard>.npy`
(rows, m) uint8 (written atomically: encoding resumes); then the side's assembled codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.index.kmeans import MIN_POINTS_PER_CENTROID, faiss_module
from pipeline.index.shards import ShardSet, arrays_per_shard

MAX_SUBSPACES = 32
DIMS_PER_SUBSPACE = 8
CODEBOOK_SIZE = 256
_ITERATIONS = 12
_CHUNK = 65_536


def default_subspaces(dim: int) -> int:
    """Sub-vectors per row: about one per 8 dimensions, at most 32, dividing d (16 for d = 128, 32 for
    d = 1024: 16 and 32 bytes per region). The shortlist's lookups grow with it, not with d."""
    target = max(1, min(MAX_SUBSPACES, dim // DIMS_PER_SUBSPACE))
    while dim % target:
        target -= 1
    return target


def train_codebooks(residuals: np.ndarray, subspaces: int, *, seed: int = 0) -> np.ndarray:
    """(m, K, d / m) sub-centroids by k-means in each subspace (K = 256, fewer for a tiny sample)."""
    faiss = faiss_module()
    residuals = np.ascontiguousarray(residuals, dtype=np.float32)
    rows, dim = residuals.shape
    width = dim // subspaces
    size = max(1, min(CODEBOOK_SIZE, rows // MIN_POINTS_PER_CENTROID or 1))
    books = np.zeros((subspaces, size, width), dtype=np.float32)
    for j in range(subspaces):
        part = np.ascontiguousarray(residuals[:, j * width : (j + 1) * width])
        kmeans = faiss.Kmeans(width, size, niter=_ITERATIONS, seed=seed + j, min_points_per_centroid=1)
        kmeans.train(part)
        books[j] = kmeans.centroids
    return books


class ResidualEncoder:
    """Nearest sub-centroid of each residual sub-vector (exact, FAISS flat L2 per subspace)."""

    def __init__(self, codebooks: np.ndarray) -> None:
        faiss = faiss_module()
        self.codebooks = codebooks
        self.width = codebooks.shape[2]
        self.indexes = []
        for book in codebooks:
            index = faiss.IndexFlatL2(self.width)
            index.add(np.ascontiguousarray(book, dtype=np.float32))
            self.indexes.append(index)

    def encode(self, rows: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """(n, m) uint8 codes of `rows - centroids[codes]`."""
        out = np.empty((rows.shape[0], len(self.indexes)), dtype=np.uint8)
        for start in range(0, rows.shape[0], _CHUNK):
            stop = min(start + _CHUNK, rows.shape[0])
            residual = np.asarray(rows[start:stop], dtype=np.float32) - centroids[codes[start:stop]]
            for j, index in enumerate(self.indexes):
                part = np.ascontiguousarray(residual[:, j * self.width : (j + 1) * self.width])
                out[start:stop, j] = index.search(part, 1)[1][:, 0]
        return out


def residual_file(root: Path, side: str, shard: int) -> Path:
    """The per-shard residual codes of one side."""
    return root / f"{side}_residuals" / f"res-{shard:05d}.npy"


def encode_shards(
    shards: ShardSet,
    centroids: np.ndarray,
    codes: np.ndarray,
    codebooks: np.ndarray,
    root: Path,
    side: str,
    *,
    on_shard: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Residual codes of every row (flat, shard order); shards already encoded are read back."""
    encoder = functools.cache(lambda: ResidualEncoder(codebooks))  # built only if a shard needs it
    item_rows = np.concatenate([[0], np.cumsum(shards.lengths)])  # flat row where each item starts

    def encode(shard: int) -> np.ndarray:
        rows = shards.embeddings(shard)
        start = int(item_rows[shard * shards.shard_size])
        return encoder().encode(rows, centroids, codes[start : start + rows.shape[0]])

    parts = arrays_per_shard(
        shards.num_shards, lambda shard: residual_file(root, side, shard), encode, on_shard
    )
    return np.concatenate(parts) if parts else np.zeros((0, codebooks.shape[0]), np.uint8)


def lookup_table(queries: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """(m * K, Q) float32: sub-centroid . query for every subspace j and code (row j * K + code), so that
    one code fetches a contiguous row of all Q query products."""
    m, size, width = codebooks.shape
    parts = np.asarray(queries, dtype=np.float32).reshape(len(queries), m, width)
    return np.ascontiguousarray(np.einsum("qjw,jkw->jkq", parts, codebooks).reshape(m * size, len(queries)))


def corrections(table: np.ndarray, codes: np.ndarray, size: int) -> np.ndarray:
    """sum_j table[j * K + codes[..., j]]: (*codes.shape[:-1], Q) float32 product corrections.

    One fused gather-and-sum (`embedding_bag`, each bag the m rows of one item): 5x faster than numpy's
    gather then sum, which materialises every row first."""
    import torch

    m = codes.shape[-1]
    rows = torch.from_numpy(codes.reshape(-1, m).astype(np.int64) + np.arange(0, m * size, size))
    summed = torch.nn.functional.embedding_bag(rows, torch.from_numpy(table), mode="sum")
    return summed.numpy().reshape(*codes.shape[:-1], table.shape[1])
