"""The kit every stage shell uses: one way to fail, one way to get a validated params section.

A stage merges three layers into its section, later ones winning: the schema defaults (or params.yaml's
section, the whole file validated first), the stage's named options (`--epochs 3`), and generic
`--set key=value` assignments for any key of the section (the value is parsed as YAML, so `--set
lambda_softmax=4` and `--set amp=false` work). The result is validated once, by the section's schema, and an
error names the option it came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from pipeline.errors import UserError
from pipeline.params import Params, ParamsError, Section, load_section

SectionT = TypeVar("SectionT", bound=Section)

EXIT_ERROR = 1
EXIT_USAGE = 2

error_console = Console(stderr=True)

SET_HELP = "Override any key of this stage's params section, KEY=VALUE (YAML value); repeatable."


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print a red one-line error for a user mistake and exit (no traceback)."""
    # The message may quote a file's own bytes (a tensor name, an id): print it as text, never as markup.
    error_console.print(
        f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


@contextmanager
def user_errors(code: int = EXIT_ERROR) -> Iterator[None]:
    """Turn a library `UserError` into `fail(message)`; every other exception keeps its traceback."""
    try:
        yield
    except UserError as exc:
        fail(str(exc), code=code)


def parse_assignments(assignments: Sequence[str], section_name: str) -> dict[str, Any]:
    """`["lambda_softmax=4", "amp=false"]` -> `{"lambda_softmax": 4, "amp": False}` (values read as YAML)."""
    parsed: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key.startswith(f"{section_name}."):
            key = key[len(section_name) + 1 :]
        if not sep or not key:
            fail(f"--set {item!r}: expected KEY=VALUE", code=EXIT_USAGE)
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key] = raw
    return parsed


def stage_section(
    params_path: Path | None,
    name: str,
    expected: type[SectionT],
    options: Mapping[str, Any] | None = None,
    assignments: Sequence[str] = (),
) -> SectionT:
    """Section `name` of params.yaml (schema defaults without a file) with the given options on top.

    `options` are the stage's named CLI options (None: not given); `assignments` are `--set` values.
    """
    if params_path is None:
        section = getattr(Params(), name)
    else:
        try:
            section = load_section(params_path, name)
        except ParamsError as exc:
            fail(str(exc), code=EXIT_USAGE)
    if not isinstance(section, expected):
        raise TypeError(f"params section {name!r} is {type(section).__name__}, not {expected.__name__}")
    named = {key: value for key, value in (options or {}).items() if value is not None}
    generic = parse_assignments(assignments, name)
    if not named and not generic:
        return section
    try:
        return expected.model_validate({**section.model_dump(exclude_unset=True), **generic, **named})
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            key = ".".join(str(part) for part in item["loc"])
            top = str(item["loc"][0]) if item["loc"] else ""
            source = (
                f"--{top.replace('_', '-')}"
                if top in named
                else f"--set {name}.{key}"
                if top in generic
                else f"{name}.{key}".rstrip(".")
            )
            got = f" (got {item['input']!r})" if "input" in item else ""
            problems.append(f"{source}: {item['msg'].removeprefix('Value error, ')}{got}")
        fail("invalid option: " + "; ".join(problems), code=EXIT_USAGE)
