"""The CLI answers `--help` without loading the heavy libraries: each command imports them when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

HEAVY = (
    "torch",
    "torchvision",
    "cv2",
    "pyarrow",
    "matplotlib",
    "pandas",
    "tokenizers",
    "transformers",
    "extractors.bua",
)


def test_building_the_cli_imports_no_heavy_library() -> None:
    code = (
        "import json, sys\n"
        "from typer.main import get_command\n"
        "import stages.cli\n"
        "get_command(stages.cli.app)\n"  # registers every command and sub-app, as `scan-pipe --help` does
        f"print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_every_stage_command_is_registered() -> None:
    from typer.main import get_command

    import stages.cli

    commands = set(get_command(stages.cli.app).commands)  # type: ignore[attr-defined]
    expected = {"sample", "prepare", "extract", "tokenize", "train", "evaluate", "report", "compare"}
    assert expected <= commands
