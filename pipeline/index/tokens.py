"""Token-level candidate generation for SCAN, in the manner of ColBERT/PLAID: centroids stand in for tokens.

SCAN scores a caption against an image from two things only: every word-region dot product and the Gram
matrices of the image's regions and the caption's words (`pipeline.models.xattn`). Replace every region by
its k-means centroid (`pipeline.index.kmeans`) corrected by its residual code (`pipeline.index.residuals`)
and both come from small tables: words @ centroids^T (L x nlist) plus a word . sub-centroid table (L x m x
256), once per query, and low-rank factors of centroids @ centroids^T (once per index), gathered by each
image's codes. So the shortlist touches no region embedding:

1. probe (MaxSim over centroids, cheap): S = words @ centroids^T; each word takes its `nprobe` best
   centroids and walks their inverted lists (centroid -> images with a region there). An image reached by
   word w gets, for w, the score of its best probed centroid; an image w did not reach gets w's lowest
   probed score (an upper bound of what it could have, as XTR imputes). The `candidates` best images by
   the sum over words go on.
2. interaction: those candidates are scored by a `rescore` function given the gathered products (centroid
   + residual correction) and centroid Gram matrices (rank 32, `GRAM_RANK`): the search passes SCAN's own
   score (`xattn_scores_from_products` with the model's direction, normalisation, aggregation, temperatures);
   without one, the full centroid MaxSim (sum over words of the best region centroid) is used.
   benchmarks/search_quality.py: with exact products this stage keeps every exact top-10 image at k = 128;
   the Gram's approximation costs nothing measurable, the products' does (94.5 % without the residual
   codes, 99.3 % with them, 65 % for MaxSim).
3. (the caller) the exact score on the float16 embeddings of the k best.

Where fewer images than asked were reached, the rest of the gallery fills in (in index order, all with
the imputed score), so a shortlist of the whole gallery is the whole gallery.

The caption side (image -> text) is the same with roles swapped, and its first stage is exhaustive because a
caption set is small next to a gallery's regions: m[c] = max over the query image's regions of region .
centroid_c, and a caption's estimate is the mean over its words of m[code(word)] (each word's best region,
SCAN t2i's form), one gather over all caption words; the `candidates` best go to the interaction.

Files (under `<index>/tokens/`): `{images,captions}_centroids.npy` (nlist, d) float32; per shard
`{images,captions}_codes/codes-<shard>.npy` (rows,) int32, written atomically so assignment resumes; then
`images_codes.npy` (n_images, max regions) uint16/int32, padded with nlist; `images_lists_offsets.npy`
(nlist + 1,) int64 and `images_lists_items.npy` int32 (each image once per centroid list, ascending);
`captions_codes.npy` (caption words,) int32 in caption order; the residual codes beside them
(`pipeline.index.residuals`: `images_residual_codes.npy` (n_images, max regions, m) uint8,
`captions_residual_codes.npy` (caption words, m) uint8, and the codebooks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from pipeline.index.kmeans import Assigner
from pipeline.index.residuals import corrections, lookup_table
from pipeline.index.shards import ShardSet, arrays_per_shard, save_array

TOKENS_DIR = "tokens"
# Rank of the centroid Gram matrices the second stage uses. benchmarks/search_quality.py at k = 128: exact
# Gram 99.40 % of the exact top-10 kept, rank 32 99.35 %, rank 16 98.85 %, the identity 99.15 %: the Gram
# barely matters (the products do), and a full nlist^2 table costs random reads (67 MB at 4,096 centroids).
GRAM_RANK = 32

# rescore(products, gram, lengths) -> scores: images side (n, regions, words) products, (n, regions,
# regions) Gram matrices of the candidates' centroid-substituted regions, (n,) region counts; captions side
# (regions, n, words) products and (n, words, words) Gram matrices of their centroid-substituted words.
Rescore = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _residuals(root: Path, side: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(codebooks, codes) of a side's residual codes, mapped; None for an index built without them."""
    books = root / f"{side}_residual_codebooks.npy"
    codes = root / f"{side}_residual_codes.npy"
    if not (books.is_file() and codes.is_file()):
        return None
    return np.load(books), np.load(codes, mmap_mode="r")


def _products(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """rows @ centroids^T through torch (its thread setting; numpy's BLAS pool stalls on a busy machine)."""
    return (
        torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)) @ torch.from_numpy(centroids).t()
    ).numpy()


def gram_factors(centroids: np.ndarray, rank: int = GRAM_RANK) -> np.ndarray:
    """(nlist + 1, r) F with F F^T the best rank-r approximation of centroids @ centroids^T (last row zero:
    the padding code nlist). From the d x d eigenproblem of centroids^T centroids, so it is fast to open."""
    nlist, dim = centroids.shape
    rank = min(rank, dim)
    _, vectors = np.linalg.eigh(centroids.T.astype(np.float64) @ centroids)
    factors = np.zeros((nlist + 1, rank), dtype=np.float32)
    factors[:nlist] = centroids @ vectors[:, -rank:].astype(np.float32)
    return factors


def _gathered_gram(factors: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(n, R, R) Gram matrices of rows standing in by their centroids (codes (n, R), padding = nlist):
    one row gather of the factors and a batched product, instead of R^2 random reads per item."""
    gathered = torch.from_numpy(factors[codes])  # (n, R, r)
    return torch.bmm(gathered, gathered.transpose(1, 2)).numpy()


def code_file(root: Path, side: str, shard: int) -> Path:
    """The per-shard centroid ids of one side (`images` or `captions`)."""
    return root / f"{side}_codes" / f"codes-{shard:05d}.npy"


def assign_shards(
    shards: ShardSet,
    centroids: np.ndarray,
    root: Path,
    side: str,
    *,
    on_shard: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Centroid id of every row of every shard; shards whose codes exist are read, not recomputed."""
    assigner = functools.cache(lambda: Assigner(centroids))  # built only if a shard needs it
    parts = arrays_per_shard(
        shards.num_shards,
        lambda shard: code_file(root, side, shard),
        lambda shard: assigner().assign(shards.embeddings(shard)),
        on_shard,
    )
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def build_image_lists(
    root: Path, codes: np.ndarray, lengths: np.ndarray, nlist: int, residuals: np.ndarray | None = None
) -> None:
    """Padded per-image codes (and residual codes) and the inverted lists (centroid -> images), from the
    flat region codes."""
    n_images = len(lengths)
    owner = np.repeat(np.arange(n_images, dtype=np.int64), lengths)
    keys = np.unique(codes.astype(np.int64) * max(n_images, 1) + owner)  # (centroid, image), each once
    items = (keys % max(n_images, 1)).astype(np.int32)
    counts = np.bincount(keys // max(n_images, 1), minlength=nlist)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dtype = np.uint16 if nlist < np.iinfo(np.uint16).max else np.int32
    longest = int(lengths.max()) if n_images else 0
    padded = np.full((n_images, longest), nlist, dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n_images else np.zeros(0, np.int64)
    slot = np.arange(len(codes), dtype=np.int64) - np.repeat(starts, lengths)
    padded[owner, slot] = codes
    save_array(root / "images_codes.npy", padded)
    if residuals is not None:
        padded_residuals = np.zeros((n_images, longest, residuals.shape[1]), dtype=np.uint8)
        padded_residuals[owner, slot] = residuals
        save_array(root / "images_residual_codes.npy", padded_residuals)
    save_array(root / "images_lists_offsets.npy", offsets)
    save_array(root / "images_lists_items.npy", items)


class ImageTokenLists:
    """The image side at query time: centroids, per-image region codes and inverted lists (all mapped)."""

    def __init__(self, root: Path) -> None:
        self.centroids = np.load(root / "images_centroids.npy")
        self.codes = np.load(root / "images_codes.npy", mmap_mode="r")
        self.offsets = np.load(root / "images_lists_offsets.npy")
        self.items = np.load(root / "images_lists_items.npy", mmap_mode="r")
        self.nlist = self.centroids.shape[0]
        self.num_images = self.codes.shape[0]
        self.residuals = _residuals(root, "images")

    @cached_property
    def gram(self) -> np.ndarray:
        """Low-rank factors of the centroid Gram matrix, padded (computed on first use)."""
        return gram_factors(self.centroids)

    def centroid_maxsim(self, scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Sum over words of the max over each image's region centroids of `scores` (L, nlist)."""
        if len(positions) == 0:
            return np.zeros(0, np.float32)
        extended = np.concatenate([scores, np.full((scores.shape[0], 1), -np.inf, np.float32)], axis=1)
        gathered = extended[:, np.asarray(self.codes[positions], dtype=np.int64)]  # (L, n, regions)
        return gathered.max(axis=2).sum(axis=0)

    def interaction(
        self, queries: np.ndarray, scores: np.ndarray, positions: np.ndarray, rescore: Rescore
    ) -> np.ndarray:
        """`rescore` of the images at `positions` with their regions standing in by their centroids (plus
        their residual codes' corrections of the products, when the index has them)."""
        if len(positions) == 0:
            return np.zeros(0, np.float32)
        codes = np.asarray(self.codes[positions], dtype=np.intp)  # (n, R), padding = nlist
        by_centroid = np.concatenate([scores.T, np.zeros((1, scores.shape[0]), np.float32)])  # (nlist + 1, L)
        products = by_centroid[codes]  # (n, R, L): row gathers
        if self.residuals is not None:
            books, residual_codes = self.residuals
            table = lookup_table(queries, books)
            products += corrections(table, np.asarray(residual_codes[positions]), books.shape[1])
        lengths = (codes < self.nlist).sum(axis=1)
        return np.asarray(rescore(products, _gathered_gram(self.gram, codes), lengths), dtype=np.float32)

    def shortlist(
        self,
        queries: np.ndarray,
        count: int,
        *,
        nprobe: int,
        candidates: int,
        rescore: Rescore | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `count` best images for the query words (L, d): (positions, second-stage scores), best
        first, ties to the lower position; `rescore` None: centroid MaxSim (see the module docstring)."""
        n = self.num_images
        count = min(count, n)
        if count < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores = _products(queries, self.centroids)  # (L, nlist)
        nprobe = max(1, min(nprobe, self.nlist))
        probed_all = (
            np.argpartition(-scores, nprobe - 1, axis=1)[:, :nprobe]
            if nprobe < self.nlist
            else np.tile(np.arange(self.nlist), (scores.shape[0], 1))
        )
        total = np.zeros(n, np.float32)
        best = np.empty(n, np.float32)
        reached_any = np.zeros(n, bool)
        for word, probed in enumerate(probed_all):
            probed = probed[np.argsort(scores[word, probed], kind="stable")]  # ascending score
            floor = scores[word, probed[0]]
            lists = [self.items[self.offsets[c] : self.offsets[c + 1]] for c in probed]
            for centroid, images in zip(probed, lists, strict=True):
                best[images] = scores[word, centroid]  # ascending: each image keeps its best probed score
            reached = np.concatenate(lists)
            # Gather-add-scatter: a repeated image writes the same sum, so it is counted once.
            total[reached] += best[reached] - floor
            reached_any[reached] = True
        pool = np.flatnonzero(reached_any)
        candidates = max(candidates, count)
        if len(pool) > candidates:
            keep = np.argpartition(-total[pool], candidates - 1)[:candidates]
            pool = np.sort(pool[keep])
        if len(pool) < count:  # too few reached: the rest of the gallery, in index order
            pool = np.sort(np.concatenate([pool, np.flatnonzero(~reached_any)[: count - len(pool)]]))
        if rescore is None:
            refined = self.centroid_maxsim(scores, pool)
        else:
            refined = self.interaction(queries, scores, pool, rescore)
        order = np.argsort(-refined, kind="stable")[:count]
        return pool[order], refined[order].astype(np.float32)


class CaptionTokenCodes:
    """The caption side at query time: centroids, every caption word's code, caption boundaries."""

    def __init__(self, root: Path, lengths: np.ndarray) -> None:
        self.centroids = np.load(root / "captions_centroids.npy")
        self.codes = np.load(root / "captions_codes.npy", mmap_mode="r")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.nlist = self.centroids.shape[0]
        self.residuals = _residuals(root, "captions")

    @cached_property
    def gram(self) -> np.ndarray:
        """Low-rank factors of the centroid Gram matrix, padded."""
        return gram_factors(self.centroids)

    def _word_rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, longest) flat word rows of the captions at `positions` (clipped) and their validity."""
        lengths = self.lengths[positions]
        slots = np.arange(int(lengths.max()) if len(positions) else 0)
        valid = slots[None, :] < lengths[:, None]
        return np.minimum(self.starts[positions][:, None] + slots[None, :], len(self.codes) - 1), valid

    def padded_codes(self, positions: np.ndarray) -> np.ndarray:
        """(n, longest) word codes of the captions at `positions`, padded with nlist."""
        rows, valid = self._word_rows(positions)
        return np.where(valid, np.asarray(self.codes)[rows], self.nlist)

    def shortlist(
        self, regions: np.ndarray, count: int, *, candidates: int, rescore: Rescore | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `count` best captions for the query image's regions (R, d): (positions, scores), best first.

        First the mean over each caption's words of the best region-centroid similarity, over every
        caption; then, with `rescore`, the centroid interaction of the `candidates` best."""
        count = min(count, len(self.lengths))
        if count < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        by_centroid = _products(regions, self.centroids)  # (R, nlist)
        best = by_centroid.max(axis=0)
        estimate = np.add.reduceat(best[np.asarray(self.codes)], self.starts) / self.lengths
        pool_size = count if rescore is None else min(max(candidates, count), len(estimate))
        pool = np.argsort(-estimate, kind="stable")[:pool_size]
        if rescore is None:
            return pool.astype(np.int64), estimate[pool].astype(np.float32)
        codes = self.padded_codes(pool).astype(np.intp)
        extended = np.concatenate([by_centroid.T, np.zeros((1, by_centroid.shape[0]), np.float32)])
        products = extended[codes]  # (n, W, R): row gathers
        if self.residuals is not None:
            books, residual_codes = self.residuals
            rows, _ = self._word_rows(pool)
            table = lookup_table(regions, books)
            products += corrections(table, np.asarray(residual_codes)[rows], books.shape[1])
        products = np.ascontiguousarray(products.transpose(2, 0, 1))  # (R, n, W)
        refined = np.asarray(
            rescore(products, _gathered_gram(self.gram, codes), self.lengths[pool]), dtype=np.float32
        )
        order = np.argsort(-refined, kind="stable")[:count]
        return pool[order].astype(np.int64), refined[order]
