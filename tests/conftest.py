"""Shared test helpers: where the conformance fixtures live, and skipping when they are absent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fixtures sit in ../shared beside the checkout; SCAN_PIPE_SHARED overrides that.
SHARED_DIR = Path(os.environ.get("SCAN_PIPE_SHARED", REPO_ROOT.parent / "shared"))
SCAN_FIXTURES = SHARED_DIR / "fixtures" / "scan"
BUA_FIXTURES = SHARED_DIR / "fixtures" / "bua"
SCAN_OFFICIAL_FIXTURES = SHARED_DIR / "fixtures" / "scan_official"


def _require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(
            f"conformance fixtures not found at {folder} (expected ../shared/fixtures beside the repository; "
            "set SCAN_PIPE_SHARED to the shared folder)"
        )
    return folder


@pytest.fixture(scope="session")
def scan_fixtures() -> Path:
    """Folder of the SCAN conformance fixtures (skips the test when it is absent)."""
    return _require(SCAN_FIXTURES)


@pytest.fixture(scope="session")
def bua_fixtures() -> Path:
    """Folder of the bottom-up-attention detector fixtures (skips the test when it is absent)."""
    return _require(BUA_FIXTURES)


@pytest.fixture(scope="session")
def scan_official_fixtures() -> Path:
    """Folder of the official-SCAN import fixtures: checkpoints, vocabulary, precomp data, expected values."""
    return _require(SCAN_OFFICIAL_FIXTURES)


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny models and tensors: torch's intra-op threads only add overhead (and stall badly on a loaded
    2-core machine, 10-40x slower measured). Modules opt in with `pytest.mark.usefixtures`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
