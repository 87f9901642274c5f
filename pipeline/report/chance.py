"""Recall of a random ranking: the floor a run's numbers must clear to show it learned anything.

The levels are exact for a random ranking: an image query with G relevant captions among M ranks them at the
position of the best one, P(rank >= r) = C(M-G, r) / C(M, r); a caption query has one relevant image among
N, P(rank >= r) = (N - r) / N.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")


def chance_survival(gallery: int, relevant: int) -> np.ndarray:
    """P(rank >= r) for r = 0..gallery under a random ranking, rank = position of the best relevant item."""
    if gallery < 1 or not 1 <= relevant <= gallery:
        raise ValueError(f"need 1 <= relevant ({relevant}) <= gallery ({gallery})")
    survival = np.ones(gallery + 1, dtype=np.float64)
    for r in range(1, gallery + 1):
        # C(M-G, r) / C(M, r) = prod_{t<r} (M-G-t) / (M-t)
        survival[r] = survival[r - 1] * max(gallery - relevant - (r - 1), 0) / (gallery - (r - 1))
    return survival


def chance_metrics(num_images: int, captions_per_image: int) -> dict[str, float]:
    """Expected R@K, and medr/meanr of the rank distribution, for random scores on this gallery size.

    i2t: each image query has `captions_per_image` relevant captions among `num_images * captions_per_image`;
    t2i: each caption query has one relevant image among `num_images`. medr is the distribution's median
    rank + 1 (what a large random run's medr tends to), meanr the expected rank + 1.
    """
    result: dict[str, float] = {}
    for direction, gallery, relevant in (
        ("i2t", num_images * captions_per_image, captions_per_image),
        ("t2i", num_images, 1),
    ):
        survival = chance_survival(gallery, relevant)
        for k in RECALL_KS:
            result[f"{direction}_r{k}"] = 100.0 * (1.0 - survival[min(k, gallery)])
        cdf = 1.0 - survival[1:]  # P(rank <= r) for r = 0..gallery-1
        median_rank = int(np.searchsorted(cdf, 0.5 - 1e-12))
        result[f"{direction}_medr"] = float(median_rank + 1)
        result[f"{direction}_meanr"] = float(survival[1:].sum() + 1.0)  # E[rank] = sum_{r>=1} P(rank >= r)
    result["rsum"] = sum(result[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_KS)
    return result


def chance_curve(num_images: int, captions_per_image: int, ks: np.ndarray) -> dict[str, np.ndarray]:
    """Expected R@K in percent at each K of `ks`, per direction."""
    i2t = chance_survival(num_images * captions_per_image, captions_per_image)
    t2i = chance_survival(num_images, 1)
    return {
        "i2t": 100.0 * (1.0 - i2t[np.minimum(ks, len(i2t) - 1)]),
        "t2i": 100.0 * (1.0 - t2i[np.minimum(ks, num_images)]),
    }


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@K in percent for K = 1..max_k from 0-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return np.zeros(max_k)
    counts = np.bincount(np.minimum(ranks, max_k), minlength=max_k + 1)[:max_k]
    return 100.0 * np.cumsum(counts) / ranks.size
