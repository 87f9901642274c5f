"""Centroids of the embeddings (FAISS spherical k-means) and each row's nearest centroid.

The encoders' outputs are L2-normalised, so similarity is the inner product: k-means is spherical (unit
centroids) and a row's centroid is the one of largest inner product, found by an exact FAISS flat search
(a GPU copy of it where `faiss.get_num_gpus() > 0`). Exact assignment costs rows x centroids x d; it is the
largest part of a build (benchmarks/search_scale.py), and runs shard by shard so that it can resume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# k-means needs about 40 points per centroid to be stable (FAISS warns below 39); it gains little past
# a few hundred thousand points at these sizes, so the sample is capped.
MIN_POINTS_PER_CENTROID = 40
MAX_SAMPLE_ROWS = 262_144
KMEANS_ITERATIONS = 20
# The rule's 8,192 at 1M images would double the build's exact assignment (rows x nlist x d, 418 s at
# 4,096 on 2 cores) and the per-query words x centroids product, for shorter lists to probe; at 4,096 a 1M
# query takes 64 ms (benchmarks/search_scale.py). Past a few million images, pass `--nlist` for more.
MAX_DEFAULT_NLIST = 4096
_ASSIGN_CHUNK = 65_536


def faiss_module() -> Any:
    """`faiss`, imported on first use (the CLI must start without it)."""
    import faiss

    return faiss


def num_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    faiss = faiss_module()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def default_nlist(rows: int) -> int:
    """Centroids for `rows` embeddings: the power of two at or below 2 sqrt(rows), with >= 40 rows each,
    at most `MAX_DEFAULT_NLIST`.

    e.g. 144k regions (4k images x 36) -> 512, 36M regions (1M images) -> 4,096 (the cap).
    """
    if rows < 1:
        return 1
    target = max(1.0, 2.0 * math.sqrt(rows))
    nlist = min(2 ** math.floor(math.log2(target)), MAX_DEFAULT_NLIST)
    cap = max(1, rows // MIN_POINTS_PER_CENTROID)
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


def sample_size(rows: int, nlist: int) -> int:
    """Rows to train `nlist` centroids on."""
    return min(rows, max(MIN_POINTS_PER_CENTROID * nlist, MAX_SAMPLE_ROWS))


def train_centroids(sample: np.ndarray, nlist: int, *, seed: int = 0) -> np.ndarray:
    """(nlist, d) float32 unit centroids by spherical k-means over `sample` (float32 rows)."""
    faiss = faiss_module()
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    nlist = max(1, min(nlist, sample.shape[0]))
    kmeans = faiss.Kmeans(
        sample.shape[1],
        nlist,
        niter=KMEANS_ITERATIONS,
        seed=seed,
        spherical=True,
        gpu=num_gpus() > 0,
        max_points_per_centroid=max(MIN_POINTS_PER_CENTROID, math.ceil(sample.shape[0] / nlist)),
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


class Assigner:
    """Nearest centroid (largest inner product) of many rows, by one exact FAISS flat index."""

    def __init__(self, centroids: np.ndarray) -> None:
        faiss = faiss_module()
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(centroids)
        if num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        self.index = index
        self.nlist = centroids.shape[0]

    def assign(self, rows: np.ndarray) -> np.ndarray:
        """(n,) int32 centroid id of each row (float16 or float32 input), in chunks of bounded memory."""
        codes = np.empty(rows.shape[0], dtype=np.int32)
        for start in range(0, rows.shape[0], _ASSIGN_CHUNK):
            chunk = np.ascontiguousarray(rows[start : start + _ASSIGN_CHUNK], dtype=np.float32)
            _, found = self.index.search(chunk, 1)
            codes[start : start + len(chunk)] = found[:, 0]
        return codes
