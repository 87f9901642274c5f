"""The run report: configuration, dataset sizes, recall beside chance and the paper, curves, examples.

Everything here builds content from data passed in (metrics dicts, training-log entries, caption tables,
store metadata), so the stage command only loads files. The report is first assembled as a list of blocks
(`Heading`, `Paragraph`, `Table`, `Figure`, ...) and then rendered twice, to Markdown (`report.md`, images
referenced relatively) and to a self-contained HTML page (`report.html`, images embedded as base64), so the
two versions cannot drift apart.

Chance levels are exact for a random ranking: an image query with G relevant captions among M ranks them at
the position of the best one, P(rank >= r) = C(M-G, r) / C(M, r); a caption query has one relevant image among
N, P(rank >= r) = (N - r) / N. They show at a glance whether a run (for instance the sample on an untrained
detector) learned anything at all.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_output
from pipeline.errors import UserError

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
DIRECTION_TITLES = {"i2t": "image → text (sentence retrieval)", "t2i": "text → image (image retrieval)"}
METRIC_COLUMNS = ("r1", "r5", "r10", "medr", "meanr")
PAPER_DATASETS = {"flickr30k": ("flickr30k_1k",), "coco": ("coco_1k", "coco_5k")}
PROTOCOL_TITLES = {
    "flickr30k_1k": "Flickr30K 1K test",
    "coco_1k": "COCO 1K (5-fold average)",
    "coco_5k": "COCO 5K",
}
# Keys searched (after flattening nested dicts with '_') in training-log lines; the first present wins.
LOSS_KEYS = ("train_loss", "loss", "train_loss_mean", "train_loss_sum")
VAL_RSUM_KEYS = ("val_rsum", "validation_rsum", "val_metrics_rsum", "rsum")
EXAMPLE_TILE_HEIGHT = 220
EXAMPLE_BOXES_DRAWN = 5


class ReportError(UserError):
    """An input of the report is missing or malformed; the message names the file."""


# ============================================================================ document model


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Text with the inline markup `**bold**` and `` `code` `` (rendered in both outputs)."""

    text: str


@dataclass(frozen=True)
class Callout:
    """A highlighted warning (e.g. features from an untrained detector)."""

    text: str
    title: str = "Note"


@dataclass(frozen=True)
class BulletList:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    bold_rows: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Figure:
    """An image written next to the report; `path` is relative to the report's folder."""

    path: str
    caption: str


Block = Heading | Paragraph | Callout | BulletList | Table | Figure


_INLINE_CODE = re.compile(r"`([^`]+)`")
_INLINE_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = _INLINE_CODE.sub(r"<code>\1</code>", escaped)
    return _INLINE_BOLD.sub(r"<strong>\1</strong>", escaped)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """Markdown text of the report (GitHub-flavoured tables)."""
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Callout):
            lines += [f"> **{block.title}:** {block.text}", ""]
        elif isinstance(block, BulletList):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(block.headers))) + "|")
            for index, row in enumerate(block.rows):
                cells = [_md_cell(c) for c in row]
                if index in block.bold_rows:
                    cells = [f"**{c}**" if c else c for c in cells]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_HTML_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; }
td:not(:first-child), th:not(:first-child) { text-align: right; }
tr.bold td { font-weight: 600; background: #fff8c5; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 4px; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 0.9em; }
.callout { border-left: 4px solid #d29922; background: #fff8c5; padding: .6em 1em; margin: 1em 0; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-style: italic; color: #57606a; }
"""


def render_html(title: str, blocks: Sequence[Block], asset_root: Path) -> str:
    """A self-contained HTML page of the same blocks; figures are read from `asset_root` and embedded."""
    body: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            body.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Callout):
            body.append(
                f'<div class="callout"><strong>{html.escape(block.title)}:</strong> '
                f"{_inline_html(block.text)}</div>"
            )
        elif isinstance(block, BulletList):
            items = "".join(f"<li>{_inline_html(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            parts = ["<table>"]
            if block.caption:
                parts.append(f"<caption>{_inline_html(block.caption)}</caption>")
            parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers) + "</tr>")
            for index, row in enumerate(block.rows):
                css = ' class="bold"' if index in block.bold_rows else ""
                parts.append(f"<tr{css}>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
            body.append("".join(parts))
        elif isinstance(block, Figure):
            data = base64.b64encode((asset_root / block.path).read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# ============================================================================ inputs


def flatten(data: Mapping[str, Any], prefix: str = "", separator: str = "_") -> dict[str, Any]:
    """Nested mappings flattened with `separator` (`{"val": {"rsum": 1}}` -> `{"val_rsum": 1}`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}".replace("/", separator).replace(".", separator)
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}{separator}", separator))
        else:
            flat[name] = value
    return flat


def read_json_file(path: str | Path) -> Any:
    """Parse a JSON file, naming it in the error."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON: {exc}") from exc


def read_metrics(path: str | Path) -> dict[str, Any]:
    """`metrics.json` of the evaluate stage: needs at least the six recalls."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object of metrics")
    missing = [f"{d}_r{k}" for d in DIRECTIONS for k in RECALL_KS if f"{d}_r{k}" not in data]
    if missing:
        raise ReportError(f"{path}: missing metric(s) {', '.join(missing)}")
    return data


def read_training_log(path: str | Path) -> list[dict[str, Any]]:
    """`metrics.jsonl` of the train stage: one JSON object per epoch, flattened (errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: training log not found")
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(entry, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object per line")
        entries.append(flatten(entry))
    return entries


@dataclass(frozen=True)
class QueryRanks:
    """Per-query results of one direction: 0-based rank of the ground truth, best-first retrieved indices."""

    ranks: np.ndarray  # (Q,)
    topk: list[list[int]]  # best-first retrieved indices (captions for i2t, images for t2i)
    gt_image: np.ndarray  # (Q,) the query's own image index


def read_ranks(path: str | Path) -> dict[str, QueryRanks]:
    """`ranks.parquet` of the evaluate stage, split by `query_type` (i2t / t2i)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: ranks table not found")
    try:
        table = pq.read_table(path, columns=["query_type", "query_index", "image_index", "rank", "topk"])
    except Exception as exc:  # pyarrow raises several types for missing columns / corrupt files
        raise ReportError(f"{path}: cannot read the ranks table: {exc}") from exc
    data = table.to_pydict()
    result: dict[str, QueryRanks] = {}
    for direction in DIRECTIONS:
        rows = [i for i, kind in enumerate(data["query_type"]) if kind == direction]
        rows.sort(key=lambda i: data["query_index"][i])
        result[direction] = QueryRanks(
            ranks=np.array([data["rank"][i] for i in rows], dtype=np.int64),
            topk=[list(data["topk"][i]) for i in rows],
            gt_image=np.array([data["image_index"][i] for i in rows], dtype=np.int64),
        )
    return result


# ============================================================================ numbers


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


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@K in percent for K = 1..max_k from 0-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return np.zeros(max_k)
    counts = np.bincount(np.minimum(ranks, max_k), minlength=max_k + 1)[:max_k]
    return 100.0 * np.cumsum(counts) / ranks.size


def load_published_results() -> dict[str, Any]:
    """The paper numbers bundled with the package (`pipeline/resources/published_results.json`)."""
    text = resources.files("pipeline").joinpath("resources/published_results.json").read_text()
    return json.loads(text)


def published_rows(dataset: str, protocol: str | None, published: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Published results for this dataset (and protocol when it names one); rsum summed where not stated."""
    protocols = PAPER_DATASETS.get(dataset, ())
    if protocol in protocols:
        protocols = (protocol,)
    rows = []
    for entry in published["results"]:
        if entry["protocol"] in protocols:
            row = dict(entry)
            if "rsum" not in row:
                row["rsum"] = round(sum(row[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_KS), 1)
            rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


# ============================================================================ plots


def _save_figure(figure: Any, path: Path) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")


def _series(log: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> tuple[str | None, list[float]]:
    for key in candidates:
        if any(key in entry for entry in log):
            values = [entry.get(key) for entry in log]
            return key, [float(v) if isinstance(v, (int, float)) else float("nan") for v in values]
    return None, []


def training_curves(log: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per-epoch loss and validation rsum from the training log (empty lists when absent)."""
    epochs = [float(entry.get("epoch", index + 1)) for index, entry in enumerate(log)]
    _, loss = _series(log, LOSS_KEYS)
    _, rsum = _series(log, VAL_RSUM_KEYS)
    _, lr = _series(log, ("lr",))
    return {"epoch": epochs, "train_loss": loss, "val_rsum": rsum, "lr": lr}


def plot_training_curves(curves: Mapping[str, list[float]], path: Path) -> None:
    """Two panels: training loss and validation rsum per epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, (loss_axis, rsum_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = curves["epoch"]
    for axis, key, title, colour in (
        (loss_axis, "train_loss", "training loss (triplet, summed over the batch)", "tab:red"),
        (rsum_axis, "val_rsum", "validation rsum", "tab:blue"),
    ):
        values = curves.get(key) or []
        if values:
            axis.plot(epochs, values, marker="o", color=colour, linewidth=1.6, markersize=4)
        else:
            axis.text(0.5, 0.5, "not in the training log", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    best = [v for v in curves.get("val_rsum") or [] if not math.isnan(v)]
    if best:
        best_index = int(np.nanargmax(curves["val_rsum"]))
        rsum_axis.scatter(
            [epochs[best_index]],
            [curves["val_rsum"][best_index]],
            s=90,
            facecolors="none",
            edgecolors="black",
            zorder=5,
            label=f"best {curves['val_rsum'][best_index]:.1f}",
        )
        rsum_axis.legend(loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


def plot_recall_at_k(
    ks: np.ndarray, ours: Mapping[str, np.ndarray], chance: Mapping[str, np.ndarray], path: Path
) -> None:
    """Recall@K curves for both directions with the random-ranking chance curves dashed (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(7, 4.4))
    colours = {"i2t": "tab:blue", "t2i": "tab:orange"}
    for direction in DIRECTIONS:
        axis.plot(ks, ours[direction], color=colours[direction], linewidth=2, label=f"{direction} (this run)")
        axis.plot(
            ks,
            chance[direction],
            color=colours[direction],
            linestyle="--",
            linewidth=1.2,
            label=f"{direction} chance",
        )
        for k in RECALL_KS:
            if k <= len(ks):
                axis.scatter([k], [ours[direction][k - 1]], color=colours[direction], s=25, zorder=4)
    axis.set_xscale("log")
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= ks[-1]]
    axis.set_xticks(ticks)
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("K (log scale)")
    axis.set_ylabel("R@K (%)")
    axis.set_ylim(0, 101)
    axis.set_title("Recall@K")
    axis.grid(alpha=0.3, which="both")
    axis.legend(loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)


# ============================================================================ retrieval examples


@dataclass(frozen=True)
class RegionBoxes:
    """Boxes of one image (original pixels) with optional object ids/confidences for labels."""

    boxes: np.ndarray  # (n, 4)
    object_ids: np.ndarray | None = None
    object_conf: np.ndarray | None = None


@dataclass(frozen=True)
class RetrievalExample:
    """One caption query and the images it retrieved best-first."""

    caption_index: int
    caption: str
    gt_image_id: str
    gt_rank: int
    retrieved_image_ids: tuple[str, ...]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _label_for(index: int, boxes: RegionBoxes, object_names: Sequence[str] | None) -> str:
    label = ""
    if boxes.object_ids is not None and index < len(boxes.object_ids):
        object_id = int(boxes.object_ids[index])
        label = (
            object_names[object_id]
            if object_names and 0 <= object_id < len(object_names)
            else f"obj {object_id}"
        )
    if boxes.object_conf is not None and index < len(boxes.object_conf):
        label = f"{label} {float(boxes.object_conf[index]):.2f}".strip()
    return label or f"region {index}"


def _draw_tile(
    image_path: Path,
    boxes: RegionBoxes | None,
    header: str,
    is_ground_truth: bool,
    object_names: Sequence[str] | None,
) -> Any:
    """One retrieved image scaled to the tile height, its top boxes drawn, framed green if ground truth."""
    from PIL import Image, ImageDraw

    height = EXAMPLE_TILE_HEIGHT
    try:
        with Image.open(image_path) as source:
            picture = source.convert("RGB")
    except (OSError, ValueError):
        picture = Image.new("RGB", (height, height), (235, 235, 235))
        ImageDraw.Draw(picture).text(
            (10, height // 2), "image not readable", fill=(120, 0, 0), font=_font(14)
        )
        boxes = None
    scale = height / picture.height
    picture = picture.resize((max(1, round(picture.width * scale)), height))
    draw = ImageDraw.Draw(picture)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    if boxes is not None and len(boxes.boxes):
        order = (
            np.argsort(-np.asarray(boxes.object_conf), kind="stable")
            if boxes.object_conf is not None
            else np.arange(len(boxes.boxes))
        )
        font = _font(12)
        for rank, index in enumerate(order[:EXAMPLE_BOXES_DRAWN]):
            x1, y1, x2, y2 = (float(v) * scale for v in boxes.boxes[index])
            colour = palette[rank % len(palette)]
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            text = _label_for(int(index), boxes, object_names)
            left, top, right, bottom = draw.textbbox((x1 + 2, y1 + 1), text, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
            draw.text((x1 + 2, y1 + 1), text, fill=(255, 255, 255), font=font)
    border = 6
    frame_colour = (26, 127, 55) if is_ground_truth else (175, 184, 193)
    header_height = 22
    tile = Image.new("RGB", (picture.width + 2 * border, height + 2 * border + header_height), frame_colour)
    tile.paste(picture, (border, border + header_height))
    tile_draw = ImageDraw.Draw(tile)
    header_font = _font(14)
    while len(header) > 4 and tile_draw.textlength(header, font=header_font) > tile.width - 2 * border:
        header = header[:-2] + "…"
    tile_draw.text(
        (border, 3), header, fill=(255, 255, 255) if is_ground_truth else (36, 41, 47), font=header_font
    )
    return tile


def draw_retrieval_example(
    example: RetrievalExample,
    images_root: Path,
    region_boxes: Mapping[str, RegionBoxes],
    path: Path,
    object_names: Sequence[str] | None = None,
) -> None:
    """A PNG: the query caption on top, its top-k images below with boxes, the ground truth framed green."""
    from PIL import Image, ImageDraw

    tiles = []
    for position, image_id in enumerate(example.retrieved_image_ids):
        is_gt = image_id == example.gt_image_id
        header = f"#{position + 1}{' GT' if is_gt else ''}  {Path(image_id).name}"
        tiles.append(
            _draw_tile(images_root / image_id, region_boxes.get(image_id), header, is_gt, object_names)
        )
    if example.gt_image_id not in example.retrieved_image_ids:
        header = f"GT, rank {example.gt_rank + 1}  {Path(example.gt_image_id).name}"
        tiles.append(
            _draw_tile(
                images_root / example.gt_image_id,
                region_boxes.get(example.gt_image_id),
                header,
                True,
                object_names,
            )
        )
    gap, margin = 12, 12
    width = max(640, sum(t.width for t in tiles) + gap * (len(tiles) - 1) + 2 * margin)
    font = _font(16)
    wrapped = textwrap.wrap(f'Query: "{example.caption}"', width=max(40, width // 9))
    text_height = 22 * len(wrapped) + 8
    canvas = Image.new(
        "RGB", (width, text_height + max(t.height for t in tiles) + 2 * margin), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for line_number, line in enumerate(wrapped):
        draw.text((margin, margin + 22 * line_number), line, fill=(31, 35, 40), font=font)
    x = margin
    for tile in tiles:
        canvas.paste(tile, (x, margin + text_height))
        x += tile.width + gap
    with atomic_output(path) as temporary:
        canvas.save(temporary, format="PNG", optimize=True)


def choose_examples(
    t2i: QueryRanks,
    captions: Sequence[str],
    image_ids: Sequence[str],
    *,
    count: int,
    top_k: int,
    captions_per_image: int,
) -> list[RetrievalExample]:
    """Caption queries spread evenly over the test images (a different caption slot each)."""
    n_queries = len(t2i.ranks)
    if count <= 0 or n_queries == 0:
        return []
    n_images = max(1, n_queries // captions_per_image)
    chosen_images = np.unique(np.linspace(0, n_images - 1, num=min(count, n_images)).round().astype(int))
    examples = []
    for number, image_index in enumerate(chosen_images):
        query = min(int(image_index) * captions_per_image + number % captions_per_image, n_queries - 1)
        retrieved = [image_ids[i] for i in t2i.topk[query][:top_k] if 0 <= i < len(image_ids)]
        examples.append(
            RetrievalExample(
                caption_index=query,
                caption=captions[query],
                gt_image_id=image_ids[int(t2i.gt_image[query])],
                gt_rank=int(t2i.ranks[query]),
                retrieved_image_ids=tuple(retrieved),
            )
        )
    return examples


# ============================================================================ the report


@dataclass
class SplitSize:
    name: str
    images: int
    captions: int


@dataclass
class ReportInputs:
    """Everything the report shows, already loaded (the stage command reads the files)."""

    metrics: Mapping[str, Any]
    dataset: str  # sample | flickr30k | coco
    protocol: str | None = None
    training_log: Sequence[Mapping[str, Any]] = ()
    ranks: Mapping[str, QueryRanks] | None = None
    test_captions: Sequence[str] = ()
    test_image_ids: Sequence[str] = ()  # one per test image, table order
    captions_per_image: int = 5
    split_sizes: Sequence[SplitSize] = ()
    feature_store_rows: int | None = None
    store_metadata: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # section -> values
    checkpoint: Mapping[str, Any] = field(default_factory=dict)  # checkpoint.json of the evaluated model
    images_root: Path | None = None
    region_boxes: Callable[[Sequence[str]], Mapping[str, RegionBoxes]] | None = None
    object_names: Sequence[str] | None = None
    num_examples: int = 4
    top_k: int = 3
    sources: Mapping[str, str] = field(default_factory=dict)  # label -> path, listed in the report


@dataclass
class ReportOutputs:
    markdown: Path
    html: Path
    figures: list[Path]
    data_files: list[Path]


def _is_untrained(metadata: Mapping[str, Any]) -> bool:
    value = metadata.get("untrained")
    if isinstance(value, str):
        return value.lower() in ("true", "1", "yes")
    return bool(value) or str(metadata.get("weights", "")).lower() == "random"


def _gallery_size(metrics: Mapping[str, Any], inputs: ReportInputs) -> int:
    """Images per ranking: per fold for coco_1k, else the whole evaluated split."""
    for key in ("images_per_fold", "num_images"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
            return int(value)
    if inputs.test_image_ids:
        return len(inputs.test_image_ids)
    if inputs.ranks is not None and len(inputs.ranks["i2t"].ranks):
        return len(inputs.ranks["i2t"].ranks)
    raise ReportError("cannot tell the gallery size: metrics lack num_images and no test captions were given")


WHOLE_MATRIX_PROTOCOL = {"flickr30k": "flickr30k_1k", "coco": "coco_5k"}


def protocol_results(
    metrics: Mapping[str, Any], dataset: str, protocol: str | None
) -> dict[str, Mapping[str, Any]]:
    """The evaluated results by protocol name (`protocol` as chosen by the caller, else the file's own).

    A plain metrics.json holds one protocol's numbers at the top level. Protocol `all` holds the
    whole-matrix numbers at the top level (COCO 5K on COCO, the 1K test on Flickr30K) and the 5-fold
    numbers under `coco_1k`.
    """
    name = str(protocol or metrics.get("protocol") or "evaluated")
    if name != "all":
        return {name: metrics}
    results: dict[str, Mapping[str, Any]] = {WHOLE_MATRIX_PROTOCOL.get(dataset, "whole split"): metrics}
    nested = metrics.get("coco_1k")
    if isinstance(nested, Mapping):
        results["coco_1k"] = nested
    return results


def run_variant(inputs: ReportInputs) -> str | None:
    """The evaluated model, in the published results' naming (`ensemble:a+b` for an averaged pair)."""
    models = inputs.metrics.get("models")
    if isinstance(models, list) and models:
        return str(models[0]) if len(models) == 1 else "ensemble:" + "+".join(map(str, models))
    return inputs.checkpoint.get("model_name") or inputs.params.get("train", {}).get("model")


def _recall_row(label: str, values: Mapping[str, Any], *, with_ranks: bool = True) -> tuple[str, ...]:
    cells = [label]
    for direction in DIRECTIONS:
        for column in METRIC_COLUMNS:
            if column in ("medr", "meanr") and not with_ranks:
                cells.append("—")
            else:
                cells.append(_fmt(values.get(f"{direction}_{column}")))
    rsum = values.get("rsum")
    if rsum is None and all(f"{d}_r{k}" in values for d in DIRECTIONS for k in RECALL_KS):
        rsum = sum(float(values[f"{d}_r{k}"]) for d in DIRECTIONS for k in RECALL_KS)
    cells.append(_fmt(rsum))
    return tuple(cells)


RECALL_HEADERS = (
    "",
    "i2t R@1",
    "i2t R@5",
    "i2t R@10",
    "i2t medr",
    "i2t meanr",
    "t2i R@1",
    "t2i R@5",
    "t2i R@10",
    "t2i medr",
    "t2i meanr",
    "rsum",
)


def _configuration_blocks(inputs: ReportInputs, untrained: bool) -> list[Block]:
    blocks: list[Block] = [Heading("Run configuration")]
    variant = run_variant(inputs) or "unknown"
    metadata = inputs.store_metadata
    weights_sha = metadata.get("weights_sha256") or "not recorded"
    flat_metadata = flatten(metadata, separator=".")
    if untrained:
        seed = f", seed {metadata['weights_seed']}" if "weights_seed" in metadata else ""
        detector = f"**untrained** (random weights{seed})"
    else:
        detector = f"weights sha256 `{weights_sha}`"
    details = [
        f"{label} {flat_metadata[key]}"
        for label, key in (
            ("arch", "arch"),
            ("test scale", "detector_config.test_scale"),
            ("boxes", "detector_config.box_mode"),
            ("precision", "precision"),
        )
        if key in flat_metadata
    ]
    items = [
        f"Dataset: **{inputs.dataset}**; evaluation protocol: **{inputs.protocol or 'not stated'}**",
        f"Model variant: **{variant}**"
        + (f" (checkpoint epoch {inputs.checkpoint['epoch']})" if "epoch" in inputs.checkpoint else ""),
        f"Detector: {detector}; "
        + ", ".join([*details, f"feature dim {metadata.get('feature_dim', '?')}"])
        + f" stored as {metadata.get('feature_dtype', '?')}",
    ]
    items += [f"{label}: `{path}`" for label, path in inputs.sources.items()]
    blocks.append(BulletList(tuple(items)))
    return blocks


def _parameter_blocks(inputs: ReportInputs) -> list[Block]:
    """Store metadata and params.yaml sections in full (long, so last: the reproducibility record)."""
    blocks: list[Block] = []
    metadata_rows = tuple(
        (key, value if isinstance(value, str) else json.dumps(value))
        for key, value in sorted(flatten(inputs.store_metadata, separator=".").items())
        if not isinstance(value, list) or len(json.dumps(value)) <= 80  # skip e.g. 1,600 class names
    )
    if metadata_rows:
        blocks.append(Table(("key", "value"), metadata_rows, caption="feature store metadata (extractor)"))
    for section in ("prepare", "extract", "tokenize", "train", "evaluate"):
        values = inputs.params.get(section)
        if values:
            rows = tuple((str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in values.items())
            blocks.append(Table(("parameter", "value"), rows, caption=f"params.yaml section `{section}`"))
    return [Heading("Configuration details"), *blocks] if blocks else []


def _dataset_blocks(inputs: ReportInputs) -> list[Block]:
    blocks: list[Block] = [Heading("Dataset")]
    rows = [(s.name, str(s.images), str(s.captions)) for s in inputs.split_sizes]
    if rows:
        blocks.append(Table(("split", "images", "captions"), tuple(rows)))
    if inputs.feature_store_rows is not None:
        blocks.append(Paragraph(f"Feature store: {inputs.feature_store_rows} images with region features."))
    return blocks


def _recall_blocks(inputs: ReportInputs) -> list[Block]:
    cpi = inputs.captions_per_image
    blocks: list[Block] = [
        Heading("Recall"),
        Paragraph(
            f"R@K in percent; i2t: {DIRECTION_TITLES['i2t']}, an image query counts its best-ranked of "
            f"{cpi} captions; t2i: {DIRECTION_TITLES['t2i']}. medr/meanr: ranks counted from 1. "
            "The chance rows are the expectation under a random ranking of the same gallery."
        ),
    ]
    rows: list[tuple[str, ...]] = []
    bold: set[int] = set()
    summary: list[str] = []
    for name, values in protocol_results(inputs.metrics, inputs.dataset, inputs.protocol).items():
        gallery = _gallery_size(values, inputs)
        chance = chance_metrics(gallery, cpi)
        per_fold = " per fold" if values.get("images_per_fold") else ""
        bold.add(len(rows))
        label = PROTOCOL_TITLES.get(name, name) if inputs.dataset in PAPER_DATASETS else f"protocol {name}"
        rows.append(_recall_row(f"this run, {label}", values))
        rows.append(_recall_row(f"chance, {gallery} images x {gallery * cpi} captions{per_fold}", chance))
        summary.append(f"rsum **{_recall_row('', values)[-1]}** against **{chance['rsum']:.1f}** at chance")
        folds = values.get("folds")
        if isinstance(folds, list) and all(isinstance(f, Mapping) for f in folds):
            rows += [_recall_row(f"  fold {i + 1}", fold) for i, fold in enumerate(folds)]
    blocks.append(
        Table(
            RECALL_HEADERS, tuple(rows), caption="Retrieval on the evaluated split", bold_rows=frozenset(bold)
        )
    )
    blocks.append(Paragraph("; ".join(summary) + "."))
    return blocks


def _paper_blocks(inputs: ReportInputs, published: Mapping[str, Any]) -> list[Block]:
    if inputs.dataset not in PAPER_DATASETS:
        return [
            Heading("Published results"),
            Paragraph(
                f"The paper's numbers are for Flickr30K and COCO; this run's dataset ({inputs.dataset}) "
                "is not comparable with them, so they are not shown."
            ),
        ]
    ours = protocol_results(inputs.metrics, inputs.dataset, inputs.protocol)
    variant = run_variant(inputs)
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for row in published_rows(inputs.dataset, None, published):
        if row["protocol"] in ours:
            by_protocol.setdefault(row["protocol"], []).append(row)
    blocks: list[Block] = [
        Heading("Published results"),
        Paragraph(
            f"Source: {published.get('source', 'pipeline/resources/published_results.json')} "
            "The papers report R@K only; rsum is the paper's where stated, else the sum of the six recalls."
        ),
    ]
    if not by_protocol:
        blocks.append(
            Paragraph(
                f"No published numbers for protocol {', '.join(ours)} on {inputs.dataset}; the papers report "
                f"{', '.join(PAPER_DATASETS[inputs.dataset])}."
            )
        )
    for protocol, entries in by_protocol.items():
        table_rows = [_recall_row("this run", ours[protocol])]
        bold = {0}
        for entry in entries:
            same_variant = entry.get("variant") == variant
            if same_variant:
                bold.add(len(table_rows))
            label = entry["label"] + (" (same variant)" if same_variant else "")
            table_rows.append(_recall_row(label, entry, with_ranks=False))
        blocks.append(
            Table(
                RECALL_HEADERS,
                tuple(table_rows),
                caption=f"{PROTOCOL_TITLES.get(protocol, protocol)}: this run beside the papers",
                bold_rows=frozenset(bold),
            )
        )
    return blocks


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_output(path) as temporary:
        temporary.write_text(buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@dataclass
class _Section:
    """Blocks of one report section plus the files it wrote."""

    blocks: list[Block] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    data_files: list[Path] = field(default_factory=list)


def _recall_curve_section(inputs: ReportInputs, gallery: int, out: Path) -> _Section:
    """Recall@K up to K=100 from the ranks table (else the three metric points), chance dashed; CSV."""
    section = _Section()
    cpi = inputs.captions_per_image
    if inputs.ranks is not None and len(inputs.ranks["t2i"].ranks):
        curve_gallery = len(inputs.ranks["i2t"].ranks)
        max_k = min(curve_gallery * cpi, 100)
        ks = np.arange(1, max_k + 1)
        ours = {d: recall_curve(inputs.ranks[d].ranks, max_k) for d in DIRECTIONS}
        chance_curves = {
            "i2t": 100.0 * (1.0 - chance_survival(curve_gallery * cpi, cpi)[ks]),
            "t2i": 100.0 * (1.0 - chance_survival(curve_gallery, 1)[np.minimum(ks, curve_gallery)]),
        }
        note = f"over all {curve_gallery} evaluated images"
    else:
        ks = np.array(RECALL_KS)
        ours = {d: np.array([float(inputs.metrics[f"{d}_r{k}"]) for k in RECALL_KS]) for d in DIRECTIONS}
        chance_values = chance_metrics(gallery, cpi)
        chance_curves = {d: np.array([chance_values[f"{d}_r{k}"] for k in RECALL_KS]) for d in DIRECTIONS}
        note = "at K = 1, 5, 10 (no ranks table given)"
    plot_recall_at_k(ks, ours, chance_curves, out / "recall_at_k.png")
    rows = [
        (int(k), *(round(float(series[i]), 4) for series in (*ours.values(), *chance_curves.values())))
        for i, k in enumerate(ks)
    ]
    _write_csv(out / "recall_at_k.csv", ("k", "i2t", "t2i", "i2t_chance", "t2i_chance"), rows)
    section.figures.append(out / "recall_at_k.png")
    section.data_files.append(out / "recall_at_k.csv")
    section.blocks.append(Figure("recall_at_k.png", f"Recall@K {note}; dashed: chance level"))
    return section


def _training_section(inputs: ReportInputs, out: Path) -> _Section:
    """Loss and validation rsum per epoch (PNG + CSV for `dvc plots`)."""
    section = _Section([Heading("Training")])
    curves = training_curves(inputs.training_log)
    if not curves["epoch"]:
        section.blocks.append(Paragraph("No training log entries were given."))
        return section
    plot_training_curves(curves, out / "training_curves.png")
    columns = ("train_loss", "val_rsum", "lr")

    def cell(key: str, index: int) -> float | str:
        values = curves[key]
        return "" if index >= len(values) or math.isnan(values[index]) else values[index]

    rows = [(epoch, *(cell(k, i) for k in columns)) for i, epoch in enumerate(curves["epoch"])]
    _write_csv(out / "training_curves.csv", ("epoch", *columns), rows)
    section.figures.append(out / "training_curves.png")
    section.data_files.append(out / "training_curves.csv")
    section.blocks.append(Figure("training_curves.png", "Training loss and validation rsum per epoch"))
    rsums = curves["val_rsum"]
    if any(not math.isnan(v) for v in rsums):
        best = int(np.nanargmax(rsums))
        section.blocks.append(
            Paragraph(
                f"{len(curves['epoch'])} epochs logged; best validation rsum {rsums[best]:.1f} "
                f"at epoch {curves['epoch'][best]:g}."
            )
        )
    return section


def _examples_section(inputs: ReportInputs, out: Path) -> _Section:
    """A few caption queries drawn with their top-k images, boxes and the ground truth marked."""
    section = _Section([Heading("Retrieval examples")])
    examples: list[RetrievalExample] = []
    if inputs.ranks is not None and inputs.test_captions and inputs.test_image_ids and inputs.images_root:
        examples = choose_examples(
            inputs.ranks["t2i"],
            inputs.test_captions,
            inputs.test_image_ids,
            count=inputs.num_examples,
            top_k=inputs.top_k,
            captions_per_image=inputs.captions_per_image,
        )
    if not examples:
        section.blocks.append(
            Paragraph("No retrieval examples: they need the ranks table, the test captions and the images.")
        )
        return section
    assert inputs.images_root is not None
    wanted = sorted({i for e in examples for i in (*e.retrieved_image_ids, e.gt_image_id)})
    boxes = dict(inputs.region_boxes(wanted)) if inputs.region_boxes else {}
    section.blocks.append(
        Paragraph(
            f"Caption queries and their top {inputs.top_k} images (best first), with the "
            f"{EXAMPLE_BOXES_DRAWN} most confident region boxes drawn and labelled; the ground-truth "
            "image is framed green (appended with its rank when it is not among the top images)."
        )
    )
    for number, example in enumerate(examples, start=1):
        name = f"example_{number}.png"
        draw_retrieval_example(example, inputs.images_root, boxes, out / name, inputs.object_names)
        section.figures.append(out / name)
        verdict = "found at rank 1" if example.gt_rank == 0 else f"ground truth at rank {example.gt_rank + 1}"
        section.blocks.append(Figure(name, f'Query {example.caption_index}: "{example.caption}" ({verdict})'))
    return section


def build_report(
    inputs: ReportInputs, out_dir: str | Path, published: Mapping[str, Any] | None = None
) -> ReportOutputs:
    """Write `report.md`, `report.html`, the PNG figures and the plot data (CSV) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    published = published if published is not None else load_published_results()
    untrained = _is_untrained(inputs.store_metadata)
    gallery = _gallery_size(inputs.metrics, inputs)

    blocks: list[Block] = []
    if untrained:
        blocks.append(
            Callout(
                "the region features come from an **untrained detector** (random weights), so the recall "
                "below tests the plumbing of the pipeline (extraction, storage, training, evaluation), "
                "not the paper's numbers. Use the published bottom-up-attention weights to reproduce those.",
                title="Untrained detector",
            )
        )
    blocks += _configuration_blocks(inputs, untrained)
    blocks += _dataset_blocks(inputs)
    blocks += _recall_blocks(inputs)
    sections = [
        _recall_curve_section(inputs, gallery, out),
        _Section(_paper_blocks(inputs, published)),
        _training_section(inputs, out),
        _examples_section(inputs, out),
        _Section(_parameter_blocks(inputs)),
    ]
    for section in sections:
        blocks += section.blocks

    title = f"scan-pipe report: {inputs.dataset}"
    markdown_path, html_path = out / "report.md", out / "report.html"
    _write_text(markdown_path, render_markdown(title, blocks))
    _write_text(html_path, render_html(title, blocks, out))
    return ReportOutputs(
        markdown_path,
        html_path,
        [f for section in sections for f in section.figures],
        [f for section in sections for f in section.data_files],
    )
