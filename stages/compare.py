"""Stage command `compare`: check a run's metrics or features against a committed baseline (CI gate).

Exit codes: 0 when nothing regressed, 1 on a regression (a metric worse beyond its tolerance, a missing
metric, changed feature statistics or ids), 2 when an input cannot be read or the two inputs do not match.
The default tolerances and the reasons for them are documented in `pipeline/compare/tolerances.py`.

`--spread RUN...` (or `--dvc-exps FILE`) instead aggregates several seeds of one configuration into mean,
std, min and max per metric beside the paper (`pipeline/spread.py`): how far apart seeds normally land.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from stages._shell import EXIT_ERROR, EXIT_USAGE, fail, user_errors

EXIT_REGRESSION = EXIT_ERROR


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def _spread_mode(
    paths: list[Path],
    dvc_exps: Path | None,
    metrics_file: str | None,
    dataset: str | None,
    allow_differences: bool,
    as_json: bool,
    console: Console,
) -> None:
    """`--spread`: aggregate evaluate outputs (or a `dvc exp show --json` file) and print the spread."""
    if dvc_exps is not None and paths:
        fail("give either RUN paths or --dvc-exps FILE, not both", code=EXIT_USAGE)
    if dvc_exps is None and not paths:
        fail("--spread needs the runs: evaluate folders / metrics.json files, or --dvc-exps FILE", EXIT_USAGE)
    from pipeline.compare.render import render_spread
    from pipeline.spread import spread_report

    with user_errors(EXIT_USAGE):
        report = spread_report(
            paths,
            dvc_exps=dvc_exps,
            metrics_file=metrics_file,
            dataset=dataset,
            allow_differences=allow_differences,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render_spread(report, console)


def compare_command(
    paths: list[Path] | None = typer.Argument(
        None,
        metavar="BASELINE NEW | RUNS",
        help="BASELINE: metrics JSON, a directory with metrics.json, a feature manifest JSON or a store; "
        "NEW: same family (with --write-manifest: the output JSON path). With --spread: the runs "
        "(evaluate folders or metrics.json files).",
        show_default=False,
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
    spread: bool = typer.Option(
        False, "--spread", help="Aggregate the runs (seeds of one configuration): mean, std, min, max, paper."
    ),
    dvc_exps: Path | None = typer.Option(
        None, "--dvc-exps", help="Spread of the experiments in FILE, saved from `dvc exp show --json`."
    ),
    metrics_file: str | None = typer.Option(
        None,
        "--metrics-file",
        help="With --dvc-exps: the experiments' metrics file (default: the evaluate stage's).",
    ),
    dataset: str | None = typer.Option(
        None, "--dataset", help="With --spread: flickr30k or coco, to show the paper's numbers."
    ),
    allow_differences: bool = typer.Option(
        False,
        "--allow-differences",
        help="With --spread: aggregate runs that differ in more than the seed (params, protocol, model).",
    ),
) -> None:
    """Compare BASELINE and NEW (metrics, or feature stores/manifests); exit 1 on a regression.

    Metrics: recalls/rsum may not drop, medr/meanr not rise, beyond an absolute tolerance.

    Default tolerances: R@K 1, rsum 3, medr 1, meanr 1 (at least one query's worth on small galleries).

    Features: rows, schema, id hash, dims, weights exact; statistics within 1e-4 + 2e-3 x |baseline|.

    Seed spread (--spread RUN... or --dvc-exps FILE): mean ± std, min and max per metric over the runs.
    """
    as_json = output_format is OutputFormat.json
    console = Console(stderr=as_json)
    if not console.is_terminal:  # CI logs: rich would wrap the table at 80 columns
        console = Console(stderr=as_json, width=150)
    paths = paths or []
    if spread or dvc_exps is not None:
        if write_manifest or tolerances is not None or deterministic is not None:
            fail("--spread takes no --tolerances, --write-manifest or --deterministic", code=EXIT_USAGE)
        _spread_mode(paths, dvc_exps, metrics_file, dataset, allow_differences, as_json, console)
        return
    if dataset is not None or allow_differences or metrics_file is not None:
        fail("--dataset, --allow-differences and --metrics-file go with --spread", code=EXIT_USAGE)
    if len(paths) != 2:
        fail(f"expected BASELINE and NEW, got {len(paths)} path(s) (--spread aggregates runs)", EXIT_USAGE)
    baseline, new = paths
    from pipeline.compare import compare_paths, write_store_manifest
    from pipeline.compare.render import render_table

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
