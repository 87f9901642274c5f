"""Encode a split once and score it blockwise; one model or an ensemble of checkpoints.

Evaluation cost is dominated by scoring n_images x n_captions pairs, so every image and every caption is
encoded exactly once (not once per pair, as the original's loop did), captions in length-sorted batches to
keep padding small, and the score matrix is filled by `model.similarity` over caption chunks, which itself
works in bounded image x caption blocks. An ensemble averages the score matrices of its members (each member
tokenises the captions with its own vocabulary, stored in its checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    Progress,
)
from torch import Tensor, nn

from pipeline.atomic import atomic_output
from pipeline.captions import read_captions
from pipeline.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, read_checkpoint_info
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.feature_table import RegionFeatureTable
from pipeline.loaders import (
    CaptionBatch,
    CaptionDataset,
    CaptionInputs,
    DataError,
    EvaluationLayout,
    ImageBatch,
    ImageDataset,
    caption_loader,
    evaluation_layout,
    image_loader,
    open_feature_table,
    pad_regions,
    pad_tokens,
)
from pipeline.metrics import (
    PROTOCOLS,
    RetrievalRanks,
    evaluate_protocol,
    ranks_table,
    retrieval_metrics,
    retrieval_ranks,
    write_metrics_json,
    write_ranks_parquet,
)
from pipeline.models.ensemble import average_scores
from pipeline.models.registry import model_family, model_text_input
from pipeline.models.xattn import BlockSize
from pipeline.progress import progress_bar
from pipeline.text_inputs import TextSide, bert_identity_of, split_inputs
from pipeline.vocab import Vocabulary, load_vocabulary

if TYPE_CHECKING:
    from pipeline.official_vocab import OfficialVocabulary

# Captions per `similarity` call: large enough to fill a GPU block, small enough that a chunk's padding
# (to its longest caption; chunks are length-sorted) stays cheap.
SCORE_CHUNK_CAPTIONS = 2048
RANKS_TOP_K = 10


class _Tracker:
    """A task in an optional Progress (no-op without one)."""

    def __init__(self, progress: Progress | None, description: str, total: int, keep: bool = True) -> None:
        self.progress = progress
        self.keep = keep
        self.task = progress.add_task(description, total=total, info="") if progress is not None else None

    def advance(self, amount: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=amount)

    def close(self) -> None:
        if self.progress is not None and self.task is not None:
            if self.keep:
                self.progress.refresh()
            else:
                self.progress.remove_task(self.task)


@dataclass
class EncodedCaptions:
    """Caption embeddings in length-sorted chunks, each padded to its own longest caption."""

    indices: list[Tensor]  # per chunk: caption positions (CPU int64)
    embeddings: list[Tensor]  # per chunk: (c, L_chunk, d)
    lengths: list[Tensor]  # per chunk: (c,) int64 on the embeddings' device
    count: int


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside, its previous mode restored outside (validation runs mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


@torch.no_grad()
def encode_images(
    model: nn.Module,
    batches: Iterable[ImageBatch],
    count: int,
    *,
    device: torch.device,
    progress: Progress | None = None,
    autocast_dtype: torch.dtype | None = None,
    keep_tasks: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Region embeddings of `count` images once: ((N, R, d) float32 on `device`, region lengths or None).

    Lengths are None when every image has the padded number of regions (the 36-box case): nothing to mask.
    """
    tracker = _Tracker(progress, "encode images", count, keep_tasks)
    pieces: list[Any] = []
    lengths: list[Tensor] = []
    for batch in batches:
        regions = batch.region_features.to(device, non_blocking=True)
        region_lengths = batch.region_lengths.to(device)
        with _autocast(device, autocast_dtype):
            embedded = model.encode_images(regions, region_lengths)
        pieces.append(embedded.float())
        lengths.append(region_lengths)
        tracker.advance(len(batch.indices))
    tracker.close()
    longest = max(p.shape[1] for p in pieces)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[1])) for p in pieces]
    all_lengths = torch.cat(lengths)
    img_emb = torch.cat(padded)
    return img_emb, (None if bool((all_lengths == longest).all()) else all_lengths)


@torch.no_grad()
def encode_captions(
    model: nn.Module,
    batches: Iterable[CaptionBatch],
    count: int,
    *,
    device: torch.device,
    progress: Progress | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_captions: int = SCORE_CHUNK_CAPTIONS,
    keep_tasks: bool = True,
) -> EncodedCaptions:
    """Word embeddings of `count` captions, grouped into scoring chunks (length-sorted batches keep each
    chunk's padding small)."""
    tracker = _Tracker(progress, "encode captions", count, keep_tasks)
    result = EncodedCaptions(indices=[], embeddings=[], lengths=[], count=count)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        result.indices.append(torch.cat([idx for idx, _, _ in pending]))
        embedded = [emb for _, emb, _ in pending]
        longest = max(emb.shape[1] for emb in embedded)
        result.embeddings.append(
            torch.cat([torch.nn.functional.pad(emb, (0, 0, 0, longest - emb.shape[1])) for emb in embedded])
        )
        result.lengths.append(torch.cat([lens for _, _, lens in pending]))
        pending.clear()

    pending_count = 0
    for batch in batches:
        inputs = batch.caption_inputs.to(device, non_blocking=True)
        caption_lengths = batch.caption_lengths.to(device)
        with _autocast(device, autocast_dtype):
            embedded = model.encode_captions(inputs, caption_lengths)
        pending.append((batch.indices, embedded.float(), caption_lengths))
        pending_count += len(batch.indices)
        tracker.advance(len(batch.indices))
        if pending_count >= chunk_captions:
            flush()
            pending_count = 0
    flush()
    tracker.close()
    return result


@torch.no_grad()
def score_encoded(
    model: nn.Module,
    img_emb: Tensor,
    region_lengths: Tensor | None,
    captions: EncodedCaptions,
    *,
    block_size: BlockSize | None = None,
    progress: Progress | None = None,
    keep_tasks: bool = True,
) -> Tensor:
    """The (n_images, n_captions) float32 score matrix on the CPU, filled chunk by chunk."""
    n_images = img_emb.shape[0]
    scores = torch.empty(n_images, captions.count, dtype=torch.float32)
    tracker = _Tracker(progress, "score pairs", n_images * captions.count, keep_tasks)
    for indices, embeddings, lengths in zip(
        captions.indices, captions.embeddings, captions.lengths, strict=True
    ):
        chunk = model.similarity(
            img_emb, embeddings, lengths, region_lengths, block_size=block_size, progress=tracker.advance
        )
        scores[:, indices] = chunk.float().cpu()
    tracker.close()
    return scores


def padded_split(
    table: RegionFeatureTable, image_rows: np.ndarray, captions: CaptionInputs
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All listed images and all captions as padded tensors, in order: (regions, lengths, words, lengths).

    For models that score raw inputs (MMCA); Flickr30K's test split is about 0.6 GB in float32.
    """
    images = ImageDataset(table, image_rows)
    regions, region_lengths = pad_regions([images[i][0] for i in range(len(images))])
    words, word_lengths = pad_tokens([captions.item(i) for i in range(len(captions))])
    return regions, region_lengths, words, word_lengths


@torch.no_grad()
def _pair_model_scores(
    model: nn.Module,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    block_size: BlockSize | None,
    device: torch.device,
    progress: Progress | None = None,
    keep_tasks: bool = True,
) -> Tensor:
    """Scores of a model whose `score_matrix` takes the raw padded inputs (MMCA, mmca.md 5.1): it computes
    each item's projections once and the per-pair work in bounded blocks."""
    regions, region_lengths, words, word_lengths = (tensor.to(device) for tensor in inputs)
    tracker = _Tracker(progress, "score pairs", regions.shape[0] * words.shape[0], keep_tasks)
    with eval_mode(model):
        scores = model.score_matrix(
            regions, region_lengths, words, word_lengths, block_size=block_size, progress=tracker.advance
        )
    tracker.close()
    return scores.float().cpu()


def _scores_from_batches(
    model: nn.Module,
    image_batches: Iterable[ImageBatch],
    num_images: int,
    caption_batches: Iterable[CaptionBatch],
    num_captions: int,
    *,
    block_size: BlockSize | None,
    device: torch.device,
    progress: Progress | None,
    autocast_dtype: torch.dtype | None,
    keep_tasks: bool,
) -> Tensor:
    """The one encode-then-score path (eval mode, no gradients) behind every scoring entry point."""
    with eval_mode(model):
        img_emb, region_lengths = encode_images(
            model,
            image_batches,
            num_images,
            device=device,
            progress=progress,
            autocast_dtype=autocast_dtype,
            keep_tasks=keep_tasks,
        )
        encoded = encode_captions(
            model,
            caption_batches,
            num_captions,
            device=device,
            progress=progress,
            autocast_dtype=autocast_dtype,
            keep_tasks=keep_tasks,
        )
        return score_encoded(
            model,
            img_emb,
            region_lengths,
            encoded,
            block_size=block_size,
            progress=progress,
            keep_tasks=keep_tasks,
        )


def model_scores(
    model: nn.Module,
    table: RegionFeatureTable,
    image_rows: np.ndarray,
    tokens: CaptionInputs,
    *,
    batch_size: int = 128,
    block_size: BlockSize | None = None,
    device: torch.device,
    progress: Progress | None = None,
    autocast_dtype: torch.dtype | None = None,
    keep_tasks: bool = True,
) -> Tensor:
    """Score the listed rows of a feature table against captions' text inputs: each side encoded once."""
    if hasattr(model, "score_matrix"):  # MMCA: encodes each item once and scores blockwise itself
        inputs = padded_split(table, image_rows, tokens)
        return _pair_model_scores(
            model, inputs, block_size=block_size, device=device, progress=progress, keep_tasks=keep_tasks
        )
    images = image_loader(ImageDataset(table, image_rows), batch_size, pin_memory=device.type == "cuda")
    captions = caption_loader(CaptionDataset(tokens), batch_size, sort_by_length=True)
    return _scores_from_batches(
        model,
        images,
        len(image_rows),
        captions,
        len(tokens),
        block_size=block_size,
        device=device,
        progress=progress,
        autocast_dtype=autocast_dtype,
        keep_tasks=keep_tasks,
    )


def encode_and_score(
    model: nn.Module,
    region_features: Tensor,
    token_ids: Tensor,
    caption_lengths: Tensor,
    region_lengths: Tensor | None = None,
    *,
    batch_size: int = 128,
    block_size: BlockSize | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Score in-memory padded tensors (images x captions), by the same path as `model_scores`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    n_images, n_captions = region_features.shape[0], token_ids.shape[0]
    if region_lengths is None:
        region_lengths = torch.full((n_images,), region_features.shape[1], dtype=torch.long)
    if hasattr(model, "score_matrix"):  # MMCA
        inputs = (region_features, region_lengths, token_ids, caption_lengths)
        return _pair_model_scores(
            model, inputs, block_size=block_size, device=target, progress=None, keep_tasks=True
        )
    # Each side's positions are its own rows: a last partial batch must carry as many positions as rows.
    image_batches = (
        ImageBatch(
            region_features[i : i + batch_size],
            region_lengths[i : i + batch_size],
            torch.arange(i, min(i + batch_size, n_images)),
        )
        for i in range(0, n_images, batch_size)
    )
    caption_batches = (
        CaptionBatch(
            token_ids[i : i + batch_size],
            caption_lengths[i : i + batch_size],
            torch.arange(i, min(i + batch_size, n_captions)),
        )
        for i in range(0, n_captions, batch_size)
    )
    scores = _scores_from_batches(
        model,
        image_batches,
        n_images,
        caption_batches,
        n_captions,
        block_size=block_size,
        device=target,
        progress=None,
        autocast_dtype=None,
        keep_tasks=True,
    )
    return scores


def ensemble_scores(
    models: Sequence[nn.Module],
    region_features: Tensor,
    token_ids: Tensor,
    caption_lengths: Tensor,
    region_lengths: Tensor | None = None,
    *,
    batch_size: int = 128,
    block_size: BlockSize | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Score the same images and captions with every model, then average the matrices."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}")
    return average_scores(
        [
            encode_and_score(
                model,
                region_features,
                token_ids,
                caption_lengths,
                region_lengths,
                batch_size=batch_size,
                block_size=block_size,
                device=device,
            )
            for model in models
        ]
    )


@torch.no_grad()
def two_stage_evaluation(
    model: nn.Module,
    table: RegionFeatureTable,
    layout: EvaluationLayout,
    captions: CaptionInputs,
    *,
    k: int,
    device: torch.device,
    block_size: BlockSize | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """MMCA's re-ranking (mmca.md 5.3): shortlist k by S0 = i0.c0, the full S on the shortlisted pairs.

    Returns the recall of the two-stage system (i2t from the rows of its i2t matrix, t2i from the columns
    of its t2i matrix; R@K with K > k, and then rsum, left out), its time and the pairs it scored.
    medr/meanr are kept but are not comparable with exact evaluation (a query whose match was not
    shortlisted ranks at k).
    """
    started = time.perf_counter()
    with eval_mode(model):
        inputs = (tensor.to(device) for tensor in padded_split(table, layout.image_rows, captions))
        i2t, t2i = model.two_stage_scores(*inputs, k=k)
    seconds = time.perf_counter() - started
    per_image = layout.captions_per_image
    i2t_metrics = retrieval_metrics(i2t.float().cpu(), per_image)
    t2i_metrics = retrieval_metrics(t2i.float().cpu(), per_image)
    metrics = {key: value for key, value in i2t_metrics.items() if key.startswith("i2t_")}
    metrics.update({key: value for key, value in t2i_metrics.items() if key.startswith("t2i_")})
    for side in ("i2t", "t2i"):  # a match outside the shortlist ranks at k: R@K with K > k means nothing
        for n in (5, 10):
            if n > k:
                del metrics[f"{side}_r{n}"]
    if all(f"{side}_r{n}" in metrics for side in ("i2t", "t2i") for n in (1, 5, 10)):
        metrics["rsum"] = sum(metrics[f"{side}_r{n}"] for side in ("i2t", "t2i") for n in (1, 5, 10))
    scored = int((torch.isfinite(i2t) | torch.isfinite(t2i)).sum())
    return {
        "k": k,
        "metrics": metrics,
        "time_s": seconds,
        "pairs_scored": scored,
        "pairs_total": int(i2t.numel()),
        "note": "R@K for K <= k is the two-stage system's recall; medr/meanr are not comparable with exact",
    }


# --------------------------------------------------------------------------------------------- evaluation


class EvaluationError(UserError):
    """Inputs of an evaluation do not fit together; the message names the file and what is wrong."""


@dataclass
class EvaluationRun:
    """Result of `evaluate_run`: metrics (flat, + per-fold for coco_1k), the score matrix, ranks, inputs."""

    metrics: dict[str, Any]
    scores: np.ndarray  # (n_images, n_captions) float32
    ranks: RetrievalRanks
    layout: EvaluationLayout
    checkpoints: list[CheckpointInfo]
    features_dir: Path


def protocol_metrics(scores: Tensor | np.ndarray, protocol: str, captions_per_image: int) -> dict[str, Any]:
    """Metrics of one protocol, or for `all`: the whole-matrix metrics plus a nested `coco_1k` entry.

    `all` = the whole matrix (what `flickr30k_1k` and `coco_5k` compute) at the top level, and, when the image
    count splits into five folds, the 5-fold `coco_1k` result under the key `coco_1k`.
    """
    if protocol == "all":
        n_images = scores.shape[0]
        result = evaluate_protocol(scores, "coco_5k", captions_per_image)
        result["protocol"] = "all"
        if n_images % 5 == 0:
            result["coco_1k"] = evaluate_protocol(scores, "coco_1k", captions_per_image)
        return result
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}; expected one of {(*PROTOCOLS, 'all')}")
    return evaluate_protocol(scores, protocol, captions_per_image)


def _load_vocabulary(
    info: CheckpointInfo, vocab_path: str | Path | None
) -> tuple[Vocabulary | OfficialVocabulary, Path]:
    """The checkpoint's vocabulary (or `vocab_path`), read with the tokenizer the checkpoint names."""
    path = Path(vocab_path) if vocab_path is not None else info.vocab_path
    if path is None:
        raise EvaluationError(
            f"{info.path}: checkpoint carries no vocabulary; pass the vocabulary file explicitly"
        )
    if not path.is_file():
        raise EvaluationError(f"{path}: vocabulary file not found")
    vocab = load_vocabulary(path, info.tokenizer)
    expected = info.model_config.get("vocab_size")
    if expected is not None and len(vocab) != expected:
        raise EvaluationError(
            f"{path}: vocabulary has {len(vocab)} words but checkpoint {info.path} was trained with "
            f"{expected}; "
            "use the vocabulary the model was trained with"
        )
    return vocab, path


def _text_side(
    info: CheckpointInfo, vocab_path: str | Path | None, text_features: str | Path | None
) -> TextSide:
    """How this checkpoint's model reads captions: its vocabulary and tokenizer, or its BERT's cache."""
    if model_text_input(info.model_name) == "words":
        vocab, path = _load_vocabulary(info, vocab_path)
        return TextSide("words", vocab=vocab, vocab_path=path)
    return TextSide(
        "bert",
        text_features_dir=None if text_features is None else Path(text_features),
        bert=bert_identity_of(info.extra, info.path),
    )


def _check_ensemble(infos: Sequence[CheckpointInfo]) -> None:
    """Refuse to average scores of different model families: their scales are not comparable.

    SCAN's scores are aggregated cosine attentions (LogSumExp or a mean of cosines), MMCA's are
    S = i0.c0 + alpha i1.c1 with |S| <= 1 + alpha: an average would weight the families arbitrarily.
    """
    families = {model_family(info.model_name) for info in infos}
    if len(families) > 1:
        listed = ", ".join(f"{info.path} ({info.model_name})" for info in infos)
        raise EvaluationError(
            f"cannot ensemble models of different families ({', '.join(sorted(families))}): their score "
            f"scales differ, so an average would weight them arbitrarily; ensemble within one family "
            f"({listed})"
        )


def evaluate_run(
    checkpoints: Sequence[str | Path],
    features_dir: str | Path,
    captions_path: str | Path,
    *,
    vocab_path: str | Path | None = None,
    text_features: str | Path | None = None,
    rerank_k: int | None = None,
    protocol: str = "flickr30k_1k",
    block_size: int | tuple[int, int] | None = None,
    batch_size: int = 128,
    captions_per_image: int = 5,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    expect_models: Sequence[str] | None = None,
    max_images: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> EvaluationRun:
    """Score a split with one checkpoint or an ensemble of several and compute the protocol's metrics.

    Every checkpoint is checked before any work: it exists, is of the expected variant (`expect_models`, one
    name per checkpoint), and fits the feature store's dimension and its vocabulary.
    """
    if not checkpoints:
        raise EvaluationError("no checkpoint given")
    if protocol != "all" and protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}; expected one of {(*PROTOCOLS, 'all')}")
    if expect_models is not None and len(expect_models) != len(checkpoints):
        raise EvaluationError(
            f"{len(expect_models)} expected model name(s) for {len(checkpoints)} checkpoint(s); "
            "give one per checkpoint"
        )
    infos = [read_checkpoint_info(path) for path in checkpoints]
    if expect_models is not None:
        for info, expected in zip(infos, expect_models, strict=True):
            if info.model_name != expected:
                raise CheckpointError(
                    f"{info.path}: checkpoint holds model variant {info.model_name!r}, expected {expected!r}"
                )
    _check_ensemble(infos)
    skipped: str | None = None
    if rerank_k is not None and (len(infos) > 1 or model_family(infos[0].model_name) != "mmca"):
        # one params.yaml serves every model: re-ranking is MMCA's (mmca.md 5.3), said and skipped for others
        skipped = (
            f"rerank_k {rerank_k} not used: two-stage evaluation is for a single MMCA checkpoint, not "
            f"{' + '.join(info.model_name for info in infos)}"
        )
        rerank_k = None
    if rerank_k is not None and rerank_k < 1:
        raise EvaluationError(f"rerank_k must be at least 1, got {rerank_k}")
    try:
        sides = [_text_side(info, vocab_path, text_features) for info in infos]
    except UserError as exc:
        raise EvaluationError(str(exc)) from exc
    target = resolve_device(device)
    table = open_feature_table(features_dir, cache_dir)
    for info in infos:
        img_dim = info.model_config.get("img_dim")
        if img_dim is not None and img_dim != table.feature_dim:
            raise EvaluationError(
                f"{features_dir}: region features have dimension {table.feature_dim}, "
                f"but checkpoint {info.path} "
                f"expects {img_dim}"
            )
    caption_table = read_captions(captions_path, captions_per_image=captions_per_image)
    try:
        layout = evaluation_layout(
            table,
            caption_table,
            captions_source=captions_path,
            features_source=features_dir,
            max_images=max_images,
        )
    except DataError as exc:
        raise EvaluationError(str(exc)) from exc
    if protocol == "coco_1k" and layout.num_images % 5:
        raise EvaluationError(
            f"{captions_path}: coco_1k needs an image count divisible into 5 folds, "
            f"got {layout.num_images} images"
        )

    try:
        inputs = [split_inputs(side, layout.captions, captions_path) for side in sides]
    except UserError as exc:
        raise EvaluationError(str(exc)) from exc
    members: list[Tensor] = []
    two_stage: dict[str, Any] | None = None
    with progress_bar("it", console=console, disable=not progress) as bar:
        for info, captions in zip(infos, inputs, strict=True):
            model, _ = load_checkpoint(info.path, map_location=target)
            started = time.perf_counter()
            members.append(
                model_scores(
                    model,
                    table,
                    layout.image_rows,
                    captions,
                    batch_size=batch_size,
                    block_size=block_size,
                    device=target,
                    progress=bar if progress else None,
                )
            )
            exact_seconds = time.perf_counter() - started
            if rerank_k is not None:
                two_stage = two_stage_evaluation(
                    model,
                    table,
                    layout,
                    captions,
                    k=rerank_k,
                    device=target,
                    block_size=block_size,
                    progress=bar if progress else None,
                )
                two_stage["exact_time_s"] = exact_seconds
            del model
    scores = average_scores(members) if len(members) > 1 else members[0]
    metrics = protocol_metrics(scores, protocol, layout.captions_per_image)
    if two_stage is not None:
        metrics["two_stage"] = two_stage
    if skipped is not None:
        metrics["two_stage_skipped"] = skipped
    metrics["checkpoints"] = [str(info.path) for info in infos]
    metrics["models"] = [info.model_name for info in infos]
    ranks = retrieval_ranks(scores, layout.captions_per_image, top_k=RANKS_TOP_K)
    return EvaluationRun(
        metrics=metrics,
        scores=scores.numpy(),
        ranks=ranks,
        layout=layout,
        checkpoints=infos,
        features_dir=Path(features_dir),
    )


def write_evaluation(run: EvaluationRun, out_dir: str | Path, *, save_scores: bool = False) -> list[Path]:
    """metrics.json, ranks.parquet (top-k per query) and, on request, scores.npy, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**run.metrics, "captions": str(run.layout.source), "features": str(run.features_dir)}
    written = [write_metrics_json(out / "metrics.json", metrics)]
    table = ranks_table(
        run.ranks,
        captions_per_image=run.layout.captions_per_image,
        image_ids=run.layout.image_ids,
        captions=run.layout.captions,
    )
    written.append(write_ranks_parquet(out / "ranks.parquet", table))
    if save_scores:
        with atomic_output(out / "scores.npy") as tmp_path, tmp_path.open("wb") as handle:
            np.save(handle, np.ascontiguousarray(run.scores, dtype=np.float32))
        written.append(out / "scores.npy")
    return written
