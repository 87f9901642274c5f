"""Finding and decoding the images of a dataset, robustly, the way the Caffe reference read them.

The reference extractor called `cv2.imread(path)` (IMREAD_COLOR): every image becomes 8-bit, 3-channel BGR,
with grayscale replicated, alpha dropped, palettes expanded, 16-bit samples reduced to their high byte and
CMYK converted by libjpeg. We decode with `cv2.imdecode(..., IMREAD_COLOR)` from the file's bytes, which runs
the same code (and works for non-ASCII paths on every platform).

Before decoding, the JPEG/PNG header is parsed here so that bad input is refused with a reason instead of
crashing a worker or eating all memory: empty files, files that are not JPEG/PNG, truncated files (a JPEG
without its end-of-image marker, a PNG without its IEND chunk: some OpenCV versions silently grey-fill those)
and decompression bombs (dimensions read from the header and checked against a pixel limit before any
allocation).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from pipeline.errors import UserError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
# Same default limit as Pillow's `Image.MAX_IMAGE_PIXELS` (about 89.5 Mpx, a 1024 MiB 24-bit image / 4 / 3).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers carry the dimensions (C4 = DHT, C8 = JPG extension and CC = DAC are not frames).
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_PNG_COLOR_TYPES = {0: "gray", 2: "rgb", 3: "palette", 4: "gray+alpha", 6: "rgba"}

# Well-known signatures of formats we do not accept, so the error says what the file really is.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class ImageListError(UserError):
    """The images folder or list file is unusable; the message names the path (and line) at fault."""


class ImageDecodeError(UserError):
    """One image cannot be used. `kind` is a short machine-readable category for the errors file."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says, read without decoding pixels."""

    format: str  # "jpeg" or "png"
    width: int
    height: int
    channels: int
    bit_depth: int
    color: str  # gray, rgb, rgba, palette, gray+alpha, ycbcr, cmyk, ycck

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodedImage:
    """An image as the detector wants it: HxWx3 uint8 BGR, plus what conversion produced it."""

    image: np.ndarray
    header: ImageHeader
    conversion: str


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def list_images(root: str | Path) -> list[str]:
    """All jpg/jpeg/png files below `root` (recursive, case-insensitive suffix), sorted POSIX relative paths.

    The relative path is the image id, so it must not depend on the platform or on the walk order.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageListError(f"{root}: images folder not found (or not a directory)")
    image_ids: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in filenames:
            if _is_image_name(filename):
                relative = Path(dirpath, filename).relative_to(root)
                image_ids.append(relative.as_posix())
    image_ids.sort()
    return image_ids


def read_image_list(list_file: str | Path) -> list[str]:
    """Image ids from a list file: one path per line, relative to the images folder, in file order.

    Blank lines and lines starting with `#` are ignored. Absolute paths, paths leaving the images folder and
    duplicates are errors naming the line, because they would give ambiguous or colliding image ids.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ImageListError(f"{list_file}: image list file not found")
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ImageListError(f"{list_file}: not UTF-8 text ({exc})") from None
    image_ids: list[str] = []
    first_line: dict[str, int] = {}
    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        path = PurePosixPath(line.replace("\\", "/"))
        if path.is_absolute() or (len(line) > 1 and line[1] == ":"):
            raise ImageListError(
                f"{list_file}:{line_number}: {line!r} is absolute; paths must be relative to --images"
            )
        if ".." in path.parts:
            raise ImageListError(f"{list_file}:{line_number}: {line!r} leaves the images folder ('..')")
        image_id = path.as_posix()
        if image_id in first_line:
            raise ImageListError(
                f"{list_file}:{line_number}: {image_id!r} is listed twice "
                f"(first on line {first_line[image_id]})"
            )
        first_line[image_id] = line_number
        image_ids.append(image_id)
    if not image_ids:
        raise ImageListError(f"{list_file}: the image list is empty")
    return image_ids


def _parse_jpeg_header(data: bytes) -> ImageHeader:
    size = len(data)
    position = 2
    frame: tuple[int, int, int, int] | None = None  # precision, height, width, components
    adobe_transform: int | None = None
    while True:
        if position >= size:
            raise ImageDecodeError("truncated JPEG: the file ends inside its header", "truncated")
        if data[position] != 0xFF:
            raise ImageDecodeError(
                f"corrupt JPEG: expected a marker at byte {position}, found 0x{data[position]:02x}", "corrupt"
            )
        while position < size and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= size:
            raise ImageDecodeError("truncated JPEG: the file ends inside its header", "truncated")
        marker = data[position]
        position += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise ImageDecodeError("corrupt JPEG: end-of-image marker before any image data", "corrupt")
        if position + 2 > size:
            raise ImageDecodeError("truncated JPEG: the file ends inside its header", "truncated")
        (length,) = struct.unpack(">H", data[position : position + 2])
        if length < 2:
            raise ImageDecodeError(f"corrupt JPEG: segment length {length} at byte {position}", "corrupt")
        segment_end = position + length
        if segment_end > size:
            raise ImageDecodeError("truncated JPEG: the file ends inside a header segment", "truncated")
        payload = data[position + 2 : segment_end]
        if marker in _JPEG_SOF_MARKERS:
            if len(payload) < 6:
                raise ImageDecodeError("corrupt JPEG: start-of-frame segment too short", "corrupt")
            frame = struct.unpack(">BHHB", payload[:6])
        elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe_transform = payload[11]
        elif marker == 0xDA:
            if frame is None:
                raise ImageDecodeError("corrupt JPEG: image data before any start-of-frame header", "corrupt")
            # Entropy-coded data never contains FF D9 (0xFF bytes are stuffed), so its first occurrence after
            # the scan header is the end-of-image marker; without it the file was cut short.
            if data.find(b"\xff\xd9", segment_end) < 0:
                raise ImageDecodeError("truncated JPEG: no end-of-image marker (file cut short)", "truncated")
            break
        position = segment_end
    precision, height, width, components = frame
    if width == 0 or height == 0:
        raise ImageDecodeError(f"unsupported JPEG: header gives size {width}x{height}", "unsupported")
    if components == 1:
        color = "gray"
    elif components == 3:
        color = "rgb" if adobe_transform == 0 else "ycbcr"
    elif components == 4:
        color = "ycck" if adobe_transform == 2 else "cmyk"
    else:
        raise ImageDecodeError(f"unsupported JPEG: {components} colour components", "unsupported")
    return ImageHeader("jpeg", width, height, components, precision, color)


def _parse_png_header(data: bytes) -> ImageHeader:
    size = len(data)
    position = len(_PNG_SIGNATURE)
    if size < position + 8 + 13 + 4 or data[position + 4 : position + 8] != b"IHDR":
        if size < position + 8 + 13 + 4:
            raise ImageDecodeError("truncated PNG: the file ends inside its header", "truncated")
        raise ImageDecodeError("corrupt PNG: the first chunk is not IHDR", "corrupt")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[position + 8 : position + 18])
    if color_type not in _PNG_COLOR_TYPES:
        raise ImageDecodeError(f"corrupt PNG: unknown colour type {color_type}", "corrupt")
    if width == 0 or height == 0:
        raise ImageDecodeError(f"corrupt PNG: header gives size {width}x{height}", "corrupt")
    seen_image_data = False
    while True:
        if position + 8 > size:
            raise ImageDecodeError("truncated PNG: no IEND chunk (file cut short)", "truncated")
        length, chunk_type = struct.unpack(">I4s", data[position : position + 8])
        position += 12 + length
        if position > size:
            raise ImageDecodeError(
                "truncated PNG: the file ends inside a chunk (file cut short)", "truncated"
            )
        if chunk_type == b"IDAT":
            seen_image_data = True
        elif chunk_type == b"IEND":
            break
    if not seen_image_data:
        raise ImageDecodeError("corrupt PNG: no image data (IDAT) chunk", "corrupt")
    color = _PNG_COLOR_TYPES[color_type]
    channels = {"gray": 1, "rgb": 3, "palette": 1, "gray+alpha": 2, "rgba": 4}[color]
    return ImageHeader("png", width, height, channels, bit_depth, color)


def read_image_header(data: bytes) -> ImageHeader:
    """Format, size and colour layout of a JPEG or PNG, validated for truncation without decoding pixels."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)", "empty")
    if data.startswith(_JPEG_SOI):
        return _parse_jpeg_header(data)
    if data.startswith(_PNG_SIGNATURE):
        return _parse_png_header(data)
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            raise ImageDecodeError(
                f"unsupported format: a {name} file, only JPEG and PNG are read", "unsupported"
            )
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        raise ImageDecodeError("unsupported format: a WebP file, only JPEG and PNG are read", "unsupported")
    preview = data[:8].hex(" ")
    raise ImageDecodeError(
        f"not an image: no JPEG or PNG signature (starts with bytes {preview})", "not_image"
    )


def describe_conversion(header: ImageHeader) -> str:
    """How IMREAD_COLOR turns this layout into 8-bit BGR, in words (logged per image, cheap)."""
    steps: list[str] = []
    if header.bit_depth == 16:
        steps.append("16-bit to 8-bit (high byte)")
    elif header.bit_depth < 8:
        steps.append(f"{header.bit_depth}-bit to 8-bit")
    steps.append(
        {
            "gray": "grayscale replicated to BGR",
            "gray+alpha": "grayscale replicated to BGR, alpha dropped",
            "rgb": "RGB to BGR",
            "ycbcr": "YCbCr to BGR",
            "rgba": "RGBA to BGR, alpha dropped",
            "palette": "palette expanded to BGR",
            "cmyk": "CMYK to BGR",
            "ycck": "YCCK to BGR",
        }[header.color]
    )
    return ", ".join(steps)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode JPEG/PNG bytes to HxWx3 uint8 BGR exactly as `cv2.imread(path, IMREAD_COLOR)` would.

    Raises ImageDecodeError (with a `kind`) for empty, truncated, corrupt, non-image or oversized input; the
    size limit is checked on the header's dimensions before any pixel memory is allocated.
    """
    header = read_image_header(data)
    if header.pixels > max_pixels:
        raise ImageDecodeError(
            f"image too large: {header.width}x{header.height} = {header.pixels} pixels exceeds the limit of "
            f"{max_pixels} (possible decompression bomb; raise max_image_pixels to accept it)",
            "too_large",
        )
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageDecodeError(
            f"OpenCV could not decode this {header.format.upper()} data (corrupt file)", "corrupt"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageDecodeError(
            f"decoder returned shape {image.shape} {image.dtype}, expected HxWx3 uint8", "decode_failed"
        )
    # EXIF orientation (applied by IMREAD_COLOR, as by cv2.imread) may swap the header's width and height.
    if sorted(image.shape[:2]) != sorted((header.height, header.width)):
        raise ImageDecodeError(
            f"decoded size {image.shape[1]}x{image.shape[0]} differs from the header's "
            f"{header.width}x{header.height}",
            "corrupt",
        )
    return DecodedImage(np.ascontiguousarray(image), header, describe_conversion(header))


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> DecodedImage:
    """Read a file's bytes (np.fromfile: any path encoding) and decode it; see `decode_image`.

    Raises ImageDecodeError for every per-image problem, including a missing or unreadable file, so that a
    caller can record it and go on.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8).tobytes()
    except FileNotFoundError:
        raise ImageDecodeError("file not found", "not_found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not an image file", "not_found") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}", "unreadable") from None
    return decode_image(data, max_pixels=max_pixels)
