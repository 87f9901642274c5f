"""Build an index directory from a checkpoint and a feature store, incrementally: a killed build resumes.

Order of work, each step skipped when its output exists (every output is written atomically):

1. `index.json` with the identities of the checkpoint, store and caption file (`pipeline.index.meta`); a
   directory started from other inputs is refused, naming both;
2. image shards (`images/shard-*`), then caption shards (`captions/shard-*`) when a caption file is given:
   the encoders' outputs as float16 (`pipeline.index.shards`);
3. candidate generation: SCAN (`tokens`): k-means centroids of the region (and word) embeddings, each row's
   centroid per shard, then the inverted lists (`pipeline.index.tokens`); MMCA (`global`): FAISS indexes of
   i0 (and c0) (`pipeline.index.globals`);
4. `index.json` marked complete with its sizes. Search refuses an incomplete index.

`on_shard(side, shard)` is called after each newly written shard (tests inject a failure there).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from pipeline.captions import CaptionTable, read_captions
from pipeline.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint_info
from pipeline.distributed import resolve_device
from pipeline.feature_table import RegionFeatureTable
from pipeline.index.encode import (
    BertReader,
    encode_bert_captions,
    encode_image_rows,
    encode_word_captions,
    slice_tokens,
)
from pipeline.index.globals import build_global_index, index_file
from pipeline.index.kmeans import MAX_SAMPLE_ROWS, Assigner, default_nlist, sample_size, train_centroids
from pipeline.index.meta import (
    IndexMeta,
    SearchIndexError,
    captions_identity,
    check_captions,
    check_checkpoint,
    check_store,
    checkpoint_identity,
    meta_path,
    read_meta,
    store_identity,
    write_meta,
)
from pipeline.index.residuals import default_subspaces, encode_shards, train_codebooks
from pipeline.index.shards import ShardSet, remove_stale_staging, shard_count, shard_exists, write_shard
from pipeline.index.tokens import TOKENS_DIR, assign_shards, build_image_lists, save_array
from pipeline.loaders import TokenizedCaptions, open_feature_table, tokenize_captions
from pipeline.models.registry import model_family
from pipeline.progress import progress_bar
from pipeline.vocab import load_vocabulary

DEFAULT_SHARD_SIZE = 4096
IMAGES, CAPTIONS = "images", "captions"
GLOBAL_DIR = "global"

ShardHook = Callable[[str, int], None]


@dataclass
class BuildReport:
    """What a `build_index` call did."""

    index_dir: Path
    meta: IndexMeta
    written: dict[str, int] = field(default_factory=dict)  # side -> shards encoded by this call
    reused: dict[str, int] = field(default_factory=dict)  # side -> shards found from an earlier call
    seconds: float = 0.0
    already_complete: bool = False


def index_kind(model_name: str) -> str:
    """`tokens` for SCAN (per-region embeddings), `global` for MMCA (one embedding per item)."""
    return "tokens" if model_family(model_name) == "scan" else "global"


def _start(out: Path, wanted: IndexMeta) -> IndexMeta:
    """The metadata to continue with: a new index, or the interrupted one if it was started alike."""
    if meta_path(out).is_file():
        found = read_meta(out)
        check_checkpoint(found, wanted.checkpoint, out)
        check_store(found, wanted.features, out)
        check_captions(found, wanted.captions, out)
        for key in ("kind", "shard_size", "nlist", "num_images", "num_captions"):
            if getattr(found, key) != getattr(wanted, key):
                raise SearchIndexError(
                    f"{out}: index was started with {key} {getattr(found, key)!r}, not "
                    f"{getattr(wanted, key)!r}; use another --out or delete it"
                )
        return found
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SearchIndexError(f"{out}: exists and is not a search index; choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, wanted)
    return wanted


def _write_shards(
    out: Path,
    side: str,
    count: int,
    shard_size: int,
    encode: Callable[[int, int], tuple[np.ndarray, np.ndarray, dict[str, list]]],
    report: BuildReport,
    bar: Progress,
    on_shard: ShardHook | None,
) -> None:
    """Every missing shard of one side, encoded by `encode(start, stop)` and written atomically; shards a
    killed build finished are reused (the resume)."""
    root = out / side
    remove_stale_staging(root)
    task = bar.add_task(f"encode {side}", total=count, info="")
    for shard in range(shard_count(count, shard_size)):
        start, stop = shard * shard_size, min((shard + 1) * shard_size, count)
        if shard_exists(root, shard):
            report.reused[side] = report.reused.get(side, 0) + 1
        else:
            embeddings, lengths, items = encode(start, stop)
            write_shard(root, shard, embeddings, lengths, items)
            report.written[side] = report.written.get(side, 0) + 1
            if on_shard is not None:
                on_shard(side, shard)
        bar.update(task, advance=stop - start, info=f"shard {shard}")


def _encode_images(
    model: nn.Module,
    table: RegionFeatureTable,
    meta: IndexMeta,
    out: Path,
    report: BuildReport,
    *,
    batch_size: int,
    device: torch.device,
    bar: Progress,
    on_shard: ShardHook | None,
) -> None:
    def encode(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
        rows = np.arange(start, stop)
        embeddings, lengths = encode_image_rows(
            model,
            table,
            rows,
            global_embedding=meta.kind == "global",
            batch_size=batch_size,
            device=device,
        )
        return embeddings, lengths, {"ids": [table.image_id(int(row)) for row in rows]}

    _write_shards(out, IMAGES, meta.num_images, meta.shard_size, encode, report, bar, on_shard)


def _encode_captions(
    model: nn.Module,
    info: CheckpointInfo,
    captions: CaptionTable,
    meta: IndexMeta,
    out: Path,
    report: BuildReport,
    *,
    batch_size: int,
    device: torch.device,
    bar: Progress,
    on_shard: ShardHook | None,
) -> None:
    @functools.cache
    def bert() -> BertReader:  # loaded once, when a shard needs it
        return BertReader.for_checkpoint(info, device)

    @functools.cache
    def tokens() -> TokenizedCaptions:  # every caption tokenized once, when a shard needs them
        if info.vocab_path is None:
            raise SearchIndexError(f"{info.path}: checkpoint has no vocabulary for the captions")
        vocab = load_vocabulary(info.vocab_path, info.tokenizer)
        return tokenize_captions(captions.captions, vocab, source=info.vocab_path)

    def encode(start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
        texts = captions.captions[start:stop]
        if meta.kind == "global":
            embeddings = encode_bert_captions(model, bert(), texts, batch_size=batch_size, device=device)
            lengths = np.ones(len(texts), dtype=np.int32)
        else:
            embeddings, lengths = encode_word_captions(
                model, slice_tokens(tokens(), start, stop), batch_size=batch_size, device=device
            )
        return embeddings, lengths, {"ids": captions.image_ids[start:stop], "captions": texts}

    _write_shards(out, CAPTIONS, meta.num_captions, meta.shard_size, encode, report, bar, on_shard)


@dataclass
class TokenSide:
    """One side's candidate-generation data, as `build_token_side` left it on disk."""

    shards: ShardSet
    codes: np.ndarray  # (rows,) int32 centroid ids, shard order
    residuals: np.ndarray  # (rows, m) uint8 residual codes
    nlist: int
    seconds: dict[str, float] = field(default_factory=dict)  # per step, of this call


def build_token_side(
    shards: ShardSet,
    root: Path,
    side: str,
    *,
    nlist: int | None = None,
    seed: int = 0,
    bar: Progress | None = None,
) -> TokenSide:
    """Centroids, each row's centroid and each row's residual code for one side (`images`, `captions`);
    every step whose file exists is read back instead (the per-shard steps shard by shard)."""
    seconds: dict[str, float] = {}
    rows = int(shards.lengths.sum())

    def task(description: str, total: int) -> Callable[[int], None]:
        if bar is None:
            return lambda _shard: None
        handle = bar.add_task(description, total=total, info="")
        return lambda _shard: bar.update(handle, advance=1)

    started = time.perf_counter()
    centroids_path = root / f"{side}_centroids.npy"
    if centroids_path.is_file():
        centroids = np.load(centroids_path)
    else:
        nlist = nlist or default_nlist(rows)
        done = task(f"k-means {side} ({nlist} centroids)", 1)
        centroids = train_centroids(shards.sample_rows(sample_size(rows, nlist), seed), nlist, seed=seed)
        save_array(centroids_path, centroids)
        done(0)
    seconds["kmeans_s"] = time.perf_counter() - started
    started = time.perf_counter()
    codes = assign_shards(
        shards, centroids, root, side, on_shard=task(f"assign {side} rows", shards.num_shards)
    )
    seconds["assign_s"] = time.perf_counter() - started
    started = time.perf_counter()
    books_path = root / f"{side}_residual_codebooks.npy"
    if books_path.is_file():
        books = np.load(books_path)
    else:
        sample = shards.sample_rows(min(rows, MAX_SAMPLE_ROWS), seed + 1)
        residual = sample - centroids[Assigner(centroids).assign(sample)]
        books = train_codebooks(residual, default_subspaces(centroids.shape[1]), seed=seed)
        save_array(books_path, books)
    seconds["residual_train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    residuals = encode_shards(
        shards,
        centroids,
        codes,
        books,
        root,
        side,
        on_shard=task(f"residual codes {side}", shards.num_shards),
    )
    seconds["residual_encode_s"] = time.perf_counter() - started
    return TokenSide(shards, codes, residuals, centroids.shape[0], seconds)


def _build_tokens(out: Path, meta: IndexMeta, *, seed: int, bar: Progress) -> dict[str, object]:
    root = out / TOKENS_DIR
    shards = ShardSet(out / IMAGES, meta.num_images, meta.shard_size)
    images = build_token_side(shards, root, IMAGES, nlist=meta.nlist, seed=seed, bar=bar)
    build_image_lists(root, images.codes, shards.lengths, images.nlist, images.residuals)
    stats: dict[str, object] = {
        "images_nlist": images.nlist,
        "regions": int(shards.lengths.sum()),
        "max_regions": shards.max_length,
        "residual_bytes": int(images.residuals.shape[1]),
    }
    if meta.num_captions:
        caption_shards = ShardSet(out / CAPTIONS, meta.num_captions, meta.shard_size)
        captions = build_token_side(caption_shards, root, CAPTIONS, seed=seed, bar=bar)
        save_array(root / "captions_codes.npy", captions.codes)
        save_array(root / "captions_residual_codes.npy", captions.residuals)
        stats.update(captions_nlist=captions.nlist, caption_words=int(caption_shards.lengths.sum()))
    return stats


def _build_globals(out: Path, meta: IndexMeta, *, seed: int) -> dict[str, object]:
    stats: dict[str, object] = {}
    for side, count in ((IMAGES, meta.num_images), (CAPTIONS, meta.num_captions)):
        if count:
            shards = ShardSet(out / side, count, meta.shard_size)
            vectors = np.concatenate([shards.embeddings(s) for s in range(shards.num_shards)])
            path = index_file(out / GLOBAL_DIR, side)
            stats[f"{side}_faiss"] = build_global_index(vectors, path, seed=seed)
    return stats


def build_index(
    checkpoint: str | Path,
    features: str | Path,
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    captions: str | Path | None = None,
    nlist: int | None = None,
    batch_size: int = 128,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
    on_shard: ShardHook | None = None,
) -> BuildReport:
    """Build or resume the index at `out` for the images of `features` (and the captions of `captions`).

    `nlist` overrides the number of region centroids (SCAN; default `kmeans.default_nlist`).
    """
    if shard_size < 1:
        raise SearchIndexError(f"shard size must be at least 1, got {shard_size}")
    if nlist is not None and nlist < 1:
        raise SearchIndexError(f"nlist must be at least 1, got {nlist}")
    started = time.perf_counter()
    out = Path(out)
    info = read_checkpoint_info(checkpoint)
    table = open_feature_table(features, cache_dir)
    img_dim = info.model_config.get("img_dim")
    if img_dim is not None and img_dim != table.feature_dim:
        raise SearchIndexError(
            f"{features}: region features have dimension {table.feature_dim}, but checkpoint {info.path} "
            f"expects {img_dim}"
        )
    caption_table = read_captions(captions) if captions is not None else None
    kind = index_kind(info.model_name)
    wanted = IndexMeta(
        kind=kind,
        checkpoint=checkpoint_identity(info),
        features=store_identity(features),
        captions=captions_identity(captions) if captions is not None else None,
        shard_size=shard_size,
        embed_dim=int(info.model_config.get("embed_size", 0)),
        num_images=len(table),
        num_captions=len(caption_table) if caption_table is not None else 0,
        nlist=nlist if kind == "tokens" else None,
    )
    meta = _start(out, wanted)
    report = BuildReport(index_dir=out, meta=meta)
    if meta.complete:
        report.already_complete = True
        report.seconds = time.perf_counter() - started
        return report
    target = resolve_device(device)
    model, _ = load_checkpoint(info.path, map_location=target)
    with progress_bar("items", console=console, disable=not progress) as bar:
        _encode_images(
            model, table, meta, out, report, batch_size=batch_size, device=target, bar=bar, on_shard=on_shard
        )
        if caption_table is not None:
            _encode_captions(
                model,
                info,
                caption_table,
                meta,
                out,
                report,
                batch_size=batch_size,
                device=target,
                bar=bar,
                on_shard=on_shard,
            )
        if meta.num_images:
            if kind == "tokens":
                meta.stats = _build_tokens(out, meta, seed=seed, bar=bar)
            else:
                meta.stats = _build_globals(out, meta, seed=seed)
    meta.complete = True
    write_meta(out, meta)
    report.seconds = time.perf_counter() - started
    return report
