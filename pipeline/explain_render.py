"""The figures of an `Explanation` (PNG, matplotlib), and the region heat map the report tints its tiles with.

A region's weight fills its box; where boxes overlap the larger weight wins (a max, not a sum, so a pixel
shows the strongest region covering it rather than how many boxes pile up there), and pixels outside every
box stay uncoloured. The colour scale is shown as a colour bar and is shared by all panels of a figure, so
panels compare directly.

Files written (`write_explanation_figures`):
* `attention_words.png` (t2i SCAN, MMCA): one panel per word, its attention over the regions on the photo;
* `attention_regions.png` (i2t SCAN): the numbered regions on the photo beside the region x word matrix of
  attention (each row is a region's distribution over the words);
* `overview.png` (all): the photo tinted by `Explanation.region_weights()`, the whole caption at once.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import atomic_output

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from pipeline.explain import Explanation

COLOUR_MAP = "inferno"
HEAT_ALPHA = 0.6
PANEL_INCHES = 3.0
MAX_COLUMNS = 4
MAX_PICTURE_SIDE = 480  # pixels per panel: a figure of 20 words stays a few MB
DPI = 100
WORDS_FILE = "attention_words.png"
REGIONS_FILE = "attention_regions.png"
OVERVIEW_FILE = "overview.png"


def scale_boxes(boxes: np.ndarray, image_size: tuple[int, int] | None, size: tuple[int, int]) -> np.ndarray:
    """Boxes in `image_size` pixels (the stored original; None: already `size`) moved to `size` (w, h)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if image_size is None or tuple(image_size) == tuple(size):
        return boxes.copy()
    sx, sy = size[0] / max(1, image_size[0]), size[1] / max(1, image_size[1])
    return boxes * np.array([sx, sy, sx, sy])


def region_heat(boxes: np.ndarray, weights: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width) map: each pixel the largest weight of the boxes covering it, NaN where none does."""
    heat = np.full((height, width), np.nan, dtype=np.float64)
    for (x1, y1, x2, y2), weight in zip(
        np.asarray(boxes, dtype=np.float64), np.asarray(weights), strict=True
    ):
        if not np.isfinite(weight):
            continue
        left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
        right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
        if right > left and bottom > top:
            window = heat[top:bottom, left:right]
            np.fmax(window, float(weight), out=window)  # fmax: NaN (no box yet) loses to any weight
    return heat


def blend_heat(
    picture: PILImage.Image, boxes: np.ndarray, weights: np.ndarray, *, alpha: float = HEAT_ALPHA
) -> PILImage.Image:
    """`picture` tinted by the region weights (boxes in its own pixels): negatives count as 0, the largest
    weight gets the top colour; a tile without a colour bar (the report) shows where, not how much."""
    from matplotlib import colormaps
    from PIL import Image

    weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    peak = float(weights.max()) if weights.size else 0.0
    heat = region_heat(boxes, weights / peak if peak > 0 else weights, picture.width, picture.height)
    covered = np.isfinite(heat)
    colours = colormaps[COLOUR_MAP](np.nan_to_num(heat))[..., :3] * 255.0
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    mix = np.where(covered[..., None], (1 - alpha) * pixels + alpha * colours, pixels)
    return Image.fromarray(np.clip(mix.round(), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ figures


def _text(value: str) -> str:
    """Matplotlib reads `$...$` as math: show a token's dollar signs literally."""
    return value.replace("$", r"\$")


def _fit(picture: PILImage.Image, explanation: Explanation) -> tuple[np.ndarray, np.ndarray]:
    """The photo at most MAX_PICTURE_SIDE a side, and the boxes in its pixels."""
    scale = min(1.0, MAX_PICTURE_SIDE / max(picture.width, picture.height))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    small = picture.convert("RGB").resize(size) if size != picture.size else picture.convert("RGB")
    original = explanation.image_size or picture.size
    return np.asarray(small), scale_boxes(explanation.boxes, original, size)


def _title(explanation: Explanation, what: str) -> str:
    caption = textwrap.fill(f'"{explanation.caption}"', 100)
    return _text(f"{explanation.model_name}: score {explanation.score:.4f} for {caption}\n{what}")


def _save(figure: Any, path: Path) -> Path:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return path


def _show_heat(axis: Any, photo: np.ndarray, heat: np.ndarray, norm: Any) -> Any:
    axis.imshow(photo)
    mappable = axis.imshow(np.ma.masked_invalid(heat), cmap=COLOUR_MAP, norm=norm, alpha=HEAT_ALPHA)
    axis.set_axis_off()
    return mappable


def _word_panels(explanation: Explanation, photo: np.ndarray, boxes: np.ndarray, path: Path) -> Path:
    """One panel per word: its attention over the regions, one colour scale for all panels."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height, width = photo.shape[:2]
    count = len(explanation.tokens)
    columns = min(MAX_COLUMNS, count)
    rows = math.ceil(count / columns)
    panel_height = PANEL_INCHES * height / width + 0.35
    figure = Figure(figsize=(PANEL_INCHES * columns + 1.0, panel_height * rows + 1.2), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    peak = float(np.nanmax(explanation.attention)) if explanation.attention.size else 0.0
    norm = Normalize(0.0, peak if peak > 0 else 1.0)
    mass = "mass on regions" if explanation.family == "mmca" else "relevance"
    mappable = None
    for index, axis in enumerate(axes.flat):
        if index >= count:
            axis.set_axis_off()
            continue
        heat = region_heat(boxes, explanation.attention[index], width, height)
        mappable = _show_heat(axis, photo, heat, norm)
        token = explanation.tokens[index]
        axis.set_title(_text(f"{index}: {token}  {mass} {explanation.relevance[index]:.3f}"), fontsize=9)
    if explanation.family == "mmca":
        what = (
            f"MMCA cross unit: each word's attention on the regions, mean over {explanation.num_heads} "
            "heads. The softmax runs over regions AND words,\nso a word's weights on the regions sum to its "
            "mass on regions (the number after the word), not to 1."
        )
        label = f"attention weight on a region (mean over {explanation.num_heads} heads)"
    else:
        what = (
            "each word's attention over the regions (softmax over regions); "
            "number after the word: its relevance"
        )
        label = "attention weight (softmax over regions)"
    figure.suptitle(_title(explanation, what), fontsize=10)
    figure.colorbar(mappable, ax=axes, shrink=0.8, label=label)
    return _save(figure, path)


def _region_matrix(
    explanation: Explanation, photo: np.ndarray, boxes: np.ndarray, names: Sequence[str], path: Path
) -> Path:
    """The regions numbered on the photo beside the region x word attention (a row per region)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n_regions, n_words = explanation.attention.shape
    inches = max(4.5, 0.24 * n_regions + 2.2)
    figure = Figure(figsize=(5.0 + 0.42 * n_words + 2.5, inches), layout="constrained")
    photo_axis, matrix_axis = figure.subplots(1, 2, width_ratios=[5.0, 0.42 * n_words + 2.5])
    relevance = explanation.relevance
    low, high = float(np.nanmin(relevance)), float(np.nanmax(relevance))
    colour_of = Normalize(low, high if high > low else low + 1.0)
    photo_axis.imshow(photo)
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        colour = colormaps[COLOUR_MAP](colour_of(relevance[index]))
        photo_axis.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2)
        )
        photo_axis.text(
            x1 + 1,
            y1 + 1,
            str(index),
            color="white",
            fontsize=7,
            va="top",
            bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0},
        )
    photo_axis.set_axis_off()
    photo_axis.set_title("regions, box colour = relevance", fontsize=9)
    peak = float(np.nanmax(explanation.attention))
    image = matrix_axis.imshow(
        explanation.attention,
        cmap=COLOUR_MAP,
        vmin=0.0,
        vmax=peak if peak > 0 else 1.0,
        aspect="auto",
        interpolation="nearest",
    )
    matrix_axis.set_xticks(
        range(n_words), [_text(token) for token in explanation.tokens], rotation=90, fontsize=8
    )
    labels = [
        _text(f"{i} {names[i] if i < len(names) else ''}  {relevance[i]:.2f}") for i in range(n_regions)
    ]
    matrix_axis.set_yticks(range(n_regions), labels, fontsize=7)
    matrix_axis.set_title("each region's attention over the words (row: region, relevance)", fontsize=9)
    figure.colorbar(image, ax=matrix_axis, shrink=0.8, label="attention weight (softmax over words)")
    figure.suptitle(_title(explanation, "i2t: regions attend over the words"), fontsize=10)
    return _save(figure, path)


def _overview(explanation: Explanation, photo: np.ndarray, boxes: np.ndarray, path: Path) -> Path:
    """The photo tinted by the whole caption's per-region weights."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height, width = photo.shape[:2]
    weights = explanation.region_weights()
    low = 0.0 if explanation.direction == "t2i" else float(np.nanmin(weights))
    high = float(np.nanmax(weights))
    figure = Figure(figsize=(6.5, 6.0 * height / width + 1.4), layout="constrained")
    axis = figure.subplots()
    mappable = _show_heat(
        axis,
        photo,
        region_heat(boxes, weights, width, height),
        Normalize(low, high if high > low else low + 1.0),
    )
    figure.colorbar(mappable, ax=axis, shrink=0.8, label=textwrap.fill(explanation.region_weights_label, 45))
    figure.suptitle(_title(explanation, "the whole caption at once"), fontsize=9)
    return _save(figure, path)


def write_explanation_figures(
    explanation: Explanation,
    picture: PILImage.Image,
    out_dir: str | Path,
    *,
    region_names: Sequence[str] = (),
) -> list[Path]:
    """Write the explanation's PNGs into `out_dir` (created) and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photo, boxes = _fit(picture, explanation)
    if explanation.direction == "t2i":
        first = _word_panels(explanation, photo, boxes, out / WORDS_FILE)
    else:
        first = _region_matrix(explanation, photo, boxes, region_names, out / REGIONS_FILE)
    return [first, _overview(explanation, photo, boxes, out / OVERVIEW_FILE)]
