"""Captions of one split as a Parquet table: `image_id`, `caption`, in SCAN's consecutive layout.

SCAN's data and evaluation assume caption j belongs to image j // captions_per_image, so the table keeps each
image's captions in consecutive rows and every image has the same number of captions. Both properties are
checked on write and on read, so a malformed table fails early with the file named instead of silently
scoring the wrong pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_output
from pipeline.errors import UserError

CAPTIONS_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string(), nullable=False), pa.field("caption", pa.string(), nullable=False)]
)


class CaptionsError(UserError):
    """A captions table is missing or violates the layout; the message names the file."""


@dataclass(frozen=True)
class CaptionTable:
    """The captions of a split: `image_ids[j]` is the image of `captions[j]`, grouped per image."""

    image_ids: list[str]
    captions: list[str]
    captions_per_image: int

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def unique_image_ids(self) -> list[str]:
        """The split's images in table order (one per group of `captions_per_image` captions)."""
        return self.image_ids[:: self.captions_per_image]

    @property
    def num_images(self) -> int:
        """Number of images in the split."""
        return len(self.captions) // self.captions_per_image if self.captions_per_image else 0

    def captions_of(self, image_index: int) -> list[str]:
        """The captions of image number `image_index` (table order)."""
        start = image_index * self.captions_per_image
        return self.captions[start : start + self.captions_per_image]


def check_caption_layout(source: str, image_ids: Sequence[str], expected_per_image: int | None = None) -> int:
    """Check that each image's captions are consecutive and equally many; return that count.

    `source` names the file (or caller) in error messages.
    """
    if not image_ids:
        raise CaptionsError(f"{source}: no captions")
    group_sizes: list[int] = []
    group_ids: list[str] = []
    for image_id in image_ids:
        if group_ids and group_ids[-1] == image_id:
            group_sizes[-1] += 1
        else:
            group_ids.append(image_id)
            group_sizes.append(1)
    seen: dict[str, int] = {}
    for position, image_id in enumerate(group_ids):
        if image_id in seen:
            raise CaptionsError(
                f"{source}: captions of image {image_id!r} are not consecutive "
                f"(groups {seen[image_id]} and {position} of the table)"
            )
        seen[image_id] = position
    per_image = group_sizes[0]
    for image_id, size in zip(group_ids, group_sizes, strict=True):
        if size != per_image:
            raise CaptionsError(
                f"{source}: image {image_id!r} has {size} captions but {group_ids[0]!r} has {per_image}; "
                "every image needs the same number of captions"
            )
    if expected_per_image is not None and per_image != expected_per_image:
        raise CaptionsError(f"{source}: {per_image} captions per image, expected {expected_per_image}")
    return per_image


def write_captions(
    path: str | Path,
    image_ids: Sequence[str],
    captions: Sequence[str],
    *,
    captions_per_image: int | None = None,
) -> Path:
    """Validate and write a captions table atomically."""
    path = Path(path)
    if len(image_ids) != len(captions):
        raise CaptionsError(f"{path}: {len(image_ids)} image ids but {len(captions)} captions")
    check_caption_layout(str(path), image_ids, captions_per_image)
    table = pa.Table.from_pydict(
        {"image_id": [str(i) for i in image_ids], "caption": [str(c) for c in captions]},
        schema=CAPTIONS_SCHEMA,
    )
    with atomic_output(path) as tmp_path:
        pq.write_table(table, tmp_path, compression="zstd")
    return path


def read_captions(path: str | Path, *, captions_per_image: int | None = None) -> CaptionTable:
    """Read and validate a captions table (optionally requiring a given number of captions per image)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"{path}: captions file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise CaptionsError(f"{path}: not a readable Parquet file: {exc}") from exc
    for field in CAPTIONS_SCHEMA:
        if field.name not in table.column_names:
            raise CaptionsError(f"{path}: missing column {field.name!r} (has {table.column_names})")
        if not pa.types.is_string(table.schema.field(field.name).type) and not pa.types.is_large_string(
            table.schema.field(field.name).type
        ):
            raise CaptionsError(
                f"{path}: column {field.name!r} must be strings, not {table.schema.field(field.name).type}"
            )
        if table.column(field.name).null_count:
            raise CaptionsError(f"{path}: column {field.name!r} has missing values")
    image_ids = table.column("image_id").to_pylist()
    captions = table.column("caption").to_pylist()
    per_image = check_caption_layout(str(path), image_ids, captions_per_image)
    return CaptionTable(image_ids=image_ids, captions=captions, captions_per_image=per_image)
