"""Command `seeds`: one DVC experiment per seed of the current configuration, then their spread.

Not a DVC stage: it drives DVC (`dvc exp run` per seed) from outside the pipeline. The spread printed is the
one `scan-pipe compare --spread` prints; `--out` keeps it as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from stages._shell import EXIT_USAGE, fail, user_errors


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` or `"0-4"` (inclusive) or a mix -> the seeds, in the order given."""
    seeds: list[int] = []
    for part in (item.strip() for item in text.split(",")):
        first, sep, last = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            seeds += list(range(int(first), int(last) + 1)) if sep else [int(part)]
        except ValueError:
            fail(f"--seeds {text!r}: expected integers like 0,1,2 or a range 0-4", code=EXIT_USAGE)
    return seeds


def seeds_command(
    seeds: str = typer.Option(..., "--seeds", help="Seeds to run: 0,1,2,3,4 or 0-4 (train.seed of each)."),
    queue: bool = typer.Option(
        False, "--queue", help="Queue the experiments (dvc exp run --queue; dvc queue start) and wait."
    ),
    set_values: list[str] | None = typer.Option(
        None, "--set", help="Further param for every seed, KEY=VALUE as `dvc exp run -S` (train.epochs=30)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the spread as JSON to this file."),
    repo: Path = typer.Option(Path("."), "--repo", help="The DVC project (default: the current folder)."),
    force: bool = typer.Option(
        False, "--force", help="Overwrite existing seed-N experiments (dvc exp run -f)."
    ),
) -> None:
    """Run the pipeline once per seed as DVC experiments seed-N and print mean ± std, min, max per metric."""
    from pipeline.atomic import write_text_atomic
    from pipeline.compare.render import render_spread
    from pipeline.seed_runs import run_seeds

    chosen = parse_seeds(seeds)
    with user_errors():
        report = run_seeds(chosen, queue=queue, repo_dir=repo, extra_sets=set_values or (), force=force)
    console = Console()
    if not console.is_terminal:  # logs: rich would wrap the table at 80 columns
        console = Console(width=150)
    render_spread(report, console)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(report.to_dict(), indent=2) + "\n")
        console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add `scan-pipe seeds`."""
    app.command("seeds")(seeds_command)
