"""Shared test helpers: where the conformance fixtures live, and skipping when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fixtures sit in ../shared beside the checkout; SCAN_PIPE_SHARED overrides that.
SHARED_DIR = Path(os.environ.get("SCAN_PIPE_SHARED", REPO_ROOT.parent / "shared"))
SCAN_FIXTURES = SHARED_DIR / "fixtures" / "scan"
BUA_FIXTURES = SHARED_DIR / "fixtures" / "bua"


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
