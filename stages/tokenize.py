"""Stage `tokenize`: the text inputs of the models, from the captions tables.

Always the word vocabulary of SCAN's text encoder (`--out`, from the training and validation captions).
With `--text-features DIR`, also what a BERT-input model (MMCA) reads: the frozen BERT's last layer of every
caption of each `--encode` table, cached once at `DIR/<split>` (`pipeline.text_features`). A word-input
model needs none, and gets `DIR/not_needed.json` instead, so DVC always finds the declared output.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from pipeline.params import TokenizeParams, TrainParams
from stages._shell import EXIT_USAGE, SET_HELP, fail, stage_section, user_errors


def tokenize_command(
    captions: list[Path] = typer.Option(
        ..., "--captions", help="captions.parquet of a split; repeat for train and val."
    ),
    out: Path = typer.Option(..., "--out", help="Vocabulary JSON to write."),
    text_features: Path | None = typer.Option(
        None,
        "--text-features",
        help="Folder of the BERT feature caches (one per split) for BERT-input models; not_needed.json else.",
    ),
    encode: list[Path] | None = typer.Option(
        None, "--encode", help="captions.parquet to encode with BERT; repeatable (default: the --captions)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model the features are for (default: train.model)."
    ),
    params: Path | None = typer.Option(None, "--params", help="params.yaml; section `tokenize` is used."),
    min_count: int | None = typer.Option(None, "--min-count", help="Override tokenize.min_count."),
    set_values: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Build the word vocabulary; with --text-features, cache frozen-BERT features for BERT-input models."""
    settings = stage_section(
        params, "tokenize", TokenizeParams, options={"min_count": min_count}, assignments=set_values or ()
    )
    if encode and text_features is None:
        fail("--encode needs --text-features (the folder of the caches)", code=EXIT_USAGE)
    from pipeline.models.registry import model_text_input

    model_name = model or stage_section(params, "train", TrainParams).model
    try:
        text_input = model_text_input(model_name)
    except ValueError as exc:
        fail(f"--model: {exc}", code=EXIT_USAGE)
    from pipeline.vocab import vocabulary_from_files

    console = Console()
    with user_errors():
        vocabulary, num_captions = vocabulary_from_files(captions, min_count=settings.min_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocabulary.save(out)
    console.print(
        f"vocabulary: {len(vocabulary)} tokens "
        f"(min_count {settings.min_count}, {num_captions} captions) -> {out}"
    )
    if text_features is None:
        return
    from pipeline.text_features import NOT_NEEDED_FILE, plan_split_features, write_not_needed

    if text_input != "bert":
        target = write_not_needed(text_features, model_name)
        console.print(
            f"text features: model {model_name!r} reads word ids, no BERT features needed -> {target}"
        )
        return
    from pipeline.bert_text import load_frozen_bert, resolve_bert_path, resolve_max_words
    from pipeline.text_features import write_text_features

    started = time.perf_counter()
    with user_errors():
        plan = plan_split_features(encode or captions, text_features)
        frozen = load_frozen_bert(resolve_bert_path(settings.bert), settings.bert_device)
        max_words = resolve_max_words(frozen, settings.max_words)
        console.print(f"BERT for {model_name!r}: {frozen.identity.describe()} on {frozen.device}")
        (text_features / NOT_NEEDED_FILE).unlink(missing_ok=True)
        for captions_path, target in plan:
            summary = write_text_features(
                captions_path,
                target,
                frozen,
                batch_size=settings.bert_batch_size,
                max_words=max_words,
                dtype=settings.text_feature_dtype,
            )
            console.print(
                f"{target.name}: {summary.num_captions} captions, {summary.num_tokens} word pieces "
                f"(longest {summary.max_length}), {summary.truncated} truncated to {max_words}, "
                f"{summary.dtype} x {summary.bert_dim}, {summary.seconds:.1f} s "
                f"({summary.captions_per_second:,.0f} captions/s) -> {target}"
            )
    console.print(f"text features: {len(plan)} split(s) in {time.perf_counter() - started:.1f} s")


def register(app: typer.Typer) -> None:
    """Add `scan-pipe tokenize`."""
    app.command("tokenize")(tokenize_command)
