"""Stage command `compare`: check a run's metrics or features against a committed baseline (CI gate).

Exit codes: 0 when nothing regressed, 1 on a regression (a metric worse beyond its tolerance, a missing
metric, changed feature statistics or ids), 2 when an input cannot be read or the two inputs do not match.
The default tolerances and the reasons for them are documented in `pipeline/compare/tolerances.py`.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from stages._shell import EXIT_ERROR, EXIT_USAGE, user_errors

if TYPE_CHECKING:  # the library is imported inside the command: the CLI must start fast
    from pipeline.compare import ComparisonResult, ComparisonRow

EXIT_REGRESSION = EXIT_ERROR

STATUS_STYLES = {
    "ok": "green",
    "improved": "bold green",
    "info": "dim",
    "new": "cyan",
    "REGRESSION": "bold red",
    "MISSING": "bold red",
    "CHANGED": "bold red",
}


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def _format_value(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value[:16] + "…" if len(value) > 20 else value
    if value != value:  # NaN
        return "nan"
    if float(value).is_integer() and abs(value) < 1e12:
        return f"{int(value)}"
    return f"{value:.6g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4f}"


def _format_delta(row: ComparisonRow) -> str:
    if row.delta is None:
        return "—"
    return f"{row.delta:+.4g}"


def render_table(result: ComparisonResult, console: Console) -> None:
    """The readable form: one line per metric/statistic, failures in red, a one-line verdict below."""
    title = f"{result.kind}: {result.baseline} (baseline) vs {result.new}"
    table = Table(title=title, caption=f"tolerances: {result.tolerance_source}", show_lines=False)
    first_column = "metric" if result.kind == "metrics" else "check"
    for header, justify in (
        (first_column, "left"),
        ("baseline", "right"),
        ("new", "right"),
        ("delta", "right"),
        ("tolerance", "right"),
        ("status", "left"),
        ("note", "left"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for row in result.rows:
        style = STATUS_STYLES.get(row.status, "")
        table.add_row(
            row.name,
            _format_value(row.baseline),
            _format_value(row.new),
            _format_delta(row),
            row.tolerance,
            f"[{style}]{row.status}[/{style}]" if style else row.status,
            row.note,
        )
    console.print(table)
    if result.passed:
        console.print(f"[green]OK[/green]: no regression in {len(result.rows)} {result.kind} checks")
    else:
        names = ", ".join(row.name for row in result.regressions)
        console.print(f"[bold red]REGRESSION[/bold red] in {len(result.regressions)} check(s): {names}")


def compare_command(
    baseline: Path = typer.Argument(
        ..., help="Baseline: metrics JSON, a directory with metrics.json, a feature manifest JSON or a store."
    ),
    new: Path = typer.Argument(
        ..., help="New run: same family as BASELINE (with --write-manifest: the output JSON path)."
    ),
    tolerances: Path | None = typer.Option(
        None,
        "--tolerances",
        help="YAML/JSON tolerance file. Default: tolerances.yaml beside BASELINE if present, else built-ins.",
    ),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    write_manifest: bool = typer.Option(
        False,
        "--write-manifest",
        help="Write the manifest of feature store BASELINE to the file NEW instead.",
    ),
    deterministic: bool | None = typer.Option(
        None,
        "--deterministic/--no-deterministic",
        help="Record/enforce exact feature hashes (only for a bit-reproducible extraction path). "
        "Default: as the baseline manifest says; off when writing a manifest.",
    ),
) -> None:
    """Compare BASELINE and NEW (metrics, or feature stores/manifests); exit 1 on a regression.

    Metrics: recalls/rsum may not drop, medr/meanr not rise, beyond an absolute tolerance.

    Default tolerances: R@K 1, rsum 3, medr 1, meanr 1 (at least one query's worth on small galleries).

    Features: rows, schema, id hash, dims, weights exact; statistics within 1e-4 + 2e-3 x |baseline|.
    """
    from pipeline.compare import compare_paths, write_store_manifest

    as_json = output_format is OutputFormat.json
    console = Console(stderr=as_json)
    if not console.is_terminal:  # CI logs: rich would wrap the table at 80 columns
        console = Console(stderr=as_json, width=150)
    if write_manifest:
        with user_errors(EXIT_USAGE):
            manifest = write_store_manifest(baseline, new, deterministic=bool(deterministic))
        console.print(
            f"wrote manifest of {baseline} ({manifest['row_count']} images, "
            f"deterministic={manifest['deterministic']}) to {new}"
        )
        return
    with user_errors(EXIT_USAGE):
        result = compare_paths(baseline, new, tolerances, deterministic=deterministic, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render_table(result, console)
    if not result.passed:
        raise typer.Exit(EXIT_REGRESSION)


def register(app: typer.Typer) -> None:
    """Add `compare` to the CLI."""
    app.command("compare")(compare_command)
