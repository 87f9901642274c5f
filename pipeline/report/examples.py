"""Retrieval examples: caption queries and their best images, region boxes drawn, the ground truth framed.

They show what the numbers mean: whether the retrieved images fit the caption, and whether the detector's
boxes sit on objects at all (an untrained detector's boxes do not). Given the model's per-region weights for
the top match (`pipeline.explain`), its tile is tinted by them: where the caption's attention went.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.atomic import atomic_output

if TYPE_CHECKING:
    from pipeline.report.inputs import QueryRanks
    from pipeline.store import RegionRecord

TILE_HEIGHT = 220
BOXES_DRAWN = 5
BOX_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
GROUND_TRUTH_FRAME = (26, 127, 55)
OTHER_FRAME = (175, 184, 193)


@dataclass(frozen=True)
class RetrievalExample:
    """One caption query and the images it retrieved best-first."""

    caption_index: int
    caption: str
    gt_image_id: str
    gt_rank: int
    retrieved_image_ids: tuple[str, ...]


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


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _box_label(index: int, regions: RegionRecord, object_names: Sequence[str] | None) -> str:
    label = ""
    if regions.object_ids is not None and index < len(regions.object_ids):
        object_id = int(regions.object_ids[index])
        label = (
            object_names[object_id]
            if object_names and 0 <= object_id < len(object_names)
            else f"obj {object_id}"
        )
    if regions.object_conf is not None and index < len(regions.object_conf):
        label = f"{label} {float(regions.object_conf[index]):.2f}".strip()
    return label or f"region {index}"


def _draw_tile(
    image_path: Path,
    regions: RegionRecord | None,
    header: str,
    is_ground_truth: bool,
    object_names: Sequence[str] | None,
    heat: np.ndarray | None = None,
) -> Any:
    """One retrieved image scaled to the tile height, tinted by `heat` (one weight per region) when given,
    its top boxes drawn, framed green if ground truth."""
    from PIL import Image, ImageDraw

    height = TILE_HEIGHT
    try:
        with Image.open(image_path) as source:
            picture = source.convert("RGB")
    except (OSError, ValueError):
        picture = Image.new("RGB", (height, height), (235, 235, 235))
        ImageDraw.Draw(picture).text(
            (10, height // 2), "image not readable", fill=(120, 0, 0), font=_font(14)
        )
        regions = None
    scale = height / picture.height
    picture = picture.resize((max(1, round(picture.width * scale)), height))
    if heat is not None and regions is not None and len(heat) == len(regions.boxes):
        from pipeline.explain_render import blend_heat

        picture = blend_heat(picture, np.asarray(regions.boxes, dtype=np.float64) * scale, heat)
    draw = ImageDraw.Draw(picture)
    if regions is not None and len(regions.boxes):
        order = (
            np.argsort(-np.asarray(regions.object_conf), kind="stable")
            if regions.object_conf is not None
            else np.arange(len(regions.boxes))
        )
        font = _font(12)
        for rank, index in enumerate(order[:BOXES_DRAWN]):
            x1, y1, x2, y2 = (float(v) * scale for v in regions.boxes[index])
            colour = BOX_COLOURS[rank % len(BOX_COLOURS)]
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
            text = _box_label(int(index), regions, object_names)
            left, top, right, bottom = draw.textbbox((x1 + 2, y1 + 1), text, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
            draw.text((x1 + 2, y1 + 1), text, fill=(255, 255, 255), font=font)
    border, header_height = 6, 22
    frame_colour = GROUND_TRUTH_FRAME if is_ground_truth else OTHER_FRAME
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
    regions: Mapping[str, RegionRecord],
    path: Path,
    object_names: Sequence[str] | None = None,
    top_heat: np.ndarray | None = None,
) -> None:
    """A PNG: the query caption on top, its top-k images below with boxes, the ground truth framed green;
    `top_heat` (one weight per region of the top image) tints the top image."""
    from PIL import Image, ImageDraw

    tiles = []
    for position, image_id in enumerate(example.retrieved_image_ids):
        is_gt = image_id == example.gt_image_id
        header = f"#{position + 1}{' GT' if is_gt else ''}  {Path(image_id).name}"
        heat = top_heat if position == 0 else None
        tiles.append(
            _draw_tile(images_root / image_id, regions.get(image_id), header, is_gt, object_names, heat)
        )
    if example.gt_image_id not in example.retrieved_image_ids:
        gt_id = example.gt_image_id
        header = f"GT, rank {example.gt_rank + 1}  {Path(gt_id).name}"
        tiles.append(_draw_tile(images_root / gt_id, regions.get(gt_id), header, True, object_names))
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
