"""Decoding the images of a dataset, robustly, the way the Caffe reference read them.

The reference extractor called `cv2.imread(path)` (IMREAD_COLOR) under OpenCV 2.4: every image becomes 8-bit,
3-channel BGR, with grayscale replicated, alpha dropped, palettes expanded, 16-bit samples reduced to their
high byte and CMYK converted by libjpeg. We decode with `cv2.imdecode` from the file's bytes, which runs the
same code (and works for non-ASCII paths on every platform). OpenCV 2.4 did not apply the EXIF orientation
tag; OpenCV >= 3.1 does, so the EXIF policy is explicit (`exif="ignore"`, the reference's behaviour, adds
IMREAD_IGNORE_ORIENTATION; `"apply"` rotates as today's `cv2.imread` does) and the tag is reported either way.

Before decoding, the JPEG/PNG structure is parsed here so that bad input is refused with a reason instead of
crashing a worker or eating all memory: empty files, files that are not JPEG/PNG (described by type, never by
their bytes), truncated files (a JPEG whose scan data stops early, a PNG without its IEND chunk) and
decompression bombs (dimensions read from the header and checked against a pixel limit before any
allocation). A JPEG that lacks only its end-of-image marker is decoded as libjpeg does (with a warning).

Finding the files and naming them (ids) is `pipeline/image_files.py`.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import UserError

# Memory of one image on its way to the detector, per decoded pixel: the uint8 BGR image (3 bytes), then the
# bottom-up-attention preprocessing's float32 copy (12) and the float64 result of the reference's mean
# subtraction (24) alive at the same time: 39 bytes, 13x the decoded size (measured with tracemalloc).
PREPROCESS_BYTES_PER_PIXEL = 39
# 50 Mpx keeps that peak at 50e6 x 39 B = 1.95 GB (< 2 GiB) for the largest accepted image. Pillow's
# 89.5 Mpx would allow 3.5 GB.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# No JPEG or PNG within the pixel limit is larger than this (16-bit RGBA stored uncompressed is 8 bytes a
# pixel), so a bigger file is refused before it is read into memory.
_MAX_FILE_BYTES_PER_PIXEL = 8
_MAX_FILE_SLACK = 64 << 20  # metadata (ICC profiles, EXIF, text chunks)

EXIF_POLICIES: tuple[str, ...] = ("ignore", "apply")
# EXIF orientations that swap width and height (transpose, rotate 90 CW, transverse, rotate 90 CCW).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
JPEG_WITHOUT_END_MARKER = "JPEG without end-of-image marker (decoded as libjpeg does)"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers carry the dimensions (C4 = DHT, C8 = JPG extension and CC = DAC are not frames).
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_PROGRESSIVE_MARKERS = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length field.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# The next marker after entropy-coded data: 0xFF (plus fill bytes) followed by anything but a stuffed zero or
# a restart marker, which both belong to the data.
_JPEG_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
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
    (b"\x1f\x8b", "gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


class ImageDecodeError(UserError):
    """One image cannot be used. `kind` is a short machine-readable category for the errors file."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class ImageHeader:
    """What the file's structure says, read without decoding pixels."""

    format: str  # "jpeg" or "png"
    width: int  # as stored, before any EXIF orientation
    height: int
    channels: int
    bit_depth: int
    color: str  # gray, rgb, rgba, palette, gray+alpha, ycbcr, cmyk, ycck
    orientation: int = 1  # EXIF orientation tag (1..8); 1 when absent or invalid
    missing_end_marker: bool = False  # JPEG ending inside its last scan's data, every scan present

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodedImage:
    """An image as the detector wants it: HxWx3 uint8 BGR, plus what conversion produced it."""

    image: np.ndarray
    header: ImageHeader
    conversion: str
    warnings: tuple[str, ...] = ()  # accepted oddities, counted in the run summary


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of IFD0 in an EXIF TIFF block; 1 when absent or not 1..8."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    magic, ifd = struct.unpack(order + "HI", tiff[2:8])
    if magic != 42 or ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, number = struct.unpack(order + "HHI", tiff[entry : entry + 8])
        if tag == 0x0112:
            if kind != 3 or number < 1:  # SHORT
                return 1
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _scans_cover(
    component_ids: list[int], scans: list[tuple[set[int], int, int, int]], progressive: bool
) -> bool:
    """Whether the scans code every coefficient of every component to full precision (sequential: every
    component appears in a scan; progressive: every coefficient 0..63 in a scan with Al = 0)."""
    for component in component_ids:
        if not progressive:
            if not any(component in members for members, _, _, _ in scans):
                return False
            continue
        done = [False] * 64
        for members, start, end, low_bit in scans:
            if component in members and low_bit == 0:
                for k in range(start, min(end, 63) + 1):
                    done[k] = True
        if not all(done):
            return False
    return True


def _parse_jpeg_header(data: bytes) -> ImageHeader:
    size = len(data)
    position = 2
    frame: tuple[int, int, int, int] | None = None  # precision, height, width, components
    component_ids: list[int] = []
    progressive = False
    adobe_transform: int | None = None
    orientation: int | None = None
    scans: list[tuple[set[int], int, int, int]] = []  # components, Ss, Se, Al
    ended_in_scan = False
    while True:
        if scans:  # after the first scan header: skip entropy-coded data (and stray bytes) to the next marker
            match = _JPEG_NEXT_MARKER.search(data, position)
            if match is None:
                ended_in_scan = True
                break
            position = match.start(1)
        else:
            if position >= size:
                raise ImageDecodeError("truncated JPEG: the file ends inside its header", "truncated")
            if data[position] != 0xFF:
                raise ImageDecodeError(f"corrupt JPEG: no marker at byte {position}", "corrupt")
            while position < size and data[position] == 0xFF:  # fill bytes
                position += 1
            if position >= size:
                raise ImageDecodeError("truncated JPEG: the file ends inside its header", "truncated")
        marker = data[position]
        position += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            if not scans:
                raise ImageDecodeError("corrupt JPEG: end-of-image marker before any image data", "corrupt")
            break
        if position + 2 > size:
            raise ImageDecodeError("truncated JPEG: the file ends inside a header segment", "truncated")
        (length,) = struct.unpack(">H", data[position : position + 2])
        if length < 2:
            raise ImageDecodeError(f"corrupt JPEG: segment length {length} at byte {position}", "corrupt")
        segment_end = position + length
        if segment_end > size:
            raise ImageDecodeError("truncated JPEG: the file ends inside a header segment", "truncated")
        payload = data[position + 2 : segment_end]
        if marker in _JPEG_SOF_MARKERS and frame is None:
            if len(payload) < 6:
                raise ImageDecodeError("corrupt JPEG: start-of-frame segment too short", "corrupt")
            frame = struct.unpack(">BHHB", payload[:6])
            component_ids = list(payload[6 : 6 + 3 * frame[3] : 3])
            progressive = marker in _JPEG_PROGRESSIVE_MARKERS
        elif marker == 0xE1 and orientation is None and payload.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(payload[6:])
        elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe_transform = payload[11]
        elif marker == 0xDA:
            if frame is None:
                raise ImageDecodeError("corrupt JPEG: image data before any start-of-frame header", "corrupt")
            count = payload[0] if payload else 0
            if len(payload) < 1 + 2 * count + 3:
                raise ImageDecodeError("corrupt JPEG: start-of-scan segment too short", "corrupt")
            members = set(payload[1 : 1 + 2 * count : 2])
            start, end, bits = payload[1 + 2 * count : 4 + 2 * count]
            scans.append((members, start, end, bits & 0x0F))
        position = segment_end
    # Without its end-of-image marker a JPEG is still whole when every scan is there and the last one's data
    # is complete; libjpeg decodes it with a warning. Missing scans are truncation; the last scan's data is
    # checked when decoding (`_decode_without_end_marker`).
    if ended_in_scan and not _scans_cover(component_ids, scans, progressive):
        raise ImageDecodeError(
            "truncated JPEG: no end-of-image marker and scans are missing (file cut short)", "truncated"
        )
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
    return ImageHeader("jpeg", width, height, components, precision, color, orientation or 1, ended_in_scan)


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
    orientation = 1
    while True:
        if position + 8 > size:
            raise ImageDecodeError("truncated PNG: no IEND chunk (file cut short)", "truncated")
        length, chunk_type = struct.unpack(">I4s", data[position : position + 8])
        chunk_start = position + 8
        position += 12 + length
        if position > size:
            raise ImageDecodeError(
                "truncated PNG: the file ends inside a chunk (file cut short)", "truncated"
            )
        if chunk_type == b"IDAT":
            seen_image_data = True
        elif chunk_type == b"eXIf":
            orientation = _exif_orientation(data[chunk_start : chunk_start + length])
        elif chunk_type == b"IEND":
            break
    if not seen_image_data:
        raise ImageDecodeError("corrupt PNG: no image data (IDAT) chunk", "corrupt")
    color = _PNG_COLOR_TYPES[color_type]
    channels = {"gray": 1, "rgb": 3, "palette": 1, "gray+alpha": 2, "rgba": 4}[color]
    return ImageHeader("png", width, height, channels, bit_depth, color, orientation)


def _describe_unknown(data: bytes) -> str:
    """What a file without an image signature looks like, in words: never its bytes (errors are shared)."""
    head = data[:512]
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIF/HEIC image, only JPEG and PNG are read"
        if brand.startswith(b"avi"):
            return "an AVIF image, only JPEG and PNG are read"
        return "an MP4/QuickTime-style media file"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download error page?)"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<svg"):
        return "XML/SVG text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # text cut inside a character at the 512-byte mark is still text
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 and len(data) > 512 else None
    if text is not None and all(char.isprintable() or char in "\r\n\t" for char in text):
        return "text"
    return "binary data of an unknown format"


def read_image_header(data: bytes) -> ImageHeader:
    """Format, size, colour layout and EXIF orientation of a JPEG or PNG, validated for truncation without
    decoding pixels."""
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
    description = _describe_unknown(data)
    if description.startswith(("a HEIF", "an AVIF")):
        raise ImageDecodeError(f"unsupported format: {description}", "unsupported")
    raise ImageDecodeError(f"not an image: no JPEG or PNG signature (looks like {description})", "not_image")


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


def _imdecode(data: bytes, flags: int) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)


def _decode_without_end_marker(data: bytes, flags: int) -> np.ndarray | None:
    """Decode a JPEG that lacks only its end-of-image marker, as libjpeg does (it supplies the marker).

    The last scan's data may still be cut short: libjpeg then grey-fills the rest. To tell, the file is also
    decoded with padding (zero bits, then one bits) before the marker: complete data leaves the padding
    unread and gives the same pixels; cut data reads it as image data and gives other pixels.
    """
    end = b"\xff\xd9"
    image = _imdecode(data + end, flags)
    if image is None:
        return None
    for padding in (bytes(64), b"\xff\x00" * 32):
        padded = _imdecode(data + padding + end, flags)
        if padded is None or not np.array_equal(image, padded):
            raise ImageDecodeError(
                "truncated JPEG: no end-of-image marker and the image data stops early (file cut short)",
                "truncated",
            )
    return image


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, exif: str = "ignore"
) -> DecodedImage:
    """Decode JPEG/PNG bytes to HxWx3 uint8 BGR as `cv2.imread(path, IMREAD_COLOR)` does, the EXIF
    orientation tag ignored (`exif="ignore"`, as OpenCV 2.4 and so the Caffe reference) or applied
    (`"apply"`, as OpenCV >= 3.1 does by default).

    Raises ImageDecodeError (with a `kind`) for empty, truncated, corrupt, non-image or oversized input; the
    size limit is checked on the header's dimensions before any pixel memory is allocated.
    """
    if exif not in EXIF_POLICIES:
        raise ValueError(f"exif must be one of {EXIF_POLICIES}, got {exif!r}")
    header = read_image_header(data)
    if header.pixels > max_pixels:
        raise ImageDecodeError(
            f"image too large: {header.width}x{header.height} = {header.pixels} pixels exceeds the limit of "
            f"{max_pixels} (possible decompression bomb; raise max_image_pixels to accept it)",
            "too_large",
        )
    flags = cv2.IMREAD_COLOR if exif == "apply" else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    warnings: tuple[str, ...] = ()
    if header.missing_end_marker:
        image = _decode_without_end_marker(data, flags)
        warnings = (JPEG_WITHOUT_END_MARKER,)
    else:
        image = _imdecode(data, flags)
    if image is None:
        raise ImageDecodeError(
            f"OpenCV could not decode this {header.format.upper()} data (corrupt file)", "corrupt"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageDecodeError(
            f"decoder returned shape {image.shape} {image.dtype}, expected HxWx3 uint8", "decode_failed"
        )
    expected = (header.height, header.width)
    if exif == "apply" and header.orientation in _SWAPPING_ORIENTATIONS:
        expected = (header.width, header.height)
    if image.shape[:2] != expected:
        raise ImageDecodeError(
            f"decoded size {image.shape[1]}x{image.shape[0]} differs from the header's "
            f"{header.width}x{header.height} (EXIF orientation {header.orientation}, exif={exif})",
            "corrupt",
        )
    return DecodedImage(np.ascontiguousarray(image), header, describe_conversion(header), warnings)


def max_file_bytes(max_pixels: int) -> int:
    """The largest file accepted for reading: no JPEG or PNG within `max_pixels` needs more."""
    return _MAX_FILE_BYTES_PER_PIXEL * max_pixels + _MAX_FILE_SLACK


def load_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, exif: str = "ignore"
) -> DecodedImage:
    """Read a regular file's bytes (any path encoding) and decode it; see `decode_image`.

    Raises ImageDecodeError for every per-image problem, including a missing, unreadable, special (FIFO,
    device) or oversized file, so that a caller can record it and go on.
    """
    path = Path(path)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError("is a directory, not an image file", "not_found")
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError("not a regular file (a FIFO, device or socket)", "not_image")
        limit = max_file_bytes(max_pixels)
        if info.st_size > limit:
            raise ImageDecodeError(
                f"file too large: {info.st_size} bytes, more than a JPEG/PNG within the pixel limit of "
                f"{max_pixels} can take ({limit} bytes; raise max_image_pixels to accept it)",
                "too_large",
            )
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise ImageDecodeError("file not found", "not_found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not an image file", "not_found") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}", "unreadable") from None
    if len(data) > limit:
        raise ImageDecodeError(f"file too large: more than {limit} bytes", "too_large")
    return decode_image(data, max_pixels=max_pixels, exif=exif)
