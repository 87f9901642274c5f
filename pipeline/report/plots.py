"""The report's figures (matplotlib, written as PNG): recall against K beside chance, and training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import atomic_output
from pipeline.report.chance import DIRECTIONS, RECALL_KS
from pipeline.training_log import EpochRecord

if TYPE_CHECKING:
    import pandas as pd

DIRECTION_COLOURS = {"i2t": "tab:blue", "t2i": "tab:orange"}
# The seed-spread figure's panels: metrics on one scale share a panel.
SPREAD_PANELS = (
    ("R@K (%)", ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")),
    ("rsum", ("rsum",)),
    ("rank (from 1)", ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")),
)


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


def plot_seed_spread(
    values: pd.DataFrame,
    paper: Mapping[str, float],
    seed_ranges: Mapping[str, tuple[float, float]],
    path: Path,
) -> None:
    """Each metric's runs as points (a box from 3 runs), the paper's value as a black bar, its seed range
    shaded: whether this spread is normal, and how far from the paper it sits (PNG).

    `values`: a runs x metrics DataFrame (`pipeline.spread.runs_frame`).
    """
    plt = _pyplot()
    panels = [(title, [m for m in metrics if m in values.columns]) for title, metrics in SPREAD_PANELS]
    panels = [(title, metrics) for title, metrics in panels if metrics]
    widths = [len(metrics) + 0.6 for _, metrics in panels]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(max(7.0, 0.8 * sum(widths) + 1.5), 4.2), width_ratios=widths, squeeze=False
    )
    jitter = np.random.default_rng(0)  # fixed: the same runs give the same picture
    for axis, (title, metrics) in zip(axes[0], panels, strict=True):
        for x, metric in enumerate(metrics):
            colour = DIRECTION_COLOURS.get(metric.split("_")[0], "tab:green")
            runs = values[metric].to_numpy(dtype=float)
            if len(runs) >= 3:
                axis.boxplot(runs, positions=[x], widths=0.5, showfliers=False, medianprops={"color": colour})
            offsets = jitter.uniform(-0.12, 0.12, len(runs))
            axis.scatter(x + offsets, runs, color=colour, s=24, alpha=0.85, zorder=3, label="runs")
            if metric in seed_ranges:
                low, high = seed_ranges[metric]
                axis.fill_between(
                    [x - 0.32, x + 0.32], low, high, color="0.55", alpha=0.35, label="published seed range"
                )
            if metric in paper:
                axis.hlines(paper[metric], x - 0.32, x + 0.32, colors="black", linewidth=2.2, label="paper")
        axis.set_xticks(range(len(metrics)))
        axis.set_xticklabels(metrics, rotation=30, ha="right")
        axis.set_xlim(-0.6, len(metrics) - 0.4)
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")
    legend: dict[str, Any] = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(legend.values(), legend.keys(), loc="upper center", ncol=len(legend), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    _save(figure, path)
    plt.close(figure)
