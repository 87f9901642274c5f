"""SCAN training: seeded, resumable to the exact weights, validated every epoch, single process or DDP.

The loop follows the official SCAN training settings: Adam, lr x0.1 at `lr_update`,
gradient-norm clip, hardest-negative triplet loss summed over the batch, model selection on validation rsum.

Exact resume. Everything that influences an epoch is either in the checkpoint (weights, Adam moments and step
counts, gradient-scaler state) or a pure function of (seed, epoch): the batch order (`pipeline.loaders`), the
learning rate, and the torch RNG, re-seeded per epoch inside a forked RNG scope (SCAN itself draws no random
numbers after initialisation; the scope keeps it that way if a stochastic layer is added). So an interrupted
run resumed from its last checkpoint ends with the same weights as an uninterrupted one (bit for bit on CPU).

One step. `train_step` is the per-batch work (forward, scaled backward, clip, optimizer step) of both the
epoch loop and `training_steps`, which runs explicit batches: that is how the step is checked against the
official code's own numbers (tests/test_official_training.py).

Fine-tuning. `params.init` names a checkpoint directory (e.g. written by `import-official`): its weights,
architecture, vocabulary and tokenizer are the run's (the params' model options are then unused, and said so);
Adam starts fresh, since official checkpoints carry no optimizer state. Weights always come with the
vocabulary they index: a resumed run reads the one in its own last checkpoint.

Defaults that differ from the official `train.py` (the table, and how to get each official value:
docs/OFFICIAL_TRAINING.md): `max_violation` and the bidirectional GRU are on here (off in its argparse, on in
the paper's commands); AMP is on by default on CUDA (bf16; the official trains in float32: `amp: false`); Adam
is torch's current update (`optimizer: adam_torch04` gives torch 0.3/0.4's); the epoch order is seeded and
the last incomplete batch dropped; resume restores the Adam moments (the official restarts them).

Files under `out_dir`:
    checkpoints/last/   written atomically after every epoch (see `pipeline.checkpoint`)
    checkpoints/best/   a copy of the epoch with the best validation rsum so far
    metrics.jsonl       one `EpochRecord` per epoch (see `pipeline.training_log`)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn

from pipeline.captions import read_captions
from pipeline.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    bytes_to_json,
    copy_checkpoint,
    is_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    read_checkpoint_info,
    save_checkpoint,
)
from pipeline.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    gather_with_grad,
    init_distributed,
    resolve_device,
    shutdown,
    wrap_model,
)
from pipeline.errors import UserError
from pipeline.evaluation import model_scores
from pipeline.loaders import (
    BertCaptions,
    CaptionInputs,
    DataError,
    EpochBatchSampler,
    PairBatch,
    PairDataset,
    evaluation_layout,
    map_image_ids,
    open_feature_table,
    pair_loader,
)
from pipeline.metrics import retrieval_metrics
from pipeline.models.build import create_model
from pipeline.models.losses import hardest_negative_triplet_loss
from pipeline.models.registry import model_text_input
from pipeline.optim import LegacyAdam
from pipeline.params import TrainParams
from pipeline.progress import progress_bar
from pipeline.text_inputs import BERT_EXTRA_KEY, TextSide, bert_identity_of, open_split_cache, split_inputs
from pipeline.training_log import EpochRecord, append_epoch, read_training_log
from pipeline.vocab import SCAN_PIPE_TOKENIZER, Vocabulary, load_vocabulary

if TYPE_CHECKING:
    from pipeline.bert_text import BertIdentity
    from pipeline.official_vocab import OfficialVocabulary

# Params that may change when a run is resumed: they do not alter the optimisation.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "num_workers", "encode_batch_size", "val_block_size"})
LOSS_DISPLAY_EVERY = 10  # steps between loss read-backs for the progress bar (each one syncs the GPU)


class TrainingError(UserError):
    """Training cannot start or continue; the message names the file or setting at fault."""


@dataclass(frozen=True)
class RunPaths:
    """Where a training run keeps its outputs."""

    out_dir: Path

    @property
    def last(self) -> Path:
        """Checkpoint of the last completed epoch."""
        return self.out_dir / "checkpoints" / "last"

    @property
    def best(self) -> Path:
        """Checkpoint with the best validation rsum."""
        return self.out_dir / "checkpoints" / "best"

    @property
    def metrics(self) -> Path:
        """Per-epoch JSON lines."""
        return self.out_dir / "metrics.jsonl"


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step computed (see `training_steps`)."""

    loss: float  # on the weights before the step
    grad_norm: float  # total L2 norm of all gradients before clipping (what clip_grad_norm_ returns)
    lr: float
    grads: dict[str, Tensor] | None = None  # per parameter name, before clipping; only when asked for


@dataclass
class TrainResult:
    """What a `train` call did."""

    out_dir: Path
    start_epoch: int  # completed epochs when this call started
    epochs_completed: int
    best_epoch: int | None
    best_rsum: float | None
    history: list[EpochRecord] = field(default_factory=list)  # all metrics.jsonl records
    nothing_to_do: bool = False


def model_overrides(
    params: TrainParams, *, img_dim: int, vocab_size: int | None = None, bert_dim: int | None = None
) -> dict[str, Any]:
    """Registry overrides for `params.model`: the sizes the data fixes (the vocabulary's for word models,
    the BERT width for BERT-input ones) plus the options params sets."""
    sizes = {"vocab_size": vocab_size, "bert_dim": bert_dim}
    return {**params.model_options(), "img_dim": img_dim, **{k: v for k, v in sizes.items() if v is not None}}


def build_seeded_model(
    params: TrainParams, *, img_dim: int, vocab_size: int | None = None, bert_dim: int | None = None
) -> nn.Module:
    """The initial model, drawn from `params.seed` without touching the caller's global RNG state."""
    overrides = model_overrides(params, img_dim=img_dim, vocab_size=vocab_size, bert_dim=bert_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        return create_model(params.model, **overrides)


def learning_rate(params: TrainParams, epoch: int) -> float:
    """The reference schedule: lr x 0.1 every `lr_update` epochs (epoch is 0-based)."""
    return params.lr * (0.1 ** (epoch // params.lr_update))


def make_optimizer(params: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer `params.optimizer` names, over all of the model's parameters (as the official code)."""
    if params.optimizer == "adam_torch04":
        return LegacyAdam(model.parameters(), lr=params.lr)
    return torch.optim.Adam(model.parameters(), lr=params.lr)


def _score_precision(embeddings: Tensor) -> Tensor:
    """float64 stays float64 (reference checks); half precision is widened to float32."""
    return embeddings if embeddings.dtype == torch.float64 else embeddings.float()


class ContrastiveStep(nn.Module):
    """Encode a (local) batch, gather it across ranks, score the global batch, return the triplet loss.

    This is the module DDP wraps, so the gather happens inside its forward. Scores and loss run in float32
    (float64 for a float64 model) outside autocast: softmax and LogSumExp over half-precision products
    overflow.
    """

    def __init__(
        self, model: nn.Module, *, margin: float, max_violation: bool, context: DistributedContext
    ) -> None:
        super().__init__()
        self.model = model
        self.margin = margin
        self.max_violation = max_violation
        self.context = context

    def forward(
        self,
        region_features: Tensor,
        region_lengths: Tensor,
        caption_inputs: Tensor,
        caption_lengths: Tensor,
    ) -> Tensor:
        if hasattr(self.model, "score_matrix"):  # MMCA: per-pair cross attention over raw inputs
            if self.context.enabled:  # every rank scores the global batch: the inputs, not the parts, travel
                region_features = gather_with_grad(region_features, self.context, pad_dims=(1,))
                caption_inputs = gather_with_grad(caption_inputs, self.context, pad_dims=(1,))
                region_lengths = gather_with_grad(region_lengths, self.context)
                caption_lengths = gather_with_grad(caption_lengths, self.context)
            scores = self.model(region_features, region_lengths, caption_inputs, caption_lengths)
            return hardest_negative_triplet_loss(
                scores.float(), margin=self.margin, max_violation=self.max_violation
            )
        img_emb = self.model.encode_images(region_features, region_lengths)
        cap_emb = self.model.encode_captions(caption_inputs, caption_lengths)
        if self.context.enabled:
            img_emb = gather_with_grad(img_emb, self.context, pad_dims=(1,))
            cap_emb = gather_with_grad(cap_emb, self.context, pad_dims=(1,))
            region_lengths = gather_with_grad(region_lengths, self.context)
            caption_lengths = gather_with_grad(caption_lengths, self.context)
        with torch.autocast(device_type=img_emb.device.type, enabled=False):
            scores = self.model.similarity(
                _score_precision(img_emb),
                _score_precision(cap_emb),
                caption_lengths,
                region_lengths,
                block_size=img_emb.shape[0],
            )
            return hardest_negative_triplet_loss(scores, margin=self.margin, max_violation=self.max_violation)


@contextmanager
def epoch_rng(seed: int, epoch: int, device: torch.device) -> Iterator[None]:
    """Torch RNG seeded from (seed, epoch) inside, the caller's RNG state restored outside."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + epoch) % 2**63)
        yield


def _check_resume_params(params: TrainParams, info: CheckpointInfo) -> None:
    saved = info.train_params or {}
    current = params.model_dump(mode="json")
    changed = sorted(
        key for key in current if key not in RESUMABLE_CHANGES and key in saved and saved[key] != current[key]
    )
    if changed:
        details = ", ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed)
        raise TrainingError(
            f"{info.path}: cannot resume with different training parameters ({details}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change"
        )


def _autocast_dtype(params: TrainParams, device: torch.device) -> torch.dtype | None:
    if not params.amp or device.type != "cuda":
        return None
    if params.amp_dtype == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _make_scaler(autocast_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling only for float16 autocast (bf16 and float32 need none; disabled it is a no-op)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)


def train_step(
    step_module: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: PairBatch,
    *,
    grad_clip: float,
    autocast_dtype: torch.dtype | None,
    grads_out: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimizer step on a batch already on the device; returns (loss, gradient norm before clipping).

    The one place that defines a step, shared by the epoch loop and `training_steps`. Both values stay
    tensors so the epoch loop never waits for the GPU. `grads_out`, when given, receives a copy of every
    unscaled gradient before clipping (for reference checks; the loop passes None and copies nothing).
    """
    optimizer.zero_grad(set_to_none=True)
    amp = (
        torch.autocast(device_type="cuda", dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    with amp:
        loss = step_module(
            batch.region_features, batch.region_lengths, batch.caption_inputs, batch.caption_lengths
        )
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grads_out is not None:
        grads_out.update(
            {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        )
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), grad_norm


def training_steps(
    model: nn.Module,
    batches: Iterable[PairBatch],
    params: TrainParams,
    *,
    device: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    keep_grads: bool = False,
) -> list[StepResult]:
    """Run explicit batches through the trainer's own step, in a single process.

    Same optimizer factory, loss module, autocast/scaler choice and learning rate (that of `epoch`) as
    `train`, so a step can be compared with a reference implementation. `model` is moved to `device` and
    trained in place; pass `optimizer` (built for this model) to continue from earlier steps (a float16
    GradScaler starts afresh each call). The model's dtype is kept: a `.double()` model with float64 batches
    runs entirely in float64.
    """
    params = params.resolved()
    target = resolve_device(device)
    model.to(target)
    if optimizer is None:
        optimizer = make_optimizer(params, model)
    lr = learning_rate(params, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    autocast_dtype = _autocast_dtype(params, target)
    scaler = _make_scaler(autocast_dtype)
    step_module = ContrastiveStep(
        model,
        margin=params.margin,
        max_violation=params.max_violation,
        context=DistributedContext(device=target),
    )
    model.train()
    results: list[StepResult] = []
    for batch in batches:
        grads: dict[str, Tensor] | None = {} if keep_grads else None
        loss, grad_norm = train_step(
            step_module,
            model,
            optimizer,
            scaler,
            batch.to(target),
            grad_clip=params.grad_clip,
            autocast_dtype=autocast_dtype,
            grads_out=grads,
        )
        results.append(StepResult(loss=float(loss), grad_norm=float(grad_norm), lr=lr, grads=grads))
    return results


def _init_checkpoint(params: TrainParams) -> CheckpointInfo:
    """The checkpoint `params.init` names; it must carry the vocabulary its weights index."""
    path = Path(str(params.init))
    try:
        info = read_checkpoint_info(path)
    except CheckpointError as exc:
        raise TrainingError(f"train.init: {exc}") from exc
    if info.vocab_path is None or not info.vocab_path.is_file():
        raise TrainingError(f"{path}: train.init checkpoint carries no vocabulary (vocab.json)")
    return info


def _init_summary(params: TrainParams, info: CheckpointInfo) -> str:
    """What a fine-tune takes from its init checkpoint, and which params settings that makes unused."""
    unused = [f"model {params.model!r}"] if params.model != info.model_name else []
    unused += [
        f"{key} {value!r}"
        for key, value in params.model_options().items()
        if info.model_config.get(key, value) != value
    ]
    return (
        f"fine-tuning {info.model_name} from {info.path}: its weights, architecture, vocabulary, tokenizer "
        f"({info.tokenizer}); Adam starts fresh (official checkpoints carry no optimizer state)"
        + (f"; unused train params: {', '.join(unused)}" if unused else "")
    )


def _run_vocabulary(
    source: CheckpointInfo | None, vocab_path: Path | None, say: Callable[..., None]
) -> tuple[Vocabulary | OfficialVocabulary, Path, str]:
    """The vocabulary the weights index: that of the checkpoint they come from (init or last), else the file.

    Returns (vocabulary, its file, its tokenizer name).
    """
    if source is not None and source.vocab_path is not None and source.vocab_path.is_file():
        given = vocab_path is not None and vocab_path.is_file()
        if given and vocab_path.read_bytes() != source.vocab_path.read_bytes():
            say(f"using the vocabulary of {source.path} ({source.tokenizer}), not {vocab_path}")
        return load_vocabulary(source.vocab_path, source.tokenizer), source.vocab_path, source.tokenizer
    if vocab_path is None:
        raise TrainingError("no vocabulary: pass --vocab (or train.init, a checkpoint that carries one)")
    if not vocab_path.is_file():
        raise TrainingError(f"{vocab_path}: vocabulary file not found")
    return Vocabulary.load(vocab_path), vocab_path, SCAN_PIPE_TOKENIZER


def train(
    params: TrainParams,
    *,
    features_dir: str | Path,
    train_captions: str | Path,
    val_captions: str | Path,
    vocab_path: str | Path | None,
    out_dir: str | Path,
    text_features: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train `params.model` on the training pairs, validating on `val_captions` after every epoch.

    Launched by `torchrun`, every process calls this; the batch is split across ranks (see
    `pipeline.distributed`) and rank 0 writes the outputs. `device` overrides `params.device`.
    """
    params = params.resolved()  # every schedule setting concrete (flat, per_model block, variant, default)
    context = init_distributed(device or params.device)
    try:
        return _train(
            params,
            context=context,
            features_dir=Path(features_dir),
            train_captions=Path(train_captions),
            val_captions=Path(val_captions),
            vocab_path=None if vocab_path is None else Path(vocab_path),
            text_features=None if text_features is None else Path(text_features),
            paths=RunPaths(Path(out_dir)),
            resume=resume,
            progress=progress,
            cache_dir=cache_dir,
            console=console,
        )
    finally:
        shutdown(context)


def _train(
    params: TrainParams,
    *,
    context: DistributedContext,
    features_dir: Path,
    train_captions: Path,
    val_captions: Path,
    vocab_path: Path | None,
    text_features: Path | None,
    paths: RunPaths,
    resume: bool,
    progress: bool,
    cache_dir: str | Path | None,
    console: Console | None,
) -> TrainResult:
    device = context.device
    say = (console or Console()).print if context.is_main and progress else (lambda *args, **kwargs: None)

    # ---- where to start
    resume_info: CheckpointInfo | None = None
    if resume:
        if not is_checkpoint(paths.last):
            raise TrainingError(f"{paths.last}: no checkpoint to resume from (start without --resume)")
        resume_info = read_checkpoint_info(paths.last)
        if params.init is None and resume_info.model_name != params.model:
            raise TrainingError(
                f"{paths.last}: checkpoint is model variant {resume_info.model_name!r}, "
                f"params ask for {params.model!r}"
            )
        _check_resume_params(params, resume_info)
        if resume_info.epoch >= params.epochs:
            say(
                f"{paths.last}: already trained for {resume_info.epoch} of {params.epochs} epochs; "
                "nothing to do"
            )
            history = read_training_log(paths.metrics, missing_ok=True)
            best = read_checkpoint_info(paths.best) if is_checkpoint(paths.best) else None
            return TrainResult(
                out_dir=paths.out_dir,
                start_epoch=resume_info.epoch,
                epochs_completed=resume_info.epoch,
                best_epoch=best.epoch if best else None,
                best_rsum=best.metrics.get("rsum") if best else None,
                history=history,
                nothing_to_do=True,
            )
    elif is_checkpoint(paths.last):
        raise TrainingError(
            f"{paths.last}: the output directory already holds a training run; pass --resume to continue it "
            "or choose another output directory"
        )
    start_epoch = resume_info.epoch if resume_info else 0
    init_info = _init_checkpoint(params) if params.init is not None and resume_info is None else None
    model_name = init_info.model_name if init_info is not None else params.model

    # ---- inputs (cheap checks first, the feature-table conversion last)
    source_info = resume_info or init_info
    text_kind = model_text_input(model_name)
    tokenizer: str | None = None
    bert: BertIdentity | None = None
    train_tokens: CaptionInputs | None = None  # BERT models: the cache opened below, read once
    if text_kind == "words":
        vocab, vocab_path, tokenizer = _run_vocabulary(source_info, vocab_path, say)
        side = TextSide("words", vocab=vocab, vocab_path=vocab_path)
        data_sizes = {"vocab_size": len(vocab)}
    else:  # cached BERT outputs; a run's checkpoints say which BERT, and another's cache is refused
        expected = bert_identity_of(source_info.extra, source_info.path) if source_info else None
        try:
            train_cache = open_split_cache(
                TextSide("bert", text_features_dir=text_features, bert=expected), train_captions
            )
        except UserError as exc:
            raise TrainingError(str(exc)) from exc
        bert = train_cache.identity
        side = TextSide("bert", text_features_dir=text_features, bert=bert)
        train_tokens = BertCaptions(train_cache, np.arange(len(train_cache), dtype=np.int64))
        vocab_path = None
        data_sizes = {"bert_dim": int(train_cache.bert_dim)}
    train_table = read_captions(train_captions)
    val_table = read_captions(val_captions)
    if context.local_rank == 0:
        table = open_feature_table(features_dir, cache_dir)
    barrier(context)
    if context.local_rank != 0:
        table = open_feature_table(features_dir, cache_dir)
    try:
        caption_rows = map_image_ids(
            table, train_table.image_ids, captions_source=train_captions, features_source=features_dir
        )
        val_layout = evaluation_layout(
            table,
            val_table,
            captions_source=val_captions,
            features_source=features_dir,
            max_images=params.val_max_images,
        )
    except DataError as exc:
        raise TrainingError(str(exc)) from exc
    try:
        if train_tokens is None:
            train_tokens = split_inputs(side, train_table.captions, train_captions)
        val_tokens = split_inputs(side, val_layout.captions, val_captions)
    except UserError as exc:
        raise TrainingError(str(exc)) from exc
    del train_table, val_table
    dataset = PairDataset(table, caption_rows, train_tokens)
    try:
        sampler = EpochBatchSampler(
            len(dataset),
            params.batch_size,
            seed=params.seed,
            rank=context.rank,
            world_size=context.world_size,
        )
    except ValueError as exc:
        raise TrainingError(f"{train_captions}: {exc}") from exc
    loader = pair_loader(dataset, sampler, num_workers=params.num_workers, pin_memory=device.type == "cuda")

    # ---- model, optimizer, scaler
    if resume_info is not None or init_info is not None:
        source = paths.last if resume_info is not None else Path(str(params.init))
        model, _ = load_checkpoint(source, expect_model=None if params.init else params.model)
        model_name = (resume_info or init_info).model_name
        wanted = {**data_sizes, "img_dim": table.feature_dim}
        found = {key: getattr(model.config, key, None) for key in wanted}
        if found != wanted:
            raise TrainingError(
                f"{source}: checkpoint has {found}, the inputs ({features_dir}, "
                f"{vocab_path or text_features}) have {wanted}"
            )
        if init_info is not None:
            say(_init_summary(params, init_info))
    else:
        model = build_seeded_model(params, img_dim=table.feature_dim, **data_sizes)
    model = model.to(device)
    optimizer = make_optimizer(params, model)
    autocast_dtype = _autocast_dtype(params, device)
    scaler = _make_scaler(autocast_dtype)
    if resume_info is not None:
        try:
            load_optimizer_state(optimizer, paths.last)
        except CheckpointError as exc:
            raise TrainingError(str(exc)) from exc
        scaler_state = resume_info.extra.get("grad_scaler")
        if scaler.is_enabled() and scaler_state:
            scaler.load_state_dict(scaler_state)
    step_module = wrap_model(
        ContrastiveStep(model, margin=params.margin, max_violation=params.max_violation, context=context),
        context,
    )

    # ---- bookkeeping carried over from an interrupted run
    history = (
        [r for r in read_training_log(paths.metrics, missing_ok=True) if r.epoch <= start_epoch]
        if resume_info
        else []
    )
    best_rsum, best_epoch = -math.inf, None
    if resume_info is not None and context.is_main:
        last_rsum = resume_info.metrics.get("rsum", -math.inf)
        best_info = read_checkpoint_info(paths.best) if is_checkpoint(paths.best) else None
        if best_info is None or last_rsum > best_info.metrics.get("rsum", -math.inf):
            copy_checkpoint(paths.last, paths.best)  # the run stopped between writing last and best
            best_info = read_checkpoint_info(paths.best)
        best_rsum, best_epoch = best_info.metrics.get("rsum", -math.inf), best_info.epoch
    if context.is_main:
        paths.out_dir.mkdir(parents=True, exist_ok=True)
        say(
            f"training {model_name} on {len(dataset):,} pairs, {len(sampler)} steps/epoch of "
            f"{params.batch_size}"
            f" on {device}"
            + (f" x {context.world_size} processes" if context.enabled else "")
            + (f", resuming after epoch {start_epoch}" if start_epoch else "")
        )

    show = progress and context.is_main
    with progress_bar("batch", console=console, disable=not show) as bar:
        for epoch in range(start_epoch, params.epochs):
            training = _run_epoch(
                epoch,
                params=params,
                context=context,
                step_module=step_module,
                model=model,
                optimizer=optimizer,
                scaler=scaler,
                sampler=sampler,
                loader=loader,
                autocast_dtype=autocast_dtype,
                bar=bar if show else None,
            )
            if context.is_main:
                val_start = time.perf_counter()
                val_scores = model_scores(
                    model,
                    table,
                    val_layout.image_rows,
                    val_tokens,
                    batch_size=params.encode_batch_size,
                    block_size=params.val_block_size,
                    device=device,
                    progress=bar if show else None,
                    autocast_dtype=autocast_dtype,
                    keep_tasks=False,
                )
                val_metrics = retrieval_metrics(val_scores, val_layout.captions_per_image)
                record = EpochRecord(
                    **training,
                    **{f"val_{key}": value for key, value in val_metrics.items()},
                    val_time_s=time.perf_counter() - val_start,
                    val_images=val_layout.num_images,
                )
                history.append(record)
                append_epoch(paths.metrics, record)
                checkpoint_metrics = {**val_metrics, "train_loss": record.train_loss}
                save_checkpoint(
                    paths.last,
                    model,
                    model_name=model_name,
                    model_config=model.config,
                    epoch=epoch + 1,
                    optimizer=optimizer,
                    lr=record.lr,
                    metrics=checkpoint_metrics,
                    rng_state={
                        "seed": params.seed,
                        "rule": "epoch order and torch RNG derived from (seed, epoch)",
                        "torch_cpu": bytes_to_json(torch.get_rng_state()),
                    },
                    train_params=params,
                    vocab_path=vocab_path,
                    tokenizer=tokenizer or SCAN_PIPE_TOKENIZER,
                    extra={
                        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "world_size": context.world_size,
                        **({BERT_EXTRA_KEY: bert.to_json()} if bert is not None else {}),
                    },
                )
                improved = val_metrics["rsum"] > best_rsum
                if improved:
                    best_rsum, best_epoch = val_metrics["rsum"], epoch + 1
                    copy_checkpoint(paths.last, paths.best)
                say(
                    f"epoch {epoch + 1}/{params.epochs}: loss {record.train_loss:.4f}  "
                    f"lr {record.lr:.2e}  "
                    f"val rsum {val_metrics['rsum']:.1f} (i2t R@1 {val_metrics['i2t_r1']:.1f}, t2i R@1 "
                    f"{val_metrics['t2i_r1']:.1f})" + ("  [best]" if improved else "")
                )
            barrier(context)

    return TrainResult(
        out_dir=paths.out_dir,
        start_epoch=start_epoch,
        epochs_completed=params.epochs,
        best_epoch=best_epoch,
        best_rsum=None if best_epoch is None else best_rsum,
        history=history,
    )


def _run_epoch(
    epoch: int,
    *,
    params: TrainParams,
    context: DistributedContext,
    step_module: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    sampler: EpochBatchSampler,
    loader: torch.utils.data.DataLoader,
    autocast_dtype: torch.dtype | None,
    bar: Progress | None,
) -> dict[str, Any]:
    """One pass over the epoch's batches; returns its `EpochRecord` fields up to the validation ones."""
    device = context.device
    lr = learning_rate(params, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sampler.set_epoch(epoch)
    model.train()
    task = bar.add_task(f"epoch {epoch + 1}/{params.epochs}", total=len(sampler), info="") if bar else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    started = time.perf_counter()
    with epoch_rng(params.seed, epoch, device):
        for batch in loader:
            loss, _ = train_step(
                step_module,
                model,
                optimizer,
                scaler,
                batch.to(device, non_blocking=True),
                grad_clip=params.grad_clip,
                autocast_dtype=autocast_dtype,
            )
            loss_sum += loss.double()
            steps += 1
            if bar is not None and task is not None:
                info = ""
                if steps % LOSS_DISPLAY_EVERY == 0 or steps == len(sampler):
                    info = f"loss {float(loss_sum) / steps:.4f}"
                    if not math.isfinite(float(loss_sum)):
                        raise TrainingError(
                            f"epoch {epoch + 1}, step {steps}: the loss is not finite (diverged)"
                        )
                bar.update(task, advance=1, **({"info": info} if info else {}))
    if bar is not None and task is not None:
        bar.remove_task(task)
    mean_loss = float(loss_sum) / max(steps, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(f"epoch {epoch + 1}: the training loss is not finite (diverged)")
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": all_reduce_mean(mean_loss, context),
        "steps": steps,
        "epoch_time_s": time.perf_counter() - started,
        "pairs_per_s": steps * params.batch_size / max(time.perf_counter() - started, 1e-9),
    }
