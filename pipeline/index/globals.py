"""Candidate generation for models with one global embedding per item (MMCA's i0 and c0, S0 = i0 . c0).

MMCA's score is S = i0 . c0 + alpha i1 . c1 and its own re-ranking (mmca.md 5.3) shortlists by S0, so the
index is a FAISS inner-product index over the global embeddings: exact (`IndexFlatIP`) up to
`FLAT_MAX_ITEMS` items, beyond that an `IndexIVFFlat` with about 4 sqrt(n) lists (search probes `nprobe`).
On a machine where `faiss.get_num_gpus() > 0` the index is built and searched on the GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_output
from pipeline.index.kmeans import MIN_POINTS_PER_CENTROID, faiss_module, num_gpus

FLAT_MAX_ITEMS = 262_144
DEFAULT_NPROBE = 32


def index_file(root: Path, side: str) -> Path:
    """The FAISS index of one side (`images` or `captions`)."""
    return root / f"{side}.faiss"


def build_global_index(vectors: np.ndarray, path: Path, *, seed: int = 0) -> str:
    """Build and write (atomically) the inner-product index of `vectors` (n, d); returns its kind."""
    faiss = faiss_module()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n <= FLAT_MAX_ITEMS:
        index = faiss.IndexFlatIP(dim)
        kind = "flat"
    else:
        nlist = 2 ** math.floor(math.log2(4 * math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.max_points_per_centroid = MIN_POINTS_PER_CENTROID * 4
        kind = f"ivf{nlist}"
    if num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    if num_gpus() > 0:
        index = faiss.index_gpu_to_cpu(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp_path:
        faiss.write_index(index, str(tmp_path))
    return kind


class GlobalIndex:
    """A FAISS inner-product index read back for search."""

    def __init__(self, path: Path) -> None:
        faiss = faiss_module()
        index = faiss.read_index(str(path))
        if num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        self.index = index
        self.count = int(index.ntotal)

    def shortlist(
        self, query: np.ndarray, count: int, *, nprobe: int = DEFAULT_NPROBE
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `count` items of largest inner product with `query` (d,): (positions, scores), best first.

        An IVF search that reaches fewer than `count` items is filled up with the others, in index order.
        """
        faiss = faiss_module()
        count = min(count, self.count)
        if count < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if hasattr(self.index, "nprobe"):
            faiss.extract_index_ivf(self.index).nprobe = nprobe
        scores, found = self.index.search(np.ascontiguousarray(query, np.float32).reshape(1, -1), count)
        scores, found = scores[0], found[0].astype(np.int64)
        valid = found >= 0
        scores, found = scores[valid], found[valid]
        if len(found) < count:
            rest = np.setdiff1d(np.arange(self.count), found)[: count - len(found)]
            found = np.concatenate([found, rest])
            scores = np.concatenate([scores, np.full(len(rest), -np.inf, np.float32)])
        return found, scores.astype(np.float32)
