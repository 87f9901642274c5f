"""The report's figures (matplotlib, written as PNG): recall against K beside chance, and training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_output
from pipeline.report.chance import DIRECTIONS, RECALL_KS
from pipeline.training_log import EpochRecord

DIRECTION_COLOURS = {"i2t": "tab:blue", "t2i": "tab:orange"}


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported late: it is slow and needs no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")


def plot_training_curves(log: Sequence[EpochRecord], path: Path) -> None:
    """Two panels: training loss and validation rsum per epoch, the best epoch circled (PNG)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, (loss_axis, rsum_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [record.epoch for record in log]
    rsums = [record.val_rsum for record in log]
    for axis, values, title, colour in (
        (loss_axis, [r.train_loss for r in log], "training loss (triplet, summed over the batch)", "tab:red"),
        (rsum_axis, rsums, "validation rsum", "tab:blue"),
    ):
        axis.plot(epochs, values, marker="o", color=colour, linewidth=1.6, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    best = int(np.argmax(rsums))
    rsum_axis.scatter(
        [epochs[best]],
        [rsums[best]],
        s=90,
        facecolors="none",
        edgecolors="black",
        zorder=5,
        label=f"best {rsums[best]:.1f}",
    )
    rsum_axis.legend(loc="lower right")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def plot_recall_at_k(
    ks: np.ndarray, ours: Mapping[str, np.ndarray], chance: Mapping[str, np.ndarray], path: Path
) -> None:
    """Recall@K curves for both directions with the random-ranking chance curves dashed (PNG)."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    figure, axis = plt.subplots(figsize=(7, 4.4))
    for direction in DIRECTIONS:
        colour = DIRECTION_COLOURS[direction]
        axis.plot(ks, ours[direction], color=colour, linewidth=2, label=f"{direction} (this run)")
        axis.plot(
            ks, chance[direction], color=colour, linestyle="--", linewidth=1.2, label=f"{direction} chance"
        )
        for k in RECALL_KS:
            if k <= len(ks):
                axis.scatter([k], [ours[direction][k - 1]], color=colour, s=25, zorder=4)
    axis.set_xscale("log")
    axis.set_xticks([k for k in (1, 2, 5, 10, 20, 50, 100) if k <= ks[-1]])
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("K (log scale)")
    axis.set_ylabel("R@K (%)")
    axis.set_ylim(0, 101)
    axis.set_title("Recall@K")
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="lower right")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
