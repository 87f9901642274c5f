"""The project's one progress bar: count, rate in the caller's unit, elapsed time, ETA, an info field."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second in the caller's unit (rich's own speed column formats bytes)."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        rate = "-" if speed is None else f"{speed:,.2f}" if speed < 10 else f"{speed:,.1f}"
        return Text(f"{rate} {self.unit}/s", style="progress.data.speed")


class InfoColumn(ProgressColumn):
    """A free text field a loop updates (`progress.update(task, info="loss 1.23")`); empty by default."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress_bar(
    unit: str = "it", *, console: Console | None = None, disable: bool = False, transient: bool = False
) -> Progress:
    """Description, bar, done/total, rate, elapsed, ETA and an info field."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        InfoColumn(),
        console=console,
        disable=disable,
        transient=transient,
    )
