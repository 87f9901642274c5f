"""Stage `weights`: convert published detector checkpoints to .safetensors and inspect a checkpoint file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stages._shell import fail

weights_app = typer.Typer(
    name="weights",
    help="Detector checkpoints: convert to .safetensors, show format, keys and sha256.",
    no_args_is_help=True,
)


@weights_app.command("convert")
def convert(
    in_path: Path = typer.Argument(
        ..., help="Checkpoint: HF pytorch_model.bin, converted .pkl or .safetensors."
    ),
    out_path: Path = typer.Argument(..., help="Output .safetensors file (canonical names, HF layout)."),
    background: str = typer.Option(
        "auto", help="Where the input keeps the background class row: auto, first (Caffe) or last (HF)."
    ),
) -> None:
    """Convert any supported checkpoint to .safetensors with the project's canonical key names."""
    if out_path.suffix != ".safetensors":
        raise typer.BadParameter(f"{out_path}: output must end in .safetensors", param_hint="OUT")
    if background not in ("auto", "first", "last"):
        raise typer.BadParameter(f"{background!r}: expected auto, first or last", param_hint="--background")
    from extractors.bua.weights import WeightsError, convert_checkpoint

    try:
        report = convert_checkpoint(in_path, out_path, background=background)  # type: ignore[arg-type]
    except (WeightsError, OSError, MemoryError) as exc:  # the detector package's own error (no pipeline/)
        fail(_error_line(exc, in_path))
    console = Console()
    # Key names come from the file: printed as plain text, never parsed as rich markup.
    console.print(f"wrote {out_path}: {report.summary()}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"sha256 {report.sha256}", highlight=False, markup=False)


@weights_app.command("info")
def info(path: Path = typer.Argument(..., help="Checkpoint file to inspect.")) -> None:
    """Format, key count, parameter count, sha256 and whether the stored anchors are Caffe's."""
    from extractors.bua.weights import WeightsError, checkpoint_info

    try:
        details = checkpoint_info(path)
    except (WeightsError, OSError, MemoryError) as exc:
        fail(_error_line(exc, path))
    anchors = details.get("anchors_match")
    anchors_text = {
        None: "not stored (Caffe anchors generated)",
        True: "match Caffe's",
        False: "DIFFER from Caffe's",
    }[anchors]
    table = Table(show_header=False)
    table.add_row("file", Text(details["path"]))  # Text: names from the file are not rich markup
    table.add_row("format", details["format"])
    table.add_row("keys", str(details["num_keys"]))
    table.add_row("parameters", f"{details['num_parameters']:,}")
    table.add_row("sha256", details["sha256"])
    if details["compatible"]:
        table.add_row("fits detector", "yes (full-size configuration)")
        table.add_row("tensors sha256", details["tensors_sha256"])
        table.add_row("anchors", anchors_text)
        if details["conversions"]:
            table.add_row("conversions", Text("; ".join(details["conversions"])))
        if details["unexpected_keys"]:
            table.add_row("unexpected keys", Text(", ".join(details["unexpected_keys"][:10])))
    else:
        table.add_row("fits detector", Text(f"no: {details['error']}"))
    Console(width=200).print(table)


def _error_line(exc: BaseException, path: Path) -> str:
    """One line for `fail` (which prints it as text: the message quotes names from an untrusted file)."""
    if isinstance(exc, MemoryError):
        return f"{path}: not enough memory to read the checkpoint"
    return " ".join(str(exc).split())


def register(app: typer.Typer) -> None:
    """Add `scan-pipe weights convert|info`."""
    app.add_typer(weights_app, name="weights")
