"""Deterministic synthetic image-caption dataset: the embedded sample the default pipeline runs on.

Each image is a scene of one to three coloured shapes on a solid, gradient, noise or striped background;
five differently worded captions describe it (word order, synonyms, relations, counts). The output is a
folder of JPEGs plus a Karpathy-format `dataset.json`, so `prepare` treats the sample exactly like Flickr30K.

Determinism: everything random comes from one `numpy.random.Generator` seeded by `seed`, images are drawn
with integer coordinates and saved with fixed JPEG encoder settings, and the JSON is serialised with sorted
keys, so the same seed gives byte-identical files (on the same Pillow/libjpeg build).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.atomic import write_bytes_atomic
from pipeline.progress import progress_bar

SHAPES: dict[str, tuple[str, ...]] = {
    # canonical name -> synonyms used in captions (the first one is the canonical word)
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape", "wedge"),
    "star": ("star", "five-pointed star", "star shape"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
    "hexagon": ("hexagon", "six-sided shape", "hexagonal tile"),
    "cross": ("cross", "plus sign", "cross shape"),
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    # kind -> phrases ("a {colour} {phrase}")
    "solid": ("plain background", "plain backdrop", "uniform background"),
    "gradient": ("gradient background", "fading background", "shaded backdrop"),
    "noise": ("noisy background", "speckled background", "grainy backdrop"),
    "stripes": ("striped background", "background of stripes", "striped backdrop"),
}

SIZES: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
PICTURE_WORDS = ("picture", "image", "photo", "drawing")

# Fixed JPEG encoder settings: part of the determinism guarantee.
JPEG_SETTINGS: dict[str, object] = {
    "format": "JPEG",
    "quality": 90,
    "subsampling": 0,
    "optimize": False,
    "progressive": False,
}


@dataclass(frozen=True)
class SampleShape:
    """One object of a scene: what it is, where it is (centre, in pixels) and how big."""

    shape: str
    colour: str
    size: str
    center_x: int
    center_y: int
    radius: int


@dataclass(frozen=True)
class SampleScene:
    """Everything drawn in one image (the source of its captions)."""

    background: str
    background_colour: str
    objects: tuple[SampleShape, ...]


@dataclass(frozen=True)
class SampleSummary:
    """What `generate_sample` wrote."""

    dataset_json: Path
    images_dir: Path
    num_images: dict[str, int]
    num_captions: int


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _distinct(rng: np.random.Generator, options: Sequence[str], count: int) -> list[str]:
    order = rng.permutation(len(options))
    return [options[int(i)] for i in order[:count]]


def random_scene(rng: np.random.Generator, image_size: int, max_objects: int) -> SampleScene:
    """Draw a scene: shapes of distinct colours in distinct horizontal thirds, so relations are clear."""
    num_objects = int(rng.integers(1, max_objects + 1))
    background = _pick(rng, tuple(BACKGROUNDS))
    colours = _distinct(rng, tuple(COLOURS), num_objects + 1)
    background_colour, object_colours = colours[0], colours[1:]
    # Column slots left to right; the objects take distinct slots so "left of" is always true for the pair.
    slots = sorted(int(s) for s in rng.permutation(3)[:num_objects])
    slot_width = image_size / 3
    objects = []
    for slot, colour in zip(slots, object_colours, strict=True):
        size = _pick(rng, ("small", "large"))
        radius_fraction = rng.uniform(0.09, 0.12) if size == "small" else rng.uniform(0.14, 0.16)
        radius = max(3, round(radius_fraction * image_size))
        center_x = round(slot_width * (slot + 0.5) + rng.uniform(-0.1, 0.1) * slot_width)
        center_y = round(rng.uniform(0.3, 0.7) * image_size)
        objects.append(
            SampleShape(
                shape=_pick(rng, tuple(SHAPES)),
                colour=colour,
                size=size,
                center_x=center_x,
                center_y=center_y,
                radius=radius,
            )
        )
    return SampleScene(background=background, background_colour=background_colour, objects=tuple(objects))


def _regular_polygon(cx: int, cy: int, radius: int, sides: int, rotation: float) -> list[tuple[int, int]]:
    return [
        (
            round(cx + radius * math.cos(rotation + 2 * math.pi * k / sides)),
            round(cy + radius * math.sin(rotation + 2 * math.pi * k / sides)),
        )
        for k in range(sides)
    ]


def _star(cx: int, cy: int, radius: int) -> list[tuple[int, int]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((round(cx + r * math.cos(angle)), round(cy + r * math.sin(angle))))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SampleShape) -> None:
    cx, cy, r = obj.center_x, obj.center_y, obj.radius
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        half = round(r * 0.85)
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, -math.pi / 2), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon(_regular_polygon(cx, cy, r, 4, -math.pi / 2), fill=fill)
    elif obj.shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif obj.shape == "cross":
        arm = max(1, round(r * 0.33))
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _background(rng: np.random.Generator, kind: str, colour: str, image_size: int) -> np.ndarray:
    """An (H, W, 3) uint8 background; the kind's texture is mixed with its colour so both are visible."""
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    light = 0.5 * base + 0.5 * 255.0
    dark = 0.5 * base
    if kind == "solid":
        pixels = np.broadcast_to(base, (image_size, image_size, 3)).copy()
    elif kind == "gradient":
        ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
        weight = ramp[None, :, None] if rng.integers(2) == 0 else ramp[:, None, None]
        weight = np.broadcast_to(weight, (image_size, image_size, 1))
        pixels = dark * (1 - weight) + light * weight
    elif kind == "noise":
        noise = rng.uniform(-60.0, 60.0, size=(image_size, image_size, 1)).astype(np.float32)
        pixels = base + noise
    elif kind == "stripes":
        period = int(rng.integers(8, 17))
        coords = np.arange(image_size)
        if rng.integers(2) == 0:
            band = ((coords[None, :] // period) % 2).astype(np.float32)
        else:
            band = ((coords[:, None] // period) % 2).astype(np.float32)
        band = np.broadcast_to(band, (image_size, image_size))[..., None]
        pixels = dark * (1 - band) + light * band
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, scene: SampleScene, image_size: int) -> Image.Image:
    """Paint the background, then the shapes in left-to-right order."""
    pixels = _background(rng, scene.background, scene.background_colour, image_size)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    return image


# -- captions ------------------------------------------------------------------------------------------------


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, obj: SampleShape, *, with_size: bool = True) -> str:
    words = []
    if with_size:
        words.append(_pick(rng, SIZES[obj.size]))
    words.append(obj.colour)
    words.append(_pick(rng, SHAPES[obj.shape]))
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}"


def _background_phrase(rng: np.random.Generator, scene: SampleScene) -> str:
    phrase = f"{scene.background_colour} {_pick(rng, BACKGROUNDS[scene.background])}"
    return f"{_article(phrase)} {phrase}"


def _position_word(obj: SampleShape, image_size: int) -> str:
    third = obj.center_x * 3 // image_size
    return ("on the left", "in the middle", "on the right")[min(2, third)]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _caption_relation(rng: np.random.Generator, scene: SampleScene, image_size: int) -> str:
    """'a large red circle to the left of a small blue square on a green striped background'."""
    objs = scene.objects
    if len(objs) == 1:
        return f"{_noun_phrase(rng, objs[0])} on {_background_phrase(rng, scene)}"
    left, right = objs[0], objs[-1]
    relation = _pick(rng, ("to the left of", "left of", "beside"))
    text = f"{_noun_phrase(rng, left)} {relation} {_noun_phrase(rng, right)}"
    if len(objs) == 3:
        text += f" with {_noun_phrase(rng, objs[1])} between them"
    return text


def _caption_count(rng: np.random.Generator, scene: SampleScene, image_size: int) -> str:
    """'two shapes on a green striped background: a red circle and a blue square'."""
    count = len(scene.objects)
    noun = "shape" if count == 1 else "shapes"
    if rng.integers(2) == 0:
        noun = "object" if count == 1 else "objects"
    parts = [_noun_phrase(rng, obj, with_size=bool(rng.integers(2))) for obj in scene.objects]
    return f"{NUMBER_WORDS[count]} {noun} on {_background_phrase(rng, scene)}: {_join(parts)}"


def _caption_positions(rng: np.random.Generator, scene: SampleScene, image_size: int) -> str:
    """'there is a small blue square on the right and a large red circle on the left'."""
    objs = list(scene.objects)
    order = rng.permutation(len(objs))
    parts = [f"{_noun_phrase(rng, objs[int(i)])} {_position_word(objs[int(i)], image_size)}" for i in order]
    opener = _pick(rng, ("there is", "we see", "you can see"))
    return f"{opener} {_join(parts)}"


def _caption_picture(rng: np.random.Generator, scene: SampleScene, image_size: int) -> str:
    """'a drawing of a yellow star and a big purple hexagon over a black noisy background'."""
    parts = [_noun_phrase(rng, obj, with_size=bool(rng.integers(2))) for obj in scene.objects]
    picture = _pick(rng, PICTURE_WORDS)
    preposition = _pick(rng, ("on", "over", "against"))
    return f"{_article(picture)} {picture} of {_join(parts)} {preposition} {_background_phrase(rng, scene)}"


def _caption_background_first(rng: np.random.Generator, scene: SampleScene, image_size: int) -> str:
    """'on a green striped background the red circle is larger than the blue square'."""
    objs = scene.objects
    background = _background_phrase(rng, scene)
    if len(objs) >= 2 and objs[0].size != objs[-1].size:
        big, small = (objs[0], objs[-1]) if objs[0].size == "large" else (objs[-1], objs[0])
        shape_big = _pick(rng, SHAPES[big.shape])
        shape_small = _pick(rng, SHAPES[small.shape])
        if rng.integers(2) == 0:
            clause = f"the {big.colour} {shape_big} is bigger than the {small.colour} {shape_small}"
        else:
            clause = f"the {small.colour} {shape_small} is smaller than the {big.colour} {shape_big}"
    else:
        verbs = ("appear", "are shown", "are drawn") if len(objs) > 1 else ("appears", "is shown", "is drawn")
        clause = f"{_join([_noun_phrase(rng, obj) for obj in objs])} {_pick(rng, verbs)}"
    return f"on {background} {clause}"


CAPTION_TEMPLATES: tuple[Callable[[np.random.Generator, SampleScene, int], str], ...] = (
    _caption_relation,
    _caption_count,
    _caption_positions,
    _caption_picture,
    _caption_background_first,
)

_TOKEN_PATTERN = re.compile(r"[a-z0-9]+")


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lower-case words, punctuation dropped (the `tokens` field of dataset.json)."""
    return _TOKEN_PATTERN.findall(caption.lower())


def scene_captions(rng: np.random.Generator, scene: SampleScene, image_size: int) -> list[str]:
    """Five captions, one per template, shuffled per image (caption 0 is not always the same kind)."""
    captions = [template(rng, scene, image_size) for template in CAPTION_TEMPLATES]
    order = rng.permutation(len(captions))
    return [captions[int(i)] for i in order]


# -- writing -------------------------------------------------------------------------------------------------


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes with the fixed encoder settings (no timestamps or other varying metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, **JPEG_SETTINGS)
    return buffer.getvalue()


def generate_sample(
    out_dir: str | Path,
    *,
    seed: int,
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int,
    max_objects: int = 3,
    show_progress: bool = True,
) -> SampleSummary:
    """Write `out_dir/images/*.jpg` and `out_dir/dataset.json` (Karpathy format, dataset "sample")."""
    if not 1 <= max_objects <= 3:
        raise ValueError(
            f"max_objects must be between 1 and 3 (one object per third of the image), got {max_objects}"
        )
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    rng = np.random.default_rng(seed)
    entries = []
    sentence_id = 0
    with progress_bar("img", disable=not show_progress) as progress:
        task = progress.add_task("sample", total=len(splits))
        for image_index, split in enumerate(splits):
            scene = random_scene(rng, image_size, max_objects)
            image = render_scene(rng, scene, image_size)
            filename = f"sample_{image_index:06d}.jpg"
            write_bytes_atomic(images_dir / filename, encode_jpeg(image))
            captions = scene_captions(rng, scene, image_size)
            sentences = []
            for caption in captions:
                sentences.append(
                    {
                        "raw": caption,
                        "tokens": caption_tokens(caption),
                        "imgid": image_index,
                        "sentid": sentence_id,
                    }
                )
                sentence_id += 1
            entries.append(
                {
                    "filename": filename,
                    "filepath": "",
                    "split": split,
                    "imgid": image_index,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences,
                    "scene": {
                        "background": scene.background,
                        "background_colour": scene.background_colour,
                        "objects": [
                            {
                                "shape": obj.shape,
                                "colour": obj.colour,
                                "size": obj.size,
                                "box": [
                                    obj.center_x - obj.radius,
                                    obj.center_y - obj.radius,
                                    obj.center_x + obj.radius,
                                    obj.center_y + obj.radius,
                                ],
                            }
                            for obj in scene.objects
                        ],
                    },
                }
            )
            progress.advance(task)
    dataset = {"dataset": "sample", "seed": seed, "image_size": image_size, "images": entries}
    dataset_json = out_dir / "dataset.json"
    write_bytes_atomic(dataset_json, (json.dumps(dataset, sort_keys=True, indent=1) + "\n").encode("utf-8"))
    return SampleSummary(
        dataset_json=dataset_json,
        images_dir=images_dir,
        num_images={"train": num_train, "val": num_val, "test": num_test},
        num_captions=sentence_id,
    )
