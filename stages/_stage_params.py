"""Shared by the sample/prepare/tokenize commands: load a params section or fail with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, TypeVar

import typer
from rich.console import Console

from pipeline.params import Params, ParamsError, Section, load_section

SectionT = TypeVar("SectionT", bound=Section)

error_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a red error for a user mistake and exit (no traceback)."""
    error_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def stage_section(params_path: Path | None, name: str, expected: type[SectionT]) -> SectionT:
    """The `name` section of params.yaml (whole file validated first); schema defaults without a file."""
    if params_path is None:
        section = getattr(Params(), name)
    else:
        try:
            section = load_section(params_path, name)
        except ParamsError as exc:
            fail(str(exc), code=2)
    if not isinstance(section, expected):
        raise TypeError(f"params section {name!r} is {type(section).__name__}, not {expected.__name__}")
    return section
