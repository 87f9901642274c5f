"""Finding the images of a dataset and naming them: image ids, list files, symlinks, refused names.

Image ids are paths relative to the images root, kept byte-for-byte as the file system names them: no
Unicode normalisation (an NFD name stays NFD), no case folding, and on POSIX no `\\` to `/` rewriting in list
files. An id that is not valid UTF-8 or holds control characters cannot be stored and is refused with a record
naming the file escaped; a symlink that leads outside the images root is refused unless following is asked.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.errors import UserError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")


class ImageListError(UserError):
    """The images folder or list file is unusable; the message names the path (and line) at fault."""


@dataclass(frozen=True)
class ImageRefusal:
    """A file that never becomes an image id: `image_id` is its relative path, printable (escaped)."""

    image_id: str
    kind: str
    reason: str


@dataclass
class ImageListing:
    """The image ids of a run, and the files refused before decoding (bad names, symlinks out of the root)."""

    image_ids: list[str]
    refused: list[ImageRefusal] = field(default_factory=list)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def printable_id(image_id: str) -> str:
    r"""`image_id` with what cannot be stored escaped: bytes that are not UTF-8 (surrogate escapes from the
    file system) as `\xNN`, control characters as Python escapes (`\n`, `\x1b`)."""
    if not any(_unstorable(char) for char in image_id):
        return image_id
    parts = []
    for char in image_id:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # os.fsdecode's escape of an undecodable byte
            parts.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif _unstorable(char):
            parts.append(char.encode("unicode_escape").decode("ascii"))
        else:
            parts.append(char)
    return "".join(parts)


def _unstorable(char: str) -> bool:
    return 0xD800 <= ord(char) <= 0xDFFF or unicodedata.category(char) == "Cc"


def name_problem(image_id: str) -> str | None:
    """Why `image_id` cannot be an id (it is stored as a UTF-8 string and written one per line), or None."""
    if any(0xD800 <= ord(char) <= 0xDFFF for char in image_id):
        return "file name is not valid UTF-8 (the id could not be stored); rename the file"
    if any(unicodedata.category(char) == "Cc" for char in image_id):
        return "file name contains control characters (newline, tab, escape, ...); rename the file"
    return None


def _inside(real_path: str, real_root: str) -> bool:
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


def _outside_root(relative: str, target: str) -> ImageRefusal:
    return ImageRefusal(
        printable_id(relative),
        "symlink_outside_root",
        f"symlink outside images root (leads to {printable_id(target)}; extract.follow_symlinks: true "
        "follows it)",
    )


def scan_images(root: str | Path, *, follow_symlinks: bool = False) -> ImageListing:
    """Every jpg/jpeg/png file below `root` (recursive, case-insensitive suffix), as sorted POSIX relative
    paths, plus what is refused instead of listed.

    The relative path is the image id, kept byte-for-byte as the file system names it (no Unicode
    normalisation), so it depends neither on the platform nor on the walk order. Refused, each with a
    record: names that are not valid UTF-8 or hold control characters; symlinks (to a file or a folder)
    that lead outside `root`, unless `follow_symlinks`; symlinked folders that loop back to a folder
    above them; subfolders that cannot be read. Symlinks inside `root` are followed.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageListError(f"{root}: images folder not found (or not a directory)")
    real_root = os.path.realpath(root)
    listing = ImageListing([])
    # (id prefix, folder path, real paths of the folder and its ancestors: a symlink back to one is a loop)
    stack: list[tuple[str, str, tuple[str, ...]]] = [("", os.fspath(root), (real_root,))]
    while stack:
        prefix, folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            if not prefix:
                raise ImageListError(f"{root}: cannot list the images folder: {exc.strerror}") from None
            listing.refused.append(
                ImageRefusal(printable_id(prefix[:-1]), "unreadable", f"cannot list folder: {exc.strerror}")
            )
            continue
        for entry in reversed(entries):  # the stack pops in name order
            relative = prefix + entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if not is_dir and not _is_image_name(entry.name):
                continue
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if not follow_symlinks and not _inside(real, real_root):
                    listing.refused.append(_outside_root(relative, real))
                    continue
            else:
                real = os.path.join(ancestors[-1], entry.name)
            if is_dir:
                if real in ancestors:
                    listing.refused.append(
                        ImageRefusal(
                            printable_id(relative),
                            "symlink_loop",
                            "symlink loop: the folder leads back to a folder above it",
                        )
                    )
                else:
                    stack.append((relative + "/", entry.path, (*ancestors, real)))
                continue
            problem = name_problem(relative)
            if problem is None:
                listing.image_ids.append(relative)
            else:
                listing.refused.append(ImageRefusal(printable_id(relative), "invalid_name", problem))
    listing.image_ids.sort()
    listing.refused.sort(key=lambda refusal: refusal.image_id)
    return listing


def list_images(root: str | Path, *, follow_symlinks: bool = False) -> list[str]:
    """The image ids of `scan_images` (what it refuses is left out)."""
    return scan_images(root, follow_symlinks=follow_symlinks).image_ids


def read_image_list(list_file: str | Path) -> list[str]:
    r"""Image ids from a list file: one path per line, relative to the images folder, in file order.

    Entries are kept as written (on POSIX a `\` is part of a file name, not a separator; no Unicode
    normalisation); only surrounding whitespace, `./` and doubled slashes are dropped. Blank lines and lines
    starting with `#` are ignored. Absolute paths, paths leaving the images folder and duplicates are errors
    naming the line, because they would give ambiguous or colliding image ids.
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
        if os.name == "nt":  # Windows: either separator, and drive letters are absolute
            line = line.replace("\\", "/")
        path = PurePosixPath(line)
        if path.is_absolute() or (os.name == "nt" and len(line) > 1 and line[1] == ":"):
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


def check_listed(
    root: str | Path, image_ids: Iterable[str], *, follow_symlinks: bool = False
) -> ImageListing:
    """A list file's ids, minus the refused ones: names that cannot be stored, paths that a symlink leads
    outside `root` (unless `follow_symlinks`), and entries that match a file only after Unicode normalisation
    (ids are not normalised: an NFC entry does not name an NFD file). Missing files stay in: decoding
    records them as not found."""
    root = Path(root)
    real_root = os.path.realpath(root)
    listing = ImageListing([])
    for image_id in image_ids:
        problem = name_problem(image_id)
        if problem is not None:
            listing.refused.append(ImageRefusal(printable_id(image_id), "invalid_name", problem))
            continue
        path = os.path.join(root, image_id)
        if not follow_symlinks:
            real = os.path.realpath(path)
            if not _inside(real, real_root):
                listing.refused.append(_outside_root(image_id, real))
                continue
        if not os.path.lexists(path):
            variant = _normalised_variant(root, image_id)
            if variant is not None:
                form, name = variant
                listing.refused.append(
                    ImageRefusal(
                        image_id,
                        "not_found",
                        f"file not found as written; its Unicode {form} form {name!r} exists (ids are kept "
                        "byte-for-byte, not normalised: list the name as the file system spells it)",
                    )
                )
                continue
        listing.image_ids.append(image_id)
    return listing


def _normalised_variant(root: Path, image_id: str) -> tuple[str, str] | None:
    for form in ("NFC", "NFD"):
        name = unicodedata.normalize(form, image_id)
        if name != image_id and os.path.lexists(os.path.join(root, name)):
            return form, name
    return None
