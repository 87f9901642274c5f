"""The official SCAN vocabulary JSON (`vocab/<data_name>_vocab.json`, kuanghuei/SCAN `vocab.py`), read as is.

An official model's embedding rows are indexed by this file's `word2idx`, whose order came from Python 2's
hash order: ids are taken from the file, never recomputed. Captions are tokenized with the official NLTK
tokenizer (`pipeline.official_tokenizer`); an unknown token is `<unk>` (3), as `Vocabulary.__call__` did.

The file layout, as `serialize_vocab`'s `json.dump` writes it:
`{"word2idx": {"<pad>": 0, ...}, "idx2word": {"0": "<pad>", ...}, "idx": <number of entries>}`
(`idx2word`'s keys are strings, JSON object keys). `idx2word` and `idx` are unused by the official code;
when present they must agree with `word2idx`, so a file edited by hand cannot silently mean two things.

`OfficialVocabulary` has `pipeline.vocab.Vocabulary`'s duck-typed interface, so evaluation and training
accept either.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_output
from pipeline.vocab import (
    END,
    END_ID,
    OFFICIAL_TOKENIZER,
    PAD,
    SPECIAL_TOKENS,
    START,
    START_ID,
    UNK_ID,
    VocabularyError,
)

MAX_VOCAB_BYTES = 256 * 1024 * 1024  # Flickr30K/COCO vocabularies are < 1 MB; refuse before reading more


class _DuplicateKeyError(ValueError):
    """A JSON object names one key twice (json.loads would silently keep the last)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _validated_word2idx(word2idx: Any) -> dict[str, int]:
    """`word2idx` checked: str -> int, ids exactly 0..n-1 once each, specials in place."""
    if not isinstance(word2idx, Mapping):
        raise VocabularyError(f"'word2idx' must be an object of word -> id, got {type(word2idx).__name__}")
    checked: dict[str, int] = {}
    owner: dict[int, str] = {}
    size = len(word2idx)
    for word, token_id in word2idx.items():
        if not isinstance(word, str):
            raise VocabularyError(f"'word2idx' key {word!r} is not a string")
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise VocabularyError(f"'word2idx'[{word!r}] is {token_id!r}, expected an integer id")
        if not 0 <= token_id < size:
            raise VocabularyError(
                f"'word2idx'[{word!r}] is {token_id}, outside 0..{size - 1} "
                f"(ids must be 0..n-1 for n = {size} entries)"
            )
        if token_id in owner:
            raise VocabularyError(
                f"'word2idx' gives id {token_id} to both {owner[token_id]!r} and {word!r}; each id must "
                "appear once"
            )
        owner[token_id] = word
        checked[word] = token_id
    for expected, token in enumerate(SPECIAL_TOKENS):
        if token not in checked:
            raise VocabularyError(f"'word2idx' lacks the special token {token!r} (must have id {expected})")
        if checked[token] != expected:
            raise VocabularyError(
                f"'word2idx'[{token!r}] is {checked[token]}, the official special tokens are "
                "<pad>=0 <start>=1 <end>=2 <unk>=3"
            )
    return checked


def _check_idx2word(idx2word: Any, word2idx: dict[str, int]) -> None:
    """`idx2word` (string keys "0".."n-1") must be word2idx inverted."""
    if not isinstance(idx2word, dict):
        raise VocabularyError(f"'idx2word' must be an object of id -> word, got {type(idx2word).__name__}")
    for word, token_id in word2idx.items():
        key = str(token_id)
        if key not in idx2word:
            raise VocabularyError(
                f"'idx2word' lacks key {key!r} ('word2idx' gives id {token_id} to {word!r})"
            )
        if idx2word[key] != word:
            raise VocabularyError(
                f"'idx2word'[{key!r}] is {idx2word[key]!r}, but 'word2idx' gives id {token_id} to {word!r}"
            )
    if len(idx2word) != len(word2idx):
        expected = {str(token_id) for token_id in word2idx.values()}
        extra = next(key for key in idx2word if key not in expected)
        raise VocabularyError(f"'idx2word' has key {extra!r}, which is no id of 'word2idx'")


class OfficialVocabulary:
    """The official word -> id table with the official tokenizer; `Vocabulary`'s interface."""

    tokenizer_name = OFFICIAL_TOKENIZER

    def __init__(self, word2idx: Mapping[str, int]) -> None:
        self.word2idx: dict[str, int] = _validated_word2idx(word2idx)
        self._words: list[str] = [""] * len(self.word2idx)
        for word, token_id in self.word2idx.items():
            self._words[token_id] = word

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word in self.word2idx

    def word_to_id(self, word: str) -> int:
        """Id of a token (as the tokenizer gives it), `<unk>`'s id when unknown, like the official lookup."""
        return self.word2idx.get(word, UNK_ID)

    def id_to_word(self, token_id: int) -> str:
        """The word of an id (IndexError when out of range)."""
        index = int(token_id)
        if not 0 <= index < len(self._words):
            raise IndexError(f"token id {token_id} out of range for a vocabulary of {len(self)}")
        return self._words[index]

    def tokens(self, caption: str) -> list[str]:
        """The official tokens of a caption (no `<start>`/`<end>`)."""
        from pipeline.official_tokenizer import official_tokens

        return official_tokens(caption)

    def encode(self, caption: str) -> list[int]:
        """`[<start>] + ids of the official tokens + [<end>]`, exactly what the official dataset returned."""
        lookup = self.word2idx.get
        return [START_ID, *(lookup(token, UNK_ID) for token in self.tokens(caption)), END_ID]

    def encode_batch(self, captions: Sequence[str]) -> list[list[int]]:
        """`encode` for each caption."""
        return [self.encode(caption) for caption in captions]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Words of the ids joined by spaces; `<start>`, `<end>`, `<pad>` dropped unless `skip_special`."""
        words = [self.id_to_word(i) for i in ids]
        if skip_special:
            words = [w for w in words if w not in (PAD, START, END)]
        return " ".join(words)

    def to_json(self) -> str:
        """The official serialization (`json.dump` defaults: ASCII escapes, `", "` and `": "` separators)."""
        payload = {
            "word2idx": self.word2idx,
            "idx2word": {str(i): word for i, word in enumerate(self._words)},
            "idx": len(self),
        }
        return json.dumps(payload)

    def save(self, path: str | Path) -> Path:
        """Write the official JSON layout atomically (readable by the official code)."""
        path = Path(path)
        data = self.to_json().encode("ascii")
        with atomic_output(path) as tmp_path:
            tmp_path.write_bytes(data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OfficialVocabulary:
        """Load and validate an official vocabulary JSON; a one-line `VocabularyError` names file and key."""
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"{path}: official vocabulary file not found")
        size = path.stat().st_size
        if size > MAX_VOCAB_BYTES:
            raise VocabularyError(
                f"{path}: {size} bytes, over the {MAX_VOCAB_BYTES // 2**20} MiB limit for a vocabulary file"
            )
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise VocabularyError(f"{path}: cannot read: {exc}") from None
        try:
            data = json.loads(raw, object_pairs_hook=_unique_object)
        except _DuplicateKeyError as exc:
            raise VocabularyError(f"{path}: {exc}") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise VocabularyError(f"{path}: not JSON: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise VocabularyError(
                f"{path}: top level is a JSON {type(data).__name__}, expected an object with 'word2idx'"
            )
        if "word2idx" not in data:
            raise VocabularyError(f"{path}: no 'word2idx' key; not an official SCAN vocabulary JSON")
        try:
            vocabulary = cls(data["word2idx"])
            if "idx2word" in data:
                _check_idx2word(data["idx2word"], vocabulary.word2idx)
            if "idx" in data:
                idx = data["idx"]
                if not isinstance(idx, int) or isinstance(idx, bool) or idx != len(vocabulary):
                    raise VocabularyError(
                        f"'idx' is {idx!r}, expected {len(vocabulary)} (the number of 'word2idx' entries)"
                    )
        except VocabularyError as exc:
            raise VocabularyError(f"{path}: {exc}") from None
        return vocabulary
