"""Atomic, durable file output: readers never see half a file, a killed run never leaves one behind, and a
power loss never turns a finished file into a truncated one.

Durable means fsynced: the file's data before it gets its final name, then the directory that holds the
name. Without both, a crash soon after a write can leave the new name pointing at zero or half the bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which is not thread-safe to do per call.
_UMASK = _current_umask()


def fsync_file(path: str | Path) -> None:
    """Flush a file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | Path) -> None:
    """Flush a directory's entries (a new, renamed or removed name) to the disk.

    A file system that cannot fsync a directory (EINVAL) is left as it is: there is nothing more to do.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A new empty file `.NAME.<random>.tmp` beside `path`, removed on exit unless it was renamed away.

    mkstemp creates files 0600; results are shared (CI artifacts, the DVC cache, a web server), so the file
    gets the umask's mode, as open() would give.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        yield tmp_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it durably replaces `path`, on failure it goes.

    The temporary name starts with a dot and ends in `.tmp`.
    """
    path = Path(path)
    with _temporary_beside(path) as tmp_path:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    fsync_directory(path.parent)


@contextlib.contextmanager
def publish_new(path: str | Path) -> Iterator[Path]:
    """Like `atomic_output`, but never replaces an existing file: FileExistsError when `path` exists.

    The finished temporary is hard-linked to `path` (link fails on an existing name, where os.replace would
    silently overwrite it), so two writers that pick the same name cannot destroy each other's file; the
    loser gets FileExistsError and can pick another name. Either way the temporary is gone afterwards.
    """
    path = Path(path)
    with _temporary_beside(path) as tmp_path:
        yield tmp_path
        fsync_file(tmp_path)
        os.link(tmp_path, path)
    fsync_directory(path.parent)


def replace_directory(staging: str | Path, destination: str | Path) -> None:
    """Move a fully written `staging` directory to `destination`, replacing an earlier version.

    The earlier version is renamed aside first and deleted only once the new one is in place, so a reader
    sees the old directory or the new one, never a mix; the parent directory entry is made durable.
    """
    staging, destination = Path(staging), Path(destination)
    previous: Path | None = None
    if destination.exists():
        previous = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(destination, previous)
    os.replace(staging, destination)
    fsync_directory(destination.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_output(path) as tmp_path:
        tmp_path.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))
