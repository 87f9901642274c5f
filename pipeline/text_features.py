"""The cache of frozen-BERT rows for one captions table: computed once, memory-mapped at training time.

MMCA reads BERT's last hidden layer per caption (mmca.md §2.3), and BERT is frozen, so each caption is
encoded once (`pipeline.bert_text`) and the rows are stored here instead of rerunning BERT every epoch.

A cache is a directory, built under a hidden temporary name and renamed into place (a killed run leaves
the old cache or none, never half of one):
- `features.arrow`: an uncompressed Arrow IPC file, one row per caption in the captions table's order:
  `image_id` (string), `caption` (string), `token_ids` (list<int32>: `[CLS] … [SEP]`) and `word_features`
  (`list<fixed_size_list<float16|float32, D>>`, one fixed-size list per token, as the region store's
  `features`). Memory-mapped, `word_features(row)` is a view into the page cache; pandas, pyarrow and
  DuckDB read the file as it is.
- `meta.json`: format and version, the BERT identity, dtype, D, counts, max_words and the truncated count,
  the captions file's path, sha256 and row count, the record batches' sizes, the package version. The
  Arrow schema carries the build's fixed part of it (format, identity, dtype, D, max_words, captions sha256
  and a random build id), and opening checks both agree, so a meta.json from another build is refused.

float16 by default: half the disk and page cache (COCO's 616k captions x ~14 pieces x 768 are ~13 GB in
float16), while BERT's last-layer values (|x| of a few units, LayerNorm output) keep ~3 significant digits,
far below what training on them resolves; float32 is there for exact comparisons.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import __version__
from pipeline.atomic import fsync_directory, fsync_file, replace_directory, write_text_atomic
from pipeline.bert_text import (
    TEXT_DTYPES,
    BertError,
    BertIdentity,
    EncodedChunk,
    FrozenBert,
    TextDtype,
    bert_identity,
    encode_captions,
    load_frozen_bert,
    resolve_bert_path,
    resolve_max_words,
    sha256_file,
)
from pipeline.captions import read_captions
from pipeline.errors import UserError

FORMAT_NAME = "scan-pipe-text-features"
FORMAT_VERSION = 1
ARROW_FILE = "features.arrow"
META_FILE = "meta.json"
NOT_NEEDED_FILE = "not_needed.json"
SCHEMA_KEY = b"scan_pipe_text"
# The fixed part of meta.json that the Arrow schema repeats (known before the first caption is encoded).
_BUILD_KEYS = ("format", "format_version", "build_id", "bert", "dtype", "bert_dim", "max_words")


def _fixed_rows(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, rows) of a `list<fixed_size_list<T, D>>` column: row i is `rows[offsets[i]:offsets[i + 1]]`,
    an (n, D) read-only view of the Arrow buffer (the map), no copy."""
    fixed = array.values
    width = fixed.type.list_size
    flat = fixed.values.to_numpy(zero_copy_only=True)[
        fixed.offset * width : (fixed.offset + len(fixed)) * width
    ]
    return array.offsets.to_numpy(), flat.reshape(len(fixed), width)


class TextFeaturesError(UserError):
    """A text-feature cache that is missing, damaged, foreign, or built from other captions / another BERT."""


def text_feature_schema(dtype: TextDtype, bert_dim: int, build: dict[str, Any] | None = None) -> pa.Schema:
    """The cache's Arrow schema; `build` goes into its `scan_pipe_text` metadata."""
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("caption", pa.string(), nullable=False),
            pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("word_features", pa.list_(pa.list_(value_type, bert_dim)), nullable=False),
        ],
        metadata=None if build is None else {SCHEMA_KEY: json.dumps(build, sort_keys=True).encode()},
    )


@dataclass(frozen=True)
class TextFeatureSummary:
    """What one `write_text_features` run wrote, for the stage's printout."""

    out_dir: Path
    captions_path: Path
    num_captions: int
    num_tokens: int
    max_length: int
    truncated: int
    max_words: int
    bert_dim: int
    dtype: str
    identity: BertIdentity
    seconds: float  # encoding only (the model was loaded before)

    @property
    def captions_per_second(self) -> float:
        return self.num_captions / self.seconds if self.seconds > 0 else float("inf")


def split_name(captions_path: str | Path) -> str:
    """`data/prepared/test/captions.parquet` -> `test`: the cache of a split lives at `DIR/<split>`."""
    path = Path(captions_path)
    return path.parent.name or path.stem


def _read_meta(root: Path) -> dict[str, Any]:
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise TextFeaturesError(f"{meta_path}: not found; {root} is not a text-feature cache")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TextFeaturesError(f"{meta_path}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TextFeaturesError(f"{meta_path}: not a {FORMAT_NAME} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TextFeaturesError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, this scan-pipe reads "
            f"{FORMAT_VERSION}; rebuild the cache with `scan-pipe tokenize`"
        )
    return meta


def is_text_feature_cache(path: str | Path) -> bool:
    """Whether `path` holds a cache's meta.json (damaged or not): what may be replaced on a rebuild."""
    try:
        _read_meta(Path(path))
    except TextFeaturesError:
        return False
    return True


def check_output_dir(out_dir: str | Path) -> Path:
    """`out_dir` may be absent, empty or an earlier cache; anything else is refused, never replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TextFeaturesError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_text_feature_cache(out_dir):
        raise TextFeaturesError(f"{out_dir}: exists and is not a text-feature cache; refusing to replace it")
    return out_dir


def _record_batch(
    image_ids: list[str], captions: list[str], chunk: EncodedChunk, schema: pa.Schema
) -> pa.RecordBatch:
    """One record batch of the cache from an encoded chunk (flat numpy buffers, no per-row objects)."""
    offsets = pa.array(chunk.offsets.astype(np.int32))
    rows = pa.FixedSizeListArray.from_arrays(pa.array(chunk.features.reshape(-1)), chunk.features.shape[1])
    arrays = [
        pa.array(image_ids, type=pa.string()),
        pa.array(captions, type=pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(chunk.token_ids, type=pa.int32())),
        pa.ListArray.from_arrays(offsets, rows),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_text_features(
    captions_path: str | Path,
    out_dir: str | Path,
    bert: str | Path | FrozenBert,
    *,
    batch_size: int = 64,
    max_words: int | None = None,
    dtype: TextDtype = "float16",
    device: str = "auto",
    progress: bool = True,
) -> TextFeatureSummary:
    """Encode every caption of a captions table with a frozen BERT and write the cache at `out_dir`.

    `bert`: a loaded `FrozenBert` (several splits share one load), `"sample"` or a BERT folder. Every check
    (dtype, captions table, output directory, BERT folder, max_words) runs before the first caption.
    """
    if dtype not in TEXT_DTYPES:
        raise TextFeaturesError(f"dtype must be one of {TEXT_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise TextFeaturesError(f"batch_size must be at least 1, got {batch_size}")
    captions_path, out_dir = Path(captions_path), check_output_dir(out_dir)
    table = read_captions(captions_path)
    frozen = bert if isinstance(bert, FrozenBert) else load_frozen_bert(resolve_bert_path(bert), device)
    limit = resolve_max_words(frozen, max_words)
    build = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "build_id": secrets.token_hex(8),
        "bert": frozen.identity.to_json(),
        "dtype": dtype,
        "bert_dim": frozen.hidden_size,
        "max_words": limit,
    }
    schema = text_feature_schema(dtype, frozen.hidden_size, build)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
    tmp_dir.mkdir()
    try:
        batch_rows: list[int] = []
        num_tokens = max_length = truncated = 0
        started = time.perf_counter()
        arrow_path = tmp_dir / ARROW_FILE
        with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for chunk in encode_captions(
                frozen,
                table.captions,
                batch_size=batch_size,
                max_words=limit,
                dtype=dtype,
                progress=progress,
                description=f"BERT {split_name(captions_path)}",
            ):
                stop = chunk.start + chunk.count
                ids, texts = table.image_ids[chunk.start : stop], table.captions[chunk.start : stop]
                writer.write_batch(_record_batch(ids, texts, chunk, schema))
                batch_rows.append(chunk.count)
                num_tokens += len(chunk.token_ids)
                max_length = max(max_length, int(np.diff(chunk.offsets).max(initial=0)))
                truncated += chunk.truncated
        seconds = time.perf_counter() - started
        fsync_file(arrow_path)
        meta = {
            **build,
            "package_version": __version__,
            "num_captions": len(table),
            "num_tokens": num_tokens,
            "max_length": max_length,
            "truncated": truncated,
            "batch_rows": batch_rows,
            "captions": {
                "path": str(captions_path),
                "sha256": sha256_file(captions_path),
                "rows": len(table),
            },
            "arrow_sha256": sha256_file(arrow_path),
        }
        write_text_atomic(tmp_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fsync_directory(tmp_dir)
        replace_directory(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return TextFeatureSummary(
        out_dir=out_dir,
        captions_path=captions_path,
        num_captions=len(table),
        num_tokens=num_tokens,
        max_length=max_length,
        truncated=truncated,
        max_words=limit,
        bert_dim=frozen.hidden_size,
        dtype=dtype,
        identity=frozen.identity,
        seconds=seconds,
    )


def plan_split_features(captions_paths: Sequence[str | Path], out_dir: str | Path) -> list[tuple[Path, Path]]:
    """(captions file, cache dir `out_dir/<split>`) per file, after checking every table and target.

    Cheap checks for the stage to run before loading BERT: distinct split names, readable captions tables,
    replaceable targets.
    """
    out_dir = Path(out_dir)
    plan: list[tuple[Path, Path]] = []
    seen: dict[str, Path] = {}
    for raw in captions_paths:
        path = Path(raw)
        name = split_name(path)
        if name in seen:
            raise TextFeaturesError(
                f"{path} and {seen[name]} both map to split {name!r} (the captions file's folder name)"
            )
        seen[name] = path
        read_captions(path)
        plan.append((path, check_output_dir(out_dir / name)))
    return plan


def write_not_needed(out_dir: str | Path, model_name: str) -> Path:
    """`out_dir/not_needed.json` for a word-input model, so the stage's declared output always exists."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / NOT_NEEDED_FILE
    record = {
        "model": model_name,
        "text_input": "words",
        "bert_features_needed": False,
        "reason": f"model {model_name!r} reads word ids of the vocabulary, not BERT features",
    }
    write_text_atomic(target, json.dumps(record, indent=2) + "\n")
    return target


class TextFeatureTable:
    """A cache opened memory-mapped: per-caption BERT rows as views, padded batches, identity checks.

    Opening reads meta.json, the Arrow footer and the list offsets (one int per caption), never the rows.
    Pickles as its path, so DataLoader workers reopen the map themselves.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise TextFeaturesError(f"{self.root}: text-feature cache not found")
        self.meta = _read_meta(self.root)
        meta_path = self.root / META_FILE
        try:
            self.identity = BertIdentity.from_json(self.meta.get("bert"))
        except BertError as exc:
            raise TextFeaturesError(f"{meta_path}: {exc}") from exc
        self.dtype = str(self.meta.get("dtype"))
        self.bert_dim = self.meta.get("bert_dim")
        self.num_captions = self.meta.get("num_captions")
        batch_rows = self.meta.get("batch_rows")
        if (
            self.dtype not in TEXT_DTYPES
            or not isinstance(self.bert_dim, int)
            or not isinstance(self.num_captions, int)
            or not isinstance(batch_rows, list)
            or sum(batch_rows) != self.num_captions
        ):
            raise TextFeaturesError(f"{meta_path}: dtype, bert_dim, num_captions or batch_rows invalid")
        self.path = self.root / ARROW_FILE
        if not self.path.is_file():
            raise TextFeaturesError(f"{self.path}: not found; rebuild the cache with `scan-pipe tokenize`")
        try:
            self._source = pa.memory_map(str(self.path), "r")
            self._reader = pa.ipc.open_file(self._source)
            schema = self._reader.schema
            build = json.loads((schema.metadata or {})[SCHEMA_KEY])
            sizes = [self._reader.get_batch(k).num_rows for k in range(self._reader.num_record_batches)]
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            raise TextFeaturesError(f"{self.path}: not a readable text-feature file ({exc})") from exc
        if not schema.equals(text_feature_schema(self.dtype, self.bert_dim)):  # type: ignore[arg-type]
            raise TextFeaturesError(
                f"{self.path}: columns {schema.names} / types differ from the cache schema"
            )
        if any(build.get(key) != self.meta.get(key) for key in _BUILD_KEYS):
            raise TextFeaturesError(f"{self.path}: written by another build than {meta_path} describes")
        if sizes != batch_rows:
            raise TextFeaturesError(f"{self.path}: record batches {sizes} differ from {meta_path}")
        self._batch_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pieces = []
        for k in range(len(sizes)):
            record_batch = self._reader.get_batch(k)
            word_offsets = record_batch.column("word_features").offsets.to_numpy()
            token_offsets = record_batch.column("token_ids").offsets.to_numpy()
            if not np.array_equal(word_offsets, token_offsets):
                raise TextFeaturesError(f"{self.path}: batch {k}: token_ids and word_features lengths differ")
            pieces.append(np.diff(word_offsets).astype(np.int64))
        self.lengths: np.ndarray = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if len(self.lengths) and int(self.lengths.min()) < 1:
            raise TextFeaturesError(f"{self.path}: a caption without tokens")

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    def __len__(self) -> int:
        return self.num_captions

    def verify(self) -> None:
        """Hash features.arrow against meta.json (reads the whole file): bit rot or an edited file."""
        if sha256_file(self.path) != self.meta.get("arrow_sha256"):
            raise TextFeaturesError(
                f"{self.path}: sha256 differs from {self.root / META_FILE}; the file changed"
            )

    @property
    def truncated(self) -> int:
        """Captions cut to max_words when the cache was built."""
        return int(self.meta.get("truncated", 0))

    def _column(self, name: str) -> list[Any]:
        return [
            value
            for k in range(self._reader.num_record_batches)
            for value in self._reader.get_batch(k).column(name).to_pylist()
        ]

    @property
    def image_ids(self) -> list[str]:
        """Image id of every caption in table order (built on each call)."""
        return self._column("image_id")

    @property
    def captions(self) -> list[str]:
        """Caption texts in table order (built on each call)."""
        return self._column("caption")

    def _locate(self, row: int) -> tuple[int, int]:
        """(record batch, row inside it) of caption `row`."""
        if not -self.num_captions <= row < self.num_captions:
            raise IndexError(f"row {row} out of range for a cache of {self.num_captions} captions")
        row %= self.num_captions
        k = int(np.searchsorted(self._batch_starts, row, side="right")) - 1
        return k, row - int(self._batch_starts[k])

    def word_features(self, row: int) -> np.ndarray:
        """(n, bert_dim) rows of caption `row`: a read-only view into the map, in the stored dtype."""
        k, local = self._locate(row)
        views = self._batches.get(k)
        if views is None:
            views = _fixed_rows(self._reader.get_batch(k).column("word_features"))
            self._batches[k] = views
        offsets, rows = views
        return rows[offsets[local] : offsets[local + 1]]

    def token_ids(self, row: int) -> np.ndarray:
        """The `[CLS] … [SEP]` WordPiece ids of caption `row` (int32)."""
        k, local = self._locate(row)
        return self._reader.get_batch(k).column("token_ids")[local].values.to_numpy()

    def batch(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions `rows` for MMCA: ((B, max_len, D) float32 zero-padded, (B,) int64 lengths)."""
        indices = [int(i) for i in np.asarray(rows).reshape(-1)]
        lengths = np.array([self.lengths[i] for i in indices], dtype=np.int64)
        padded = np.zeros((len(indices), int(lengths.max(initial=0)), self.bert_dim), dtype=np.float32)
        for slot, row in enumerate(indices):
            padded[slot, : lengths[slot]] = self.word_features(row)
        return torch.from_numpy(padded), torch.from_numpy(lengths)

    def check_identity(self, expected: BertIdentity | str | Path) -> None:
        """Refuse a cache built by another BERT (`expected`: an identity, a BERT folder or "sample")."""
        if not isinstance(expected, BertIdentity):
            expected = bert_identity(resolve_bert_path(expected))
        if not self.identity.same_model(expected):
            raise TextFeaturesError(
                f"{self.root}: built by BERT {self.identity.describe()}, not by {expected.describe()}; "
                "rebuild it with `scan-pipe tokenize`"
            )

    def check_captions(self, captions_path: str | Path) -> None:
        """Refuse a cache of other captions: same row count, image ids and texts as `captions_path`."""
        table = read_captions(captions_path)
        source = self.meta.get("captions", {}).get("path", "?")
        if len(table) != self.num_captions:
            raise TextFeaturesError(
                f"{self.root}: built from {source} ({self.num_captions} captions), but {captions_path} has "
                f"{len(table)}; rebuild it with `scan-pipe tokenize`"
            )
        for name, mine, theirs in (
            ("image_id", self.image_ids, table.image_ids),
            ("caption", self.captions, table.captions),
        ):
            if mine != theirs:
                row = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
                raise TextFeaturesError(
                    f"{self.root}: built from {source}, whose {name} of row {row} ({mine[row]!r}) differs "
                    f"from {captions_path} ({theirs[row]!r}); rebuild it with `scan-pipe tokenize`"
                )
