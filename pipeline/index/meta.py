"""An index directory's metadata (`index.json`) and the identities of what it was built from.

An index is only meaningful with the checkpoint whose encoders made its embeddings and the feature store
whose regions they encode: a retrained checkpoint or a re-extracted store silently changes every score. So
`index.json` records both identities (a checkpoint's sha256 over its weights, model config, tokenizer and
vocabulary; a store's `parts_fingerprint`), a resumed build must match them, and opening the index with
another checkpoint or store is an error naming both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text_atomic
from pipeline.checkpoint import MODEL_FILE, CheckpointInfo
from pipeline.errors import UserError
from pipeline.store import list_parts, parts_fingerprint

INDEX_FORMAT = "scan-pipe-search-index"
INDEX_FORMAT_VERSION = 1
INDEX_JSON = "index.json"
_HASH_BLOCK = 1 << 20


class SearchIndexError(UserError):
    """An index directory is missing, incomplete, empty or does not fit the given checkpoint or store."""


def _hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which trained model made the embeddings: its folder and a hash of everything that decides them."""

    path: str
    model_name: str
    sha256: str

    def describe(self) -> str:
        """One line for error messages."""
        return f"checkpoint {self.path} ({self.model_name}, sha256 {self.sha256[:12]})"


def checkpoint_identity(info: CheckpointInfo) -> CheckpointIdentity:
    """sha256 over the weights file, the model name/config, the tokenizer and the vocabulary file.

    The epoch, metrics and optimizer state are left out: they do not change an embedding.
    """
    digest = hashlib.sha256()
    config = {"model_name": info.model_name, "model_config": info.model_config, "tokenizer": info.tokenizer}
    digest.update(json.dumps(config, sort_keys=True).encode())
    _hash_file(digest, info.path / MODEL_FILE)
    if info.vocab_path is not None and info.vocab_path.is_file():
        _hash_file(digest, info.vocab_path)
    return CheckpointIdentity(str(info.path), info.model_name, digest.hexdigest())


@dataclass(frozen=True)
class StoreIdentity:
    """Which feature store holds the indexed images: its folder and its parts' fingerprint."""

    path: str
    fingerprint: str

    def describe(self) -> str:
        """One line for error messages."""
        return f"feature store {self.path} (parts fingerprint {self.fingerprint[:12]})"


def store_identity(root: str | Path) -> StoreIdentity:
    """The store's parts fingerprint (names, sizes, modification times): cheap, no part is opened."""
    root = Path(root)
    parts = list_parts(root) if root.is_dir() else []
    return StoreIdentity(str(root), parts_fingerprint(parts))


@dataclass(frozen=True)
class CaptionsIdentity:
    """Which caption file the caption side of the index encodes."""

    path: str
    sha256: str

    def describe(self) -> str:
        """One line for error messages."""
        return f"captions {self.path} (sha256 {self.sha256[:12]})"


def captions_identity(path: str | Path) -> CaptionsIdentity:
    """sha256 of the captions file."""
    digest = hashlib.sha256()
    _hash_file(digest, Path(path))
    return CaptionsIdentity(str(path), digest.hexdigest())


@dataclass
class IndexMeta:
    """Everything in `index.json`. `kind` is `tokens` (SCAN: region/word embeddings + centroid lists) or
    `global` (MMCA: one embedding per image/caption in a FAISS index)."""

    kind: str
    checkpoint: CheckpointIdentity
    features: StoreIdentity
    captions: CaptionsIdentity | None
    shard_size: int
    embed_dim: int
    num_images: int
    num_captions: int = 0
    nlist: int | None = None  # requested centroids (None: the size rule)
    complete: bool = False
    stats: dict[str, Any] = field(default_factory=dict)  # filled when complete: centroids, regions, ...

    def to_json(self) -> dict[str, Any]:
        """The `index.json` document."""
        return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> IndexMeta:
        """Parse `index.json`; a foreign or malformed document is a SearchIndexError naming the file."""
        if data.get("format") != INDEX_FORMAT or data.get("format_version") != INDEX_FORMAT_VERSION:
            raise SearchIndexError(
                f"{source}: not a scan-pipe search index of format version {INDEX_FORMAT_VERSION}"
            )
        try:
            captions = data["captions"]
            return cls(
                kind=str(data["kind"]),
                checkpoint=CheckpointIdentity(**data["checkpoint"]),
                features=StoreIdentity(**data["features"]),
                captions=None if captions is None else CaptionsIdentity(**captions),
                shard_size=int(data["shard_size"]),
                embed_dim=int(data["embed_dim"]),
                num_images=int(data["num_images"]),
                num_captions=int(data.get("num_captions", 0)),
                nlist=data.get("nlist"),
                complete=bool(data.get("complete", False)),
                stats=dict(data.get("stats") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SearchIndexError(f"{source}: malformed index metadata ({exc!r})") from exc


def meta_path(index_dir: str | Path) -> Path:
    """Where an index keeps its metadata."""
    return Path(index_dir) / INDEX_JSON


def read_meta(index_dir: str | Path) -> IndexMeta:
    """The metadata of an index directory; a clear error when it is not one."""
    path = meta_path(index_dir)
    if not Path(index_dir).is_dir():
        raise SearchIndexError(f"{index_dir}: index directory not found")
    if not path.is_file():
        raise SearchIndexError(f"{index_dir}: not a search index (no {INDEX_JSON}); build one first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SearchIndexError(f"{path}: unreadable index metadata: {exc}") from exc
    if not isinstance(data, dict):
        raise SearchIndexError(f"{path}: index metadata is not a JSON object")
    return IndexMeta.from_json(data, path)


def write_meta(index_dir: str | Path, meta: IndexMeta) -> Path:
    """Write `index.json` atomically."""
    path = meta_path(index_dir)
    write_text_atomic(path, json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def check_checkpoint(meta: IndexMeta, given: CheckpointIdentity, index_dir: str | Path) -> None:
    """The index's embeddings come from `given`'s model; else an error naming both checkpoints."""
    if given.sha256 != meta.checkpoint.sha256:
        raise SearchIndexError(
            f"{index_dir}: index was built from {meta.checkpoint.describe()}, not {given.describe()}; "
            "rebuild the index with this checkpoint or use the one it was built from"
        )


def check_store(meta: IndexMeta, given: StoreIdentity, index_dir: str | Path) -> None:
    """The index's images are `given`'s (same parts); else an error naming both stores."""
    if given.fingerprint != meta.features.fingerprint:
        raise SearchIndexError(
            f"{index_dir}: index was built from {meta.features.describe()}, not {given.describe()}; "
            "rebuild the index with this store or use the one it was built from"
        )


def check_captions(meta: IndexMeta, given: CaptionsIdentity | None, index_dir: str | Path) -> None:
    """A resumed build encodes the same captions (or none) as the interrupted one."""
    before = meta.captions
    if (before is None) != (given is None) or (before and given and before.sha256 != given.sha256):
        old = before.describe() if before else "no captions"
        new = given.describe() if given else "no captions"
        raise SearchIndexError(
            f"{index_dir}: index was started with {old}, not {new}; use another --out or delete it"
        )
