"""Image listing and robust decoding (pipeline/images.py): cv2.imread semantics, and bad input refused."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.image_files import ImageListError, list_images, read_image_list
from pipeline.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    JPEG_WITHOUT_END_MARKER,
    PREPROCESS_BYTES_PER_PIXEL,
    ImageDecodeError,
    decode_image,
    load_image,
    max_file_bytes,
    read_image_header,
)
from pipeline.params import ExtractParams


def _rgb(height: int = 30, width: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# ----------------------------------------------------------------------------------------------- listing


def test_list_images_recursive_sorted_posix_case_insensitive(tmp_path: Path) -> None:
    jpeg = _pil_bytes(Image.fromarray(_rgb()), "JPEG")
    for name in ["b/z.JPG", "a.jpeg", "b/a.png", "c/d/e.Jpg", "notes.txt", "b/skip.gif", "ünï/ç.jpg"]:
        _write(tmp_path / name, jpeg)
    ids = list_images(tmp_path)
    assert ids == sorted(["a.jpeg", "b/a.png", "b/z.JPG", "c/d/e.Jpg", "ünï/ç.jpg"])
    assert all("\\" not in image_id for image_id in ids)


def test_list_images_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(ImageListError, match="nope"):
        list_images(tmp_path / "nope")


def test_read_image_list_keeps_order_and_skips_comments(tmp_path: Path) -> None:
    list_file = _write(tmp_path / "list.txt", b"# header\nb/2.jpg\n\n  a/1.png  \nsub\\c.jpg\n./d//e.jpg\n")
    # On POSIX a backslash is part of a file name: kept as written, not turned into a separator.
    assert read_image_list(list_file) == ["b/2.jpg", "a/1.png", "sub\\c.jpg", "d/e.jpg"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a.jpg\n/abs/b.jpg\n", r"list\.txt:2: .*absolute"),
        (b"a.jpg\n../up.jpg\n", r"list\.txt:2: .*leaves the images folder"),
        (b"a.jpg\nb.jpg\na.jpg\n", r"list\.txt:3: .*listed twice \(first on line 1\)"),
        (b"# nothing\n\n", r"list\.txt: the image list is empty"),
        (b"\xff\xfe\x00bad", r"list\.txt: not UTF-8"),
    ],
)
def test_read_image_list_errors_name_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    list_file = _write(tmp_path / "list.txt", content)
    with pytest.raises(ImageListError, match=message):
        read_image_list(list_file)


def test_read_image_list_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageListError, match=r"missing\.txt: image list file not found"):
        read_image_list(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------- valid images


def test_rgb_jpeg_matches_cv2_imread(tmp_path: Path) -> None:
    path = _write(tmp_path / "rgb.jpg", _pil_bytes(Image.fromarray(_rgb(37, 53)), "JPEG", quality=90))
    decoded = load_image(path)
    reference = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert decoded.image.dtype == np.uint8 and decoded.image.shape == (37, 53, 3)
    np.testing.assert_array_equal(decoded.image, reference)
    assert decoded.header.format == "jpeg" and decoded.header.color == "ycbcr"
    assert (decoded.header.width, decoded.header.height) == (53, 37)


def test_rgb_png_is_channel_reversed_exactly(tmp_path: Path) -> None:
    rgb = _rgb()
    decoded = decode_image(_pil_bytes(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(decoded.image, rgb[:, :, ::-1])
    assert decoded.conversion == "RGB to BGR"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_is_replicated_to_three_channels(tmp_path: Path, fmt: str) -> None:
    gray = Image.fromarray(_rgb()).convert("L")
    path = _write(tmp_path / f"gray.{fmt.lower()}", _pil_bytes(gray, fmt))
    decoded = load_image(path)
    assert decoded.image.shape == (30, 40, 3)
    np.testing.assert_array_equal(decoded.image, cv2.imread(str(path), cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(decoded.image[:, :, 0], decoded.image[:, :, 2])
    if fmt == "PNG":  # lossless: the replicated channel is the stored gray value
        np.testing.assert_array_equal(decoded.image[:, :, 1], np.asarray(gray))
    assert "grayscale replicated" in decoded.conversion


def test_cmyk_jpeg_converted_like_cv2_imread(tmp_path: Path) -> None:
    rgb = _rgb()
    path = _write(tmp_path / "cmyk.jpg", _pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    decoded = load_image(path)
    assert decoded.header.channels == 4 and decoded.header.color in {"cmyk", "ycck"}
    assert decoded.image.shape == (30, 40, 3)
    np.testing.assert_array_equal(decoded.image, cv2.imread(str(path), cv2.IMREAD_COLOR))
    # Colours survive the round trip (JPEG loss aside).
    assert np.abs(decoded.image.astype(int) - rgb[:, :, ::-1].astype(int)).mean() < 20
    assert "CMYK" in decoded.conversion or "YCCK" in decoded.conversion


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_reduced_to_high_byte(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(3)
    shape = (20, 24) if channels == 1 else (20, 24, 3)
    samples = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", samples)
    assert ok
    path = _write(tmp_path / "deep.png", encoded.tobytes())
    decoded = load_image(path)
    assert decoded.header.bit_depth == 16
    expected = (samples >> 8).astype(np.uint8)
    if channels == 1:
        expected = np.repeat(expected[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(decoded.image, expected)
    np.testing.assert_array_equal(decoded.image, cv2.imread(str(path), cv2.IMREAD_COLOR))
    assert decoded.conversion.startswith("16-bit to 8-bit")


def test_palette_png_expanded(tmp_path: Path) -> None:
    palette_image = Image.fromarray(_rgb()).convert("P")
    decoded = decode_image(_pil_bytes(palette_image, "PNG"))
    np.testing.assert_array_equal(decoded.image, np.asarray(palette_image.convert("RGB"))[:, :, ::-1])
    assert decoded.conversion == "palette expanded to BGR"


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_not_composited(tmp_path: Path, mode: str) -> None:
    rgb = _rgb()
    alpha = np.full(rgb.shape[:2], 9, dtype=np.uint8)  # nearly transparent: compositing would darken
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        expected = rgb[:, :, ::-1]
    else:
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        image = Image.fromarray(np.dstack([gray, alpha]), "LA")
        expected = np.repeat(gray[:, :, None], 3, axis=2)
    decoded = decode_image(_pil_bytes(image, "PNG"))
    np.testing.assert_array_equal(decoded.image, expected)
    assert "alpha dropped" in decoded.conversion


def _with_orientation(orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise on display
    return _pil_bytes(Image.fromarray(_rgb(30, 40)), fmt, exif=exif.tobytes())


def test_exif_orientation_ignored_by_default_as_opencv_2_4(tmp_path: Path) -> None:
    path = _write(tmp_path / "rot.jpg", _with_orientation(6))
    decoded = load_image(path)
    assert decoded.header.orientation == 6 and decoded.image.shape[:2] == (30, 40)
    stored = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    np.testing.assert_array_equal(decoded.image, stored)


def test_exif_orientation_applied_like_imread(tmp_path: Path) -> None:
    path = _write(tmp_path / "rot.jpg", _with_orientation(6))
    decoded = load_image(path, exif="apply")
    np.testing.assert_array_equal(decoded.image, cv2.imread(str(path), cv2.IMREAD_COLOR))
    assert decoded.image.shape[:2] == (40, 30)
    np.testing.assert_array_equal(decoded.image, np.rot90(load_image(path).image, k=-1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_orientation_tag_read_like_pil_and_sizes_checked(fmt: str, orientation: int) -> None:
    data = _with_orientation(orientation, fmt)
    assert read_image_header(data).orientation == Image.open(io.BytesIO(data)).getexif()[0x0112]
    swapped = orientation in (5, 6, 7, 8)
    assert decode_image(data).image.shape[:2] == (30, 40)
    assert decode_image(data, exif="apply").image.shape[:2] == ((40, 30) if swapped else (30, 40))


def test_no_orientation_tag_reads_as_1() -> None:
    assert read_image_header(_pil_bytes(Image.fromarray(_rgb()), "JPEG")).orientation == 1
    assert read_image_header(_pil_bytes(Image.fromarray(_rgb()), "PNG")).orientation == 1


def test_non_ascii_path(tmp_path: Path) -> None:
    rgb = _rgb()
    path = _write(tmp_path / "dossier é" / "图像 ñ.png", _pil_bytes(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(load_image(path).image, rgb[:, :, ::-1])


def test_jpeg_with_trailing_bytes_after_end_marker_is_fine() -> None:
    data = _pil_bytes(Image.fromarray(_rgb()), "JPEG") + b"\x00" * 16
    assert decode_image(data).image.shape == (30, 40, 3)


# ---------------------------------------------------------------------------------------- bad input


def _kind(data: bytes, **kwargs: object) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return info.value


def test_empty_file() -> None:
    error = _kind(b"")
    assert error.kind == "empty" and "0 bytes" in error.reason


@pytest.mark.parametrize("fraction", [0.002, 0.05, 0.5, 0.95])
def test_truncated_jpeg(fraction: float) -> None:
    data = _pil_bytes(Image.fromarray(_rgb(120, 160)), "JPEG")
    error = _kind(data[: max(3, int(len(data) * fraction))])
    assert error.kind == "truncated" and "truncated JPEG" in error.reason


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_missing_only_its_end_marker_is_decoded_with_a_warning(progressive: bool) -> None:
    # libjpeg (so the Caffe-era cv2.imread) decodes it and warns "Premature end of JPEG file".
    data = _pil_bytes(Image.fromarray(_rgb(120, 160)), "JPEG", progressive=progressive)
    assert data.endswith(b"\xff\xd9")
    whole = decode_image(data)
    decoded = decode_image(data[:-2])
    np.testing.assert_array_equal(decoded.image, whole.image)
    assert decoded.warnings == (JPEG_WITHOUT_END_MARKER,) and whole.warnings == ()


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("missing", [1, 2, 40])
def test_jpeg_missing_scan_data_is_truncated(progressive: bool, missing: int) -> None:
    # Without its end marker and `missing` bytes of the last scan's data: still truncated.
    data = _pil_bytes(Image.fromarray(_rgb(120, 160)), "JPEG", progressive=progressive)
    error = _kind(data[: -2 - missing])
    assert error.kind == "truncated" and "truncated JPEG" in error.reason


def test_progressive_jpeg_cut_between_scans_is_truncated() -> None:
    # Cut cleanly before a later scan: every byte present decodes, but scans are missing.
    data = _pil_bytes(Image.fromarray(_rgb(120, 160)), "JPEG", progressive=True)
    scan_starts = [match.start() for match in re.finditer(rb"\xff\xda", data)]
    assert len(scan_starts) > 3
    for cut in scan_starts[1:]:
        error = _kind(data[:cut])
        assert error.kind == "truncated" and "scans are missing" in error.reason, cut


@pytest.mark.parametrize("cut", [12, 30, -20, -4])
def test_truncated_png(cut: int) -> None:
    data = _pil_bytes(Image.fromarray(_rgb(120, 160)), "PNG")
    error = _kind(data[:cut])
    assert error.kind == "truncated" and "truncated PNG" in error.reason


def test_corrupt_png_data_is_refused() -> None:
    data = bytearray(_pil_bytes(Image.fromarray(_rgb(60, 80)), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 10 : idat + 60] = bytes(50)  # damage compressed data, chunk structure intact
    error = _kind(bytes(data))
    assert error.kind == "corrupt"


@pytest.mark.parametrize(
    ("data", "kind", "words"),
    [
        (b"this is a text file, not an image\n", "not_image", "no JPEG or PNG signature (looks like text)"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "not_image", "HTML page"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(16), "unsupported", "HEIF/HEIC"),
        (b"GIF89a" + bytes(40), "unsupported", "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "unsupported", "WebP"),
        (b"\xff\xd8\xff\xd9", "corrupt", "end-of-image marker before any image data"),
    ],
)
def test_non_images_are_named(data: bytes, kind: str, words: str) -> None:
    error = _kind(data)
    assert error.kind == kind and words in error.reason


def test_png_decompression_bomb_refused_from_header() -> None:
    # A 100000 x 100000 PNG header (10 Gpx) with a token IDAT: must be refused before any allocation.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    assert read_image_header(data).pixels == 10**10
    error = _kind(data)
    assert (
        error.kind == "too_large"
        and "100000x100000" in error.reason
        and str(DEFAULT_MAX_IMAGE_PIXELS) in error.reason
    )


def test_jpeg_decompression_bomb_refused_from_header() -> None:
    data = bytearray(_pil_bytes(Image.fromarray(_rgb()), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    error = _kind(bytes(data))
    assert error.kind == "too_large" and "60000x60000" in error.reason


def test_pixel_limit_is_configurable() -> None:
    data = _pil_bytes(Image.fromarray(_rgb(30, 40)), "PNG")
    assert _kind(data, max_pixels=1199).kind == "too_large"
    assert decode_image(data, max_pixels=1200).image.shape == (30, 40, 3)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "gone.jpg")
    assert info.value.kind == "not_found"
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "folder.jpg")
    assert info.value.kind == "not_found"


def test_errors_never_echo_file_bytes() -> None:
    secret = b"password=hunter2 \x13\x37\xde\xad\xbe\xef" * 4
    for data in (secret, b"\x89\x50" + secret, bytes(range(256))):
        reason = _kind(data).reason
        assert "hunter2" not in reason and "13 37" not in reason and "de ad" not in reason, reason
        assert data[:8].hex(" ") not in reason and data[:8].hex() not in reason, reason


def test_special_and_oversized_files_are_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would block for ever
    with pytest.raises(ImageDecodeError, match="not a regular file") as info:
        load_image(fifo)
    assert info.value.kind == "not_image"
    big = _write(tmp_path / "big.png", _pil_bytes(Image.fromarray(_rgb()), "PNG"))
    with open(big, "ab") as file:
        file.truncate(max_file_bytes(100) + 1)  # sparse: no disk used
    with pytest.raises(ImageDecodeError, match="file too large") as info:
        load_image(big, max_pixels=100)
    assert info.value.kind == "too_large"


def test_memory_bound_of_the_default_pixel_limit() -> None:
    # The stated bound: the largest accepted image peaks under 2 GiB in decode + preprocessing.
    assert ExtractParams().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert DEFAULT_MAX_IMAGE_PIXELS * PREPROCESS_BYTES_PER_PIXEL < 2 * 1024**3


def test_preprocessing_memory_factor_is_what_the_limit_assumes() -> None:
    tracemalloc = pytest.importorskip("tracemalloc")
    from extractors.bua.preprocess import image_blob

    image = _rgb(1500, 2000)  # large against the detector's 600 x 1000 input, as the images the limit is for
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        image_blob(image)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    per_pixel = 3 + peak / image[..., 0].size  # the decoded image plus what preprocessing adds at its peak
    assert per_pixel <= PREPROCESS_BYTES_PER_PIXEL + 0.5, per_pixel
