"""One run per feature store: an exclusive lock on the store directory, released by the OS when its holder
ends.

A second run fails at once, naming the holder, rather than mixing its parts and clean-up into a live run; a
crash never blocks a rerun (flock ends with its last descriptor). The ranks of one torchrun job are one run:
rank 0 holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.store import LOCK_FILE, FeatureStoreError


class StoreLockedError(FeatureStoreError):
    """Another run holds the store directory's lock; the message names that run."""


# Descriptors of the store locks this process holds. A forked child (a DataLoader worker) inherits them and
# would keep the lock after its parent is killed; it closes its copies at once, which leaves the parent's
# lock as it is (a flock belongs to the open file and ends when its last descriptor closes).
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock_holder(fd: int) -> str:
    """The run a lock file names, as words for an error message."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except ValueError:
        holder = None
    if not isinstance(holder, dict):
        return "a run that is just starting"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
        f"{holder.get('command')}"
    )


@contextlib.contextmanager
def store_lock(root: str | Path, *, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock of the store directory `root` (created if missing) for one run.

    A second run fails at once with StoreLockedError naming the holder (host, pid, start time, command)
    rather than waiting or mixing its parts and clean-up into a live run. The lock is a `flock` on
    `root/_scan_pipe.lock`, which the operating system releases when the holder ends, killed or not: a
    crash never blocks a rerun. The file holds the holder's JSON while locked and is empty otherwise, so
    the directory's content does not depend on who wrote it last.

    The ranks of one torchrun job are one run: rank 0 takes the lock and the other ranks, which would be
    refused, do not; they wait at a barrier until rank 0 holds it. Yields the holder record.
    """
    root = Path(root)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(
                f"{root} is in use by another run ({_lock_holder(fd)}); wait for it to end, or write to "
                "another directory"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join((command if command is not None else shlex.join(sys.argv)).split()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder, sort_keys=True).encode(), 0)
        _HELD_LOCKS.add(fd)
        try:
            yield holder
        finally:
            _HELD_LOCKS.discard(fd)
            os.ftruncate(fd, 0)
            if created and [entry.name for entry in os.scandir(root)] == [LOCK_FILE]:
                # A run that made the directory and wrote nothing leaves nothing behind (still locked here).
                os.unlink(root / LOCK_FILE)
                os.rmdir(root)
    finally:
        os.close(fd)  # the last descriptor of the open file: the lock goes with it
