"""The readable (rich table) forms of a comparison result and of a seed spread, printed to a given Console.

`scan-pipe compare` prints a `ComparisonResult` with `render_table` and a `SpreadReport` with
`render_spread`; `scan-pipe seeds` prints its spread with `render_spread` too. JSON output is the
objects' own `to_dict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.compare.result import ComparisonResult, ComparisonRow
    from pipeline.spread import SpreadReport

STATUS_STYLES = {
    "ok": "green",
    "improved": "bold green",
    "info": "dim",
    "new": "cyan",
    "REGRESSION": "bold red",
    "MISSING": "bold red",
    "CHANGED": "bold red",
}


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


def render_spread(report: SpreadReport, console: Console) -> None:
    """The readable form of a seed spread: one line per metric, the paper's value (and seed range) beside."""
    runs = report.runs
    about = ", ".join(str(v) for v in (runs.variant, runs.dataset, runs.protocol) if v)
    table = Table(title=f"seed spread over {len(runs)} runs" + (f": {about}" if about else ""))
    for header in ("metric", "n", "mean ± std", "min", "max", "paper"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    for row in report.display_rows(single_run_std="n/a (1 run)"):
        paper, seeds = row["paper"], row["paper seeds"]
        if seeds != "—":
            paper = f"seeds {seeds}" if paper == "—" else f"{paper}; seeds {seeds}"
        table.add_row(row["metric"], row["n"], row["mean ± std"], row["min (run)"], row["max (run)"], paper)
    console.print(table)
    seeds = [
        f"{name} (seed {runs.seeds[name]})" if runs.seeds.get(name) is not None else name for name in runs
    ]
    console.print(f"runs: {', '.join(seeds)}; std is the sample std (ddof=1)", highlight=False)
    if report.paper is not None:
        console.print(f"paper: {report.paper.label}. {report.paper.source}", highlight=False)
        if report.paper.seed_source:
            console.print(f"paper seed range: {report.paper.seed_source}", highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    for name, reason in runs.skipped.items():
        console.print(f"skipped experiment {name}: {reason}", highlight=False)
