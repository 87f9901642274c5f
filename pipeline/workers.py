"""Process start method for DataLoader workers, shared by extraction and training."""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext


def worker_context() -> BaseContext:
    """Start loader workers without forking the parent.

    A parent that already ran thread pools (torch, OpenCV, tokenizers) can deadlock its forked children:
    seen in the test suite as a decode worker hung in `cv2.setNumThreads`. forkserver forks from a clean,
    single-threaded server process; spawn is the portable fallback.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
