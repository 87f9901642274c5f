"""A search result as one self-contained HTML page: thumbnails with boxes and, where it exists, a heat map.

Thumbnails come from the images folder (`--images`; the image id is the path below it) with the regions'
boxes drawn from the feature store; without the folder, a grey canvas of the image's size stands in, and
the page says so. Images are embedded as data URIs, so the page travels alone.

Heat maps are `pipeline.explain`'s job: `HeatMaps` calls the searcher's `Explainer` (the scorer's own
attention for the pair) and tints the thumbnail with `pipeline.explain_render.blend_heat` by the explanation's
`region_weights()`.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import jinja2
import markupsafe
import numpy as np
from PIL import Image, ImageDraw

from pipeline.atomic import write_text_atomic
from pipeline.errors import UserError
from pipeline.explain_render import blend_heat
from pipeline.search import Searcher, SearchResult
from pipeline.store import RegionRecord

THUMBNAIL_PIXELS = 320
BOX_COLOR = (255, 196, 0)
PLACEHOLDER_COLOR = (215, 218, 222)


class SearchPageError(UserError):
    """The page cannot be written (e.g. the images folder does not exist); names the path."""


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def picture_of(record: RegionRecord | None, image_path: Path | None) -> tuple[Image.Image | None, str]:
    """The image (or a grey canvas of its stored size) fitted into THUMBNAIL_PIXELS; and a note."""
    note = ""
    picture: Image.Image | None = None
    if image_path is not None and image_path.is_file():
        try:
            with Image.open(image_path) as opened:
                picture = opened.convert("RGB")
        except OSError as exc:
            note = f"image unreadable ({exc}); "
    elif image_path is not None:
        note = "image file not found; "
    if picture is None:
        if record is None:
            return None, note + "no image and no boxes"
        picture = Image.new("RGB", (max(1, record.image_w), max(1, record.image_h)), PLACEHOLDER_COLOR)
        note += "grey canvas of the image's size"
    scale = THUMBNAIL_PIXELS / max(picture.size)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))), note


def _box_scale(record: RegionRecord, picture: Image.Image) -> np.ndarray:
    """Boxes of `record` (original pixels) in the thumbnail's pixels."""
    sx, sy = picture.width / max(1, record.image_w), picture.height / max(1, record.image_h)
    return np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])


def with_boxes(picture: Image.Image, record: RegionRecord | None) -> Image.Image:
    """A copy of the thumbnail with the record's boxes drawn."""
    shown = picture.copy()
    if record is not None and len(record.boxes):
        draw = ImageDraw.Draw(shown)
        for x1, y1, x2, y2 in _box_scale(record, shown):
            draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOR, width=1)
    return shown


class HeatMaps:
    """Each result's thumbnail tinted by the pair's attention per region: the searcher's `Explainer` (the
    scorer's own attention) and `blend_heat`; `reason` says why a result has none (e.g. a caption of unknown
    words)."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.reason = ""

    def heat_map(self, record: RegionRecord | None, caption: str, picture: Image.Image) -> Image.Image | None:
        """The tinted thumbnail, or None (then `reason` says why)."""
        if record is None:
            return None
        explainer = self.searcher.explainer
        try:
            explanation = explainer.explain(record, caption)
        except UserError as exc:
            self.reason = f"no heat map for some results ({exc})"
            return None
        return blend_heat(picture, _box_scale(record, picture), explanation.region_weights())


@dataclass
class Card:
    """One result on the page."""

    rank: int
    title: str
    score: float
    shortlist_rank: int
    shortlist_score: float
    caption: str | None
    image: str | None  # data URI
    heat_map: str | None  # data URI
    note: str


def _records(searcher: Searcher, ids: list[str]) -> dict[str, RegionRecord]:
    if searcher.index.features is None or not ids:
        return {}
    wanted = list(dict.fromkeys(ids))
    return {record.image_id: record for record in searcher.index.store.read(wanted)}


def render_search_page(
    result: SearchResult,
    searcher: Searcher,
    *,
    images_dir: str | Path | None = None,
    explain: bool = True,
    header: str = "",
) -> str:
    """The HTML page of `result` (see the module docstring); `header` is trusted HTML put above it (the
    query form of `scan-pipe serve`)."""
    root = Path(images_dir) if images_dir is not None else None
    if root is not None and not root.is_dir():
        raise SearchPageError(f"{root}: images folder not found")
    heat_maps = HeatMaps(searcher) if explain else None
    image_query = result.target == "captions"
    ids = [result.query["image_id"]] if image_query else [hit.image_id for hit in result.hits]
    records = _records(searcher, ids)
    notes = list(result.notes)
    if searcher.index.features is None:
        notes.append("feature store not reachable: no boxes")
    if root is None:
        notes.append("no images folder given (--images): boxes on grey canvases")
    query_image = None
    if image_query:
        image_id = result.query["image_id"]
        picture, note = picture_of(records.get(image_id), root / image_id if root else None)
        query_image = (_data_uri(with_boxes(picture, records.get(image_id))) if picture else None, note)
    cards: list[Card] = []
    for hit in result.hits:
        image_id = result.query["image_id"] if image_query else hit.image_id
        record = records.get(image_id)
        picture, note = picture_of(record, root / image_id if root else None)
        heat = None
        if heat_maps is not None and picture is not None:
            heat = heat_maps.heat_map(record, hit.caption if image_query else result.query["text"], picture)
        shown = None if image_query or picture is None else _data_uri(with_boxes(picture, record))
        cards.append(
            Card(
                rank=hit.rank,
                title=hit.image_id,
                score=hit.score,
                shortlist_rank=hit.shortlist_rank,
                shortlist_score=hit.shortlist_score,
                caption=hit.caption,
                image=shown,
                heat_map=None if heat is None else _data_uri(heat),
                note=note,
            )
        )
    if heat_maps is not None and heat_maps.reason:
        notes.append(heat_maps.reason)
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    template = environment.get_template("search.html.j2")
    return template.render(
        result=result, cards=cards, notes=notes, query_image=query_image, header=markupsafe.Markup(header)
    )


def write_search_page(
    result: SearchResult,
    searcher: Searcher,
    path: str | Path,
    *,
    images_dir: str | Path | None = None,
    explain: bool = True,
) -> Path:
    """Render and write the page atomically."""
    path = Path(path)
    write_text_atomic(path, render_search_page(result, searcher, images_dir=images_dir, explain=explain))
    return path
