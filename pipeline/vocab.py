"""Word vocabulary of SCAN's GRU text encoder, and a WordPiece tokenizer for BERT-based text encoders.

The word vocabulary is a `tokenizers` WordLevel model, so encoding runs in Rust and the saved JSON is the
tokenizer's own format (loadable by any `tokenizers` user). Tokenisation mimics the NLTK `word_tokenize` the
original used, closely enough for a word vocabulary:

- normaliser: Unicode NFKC then lower-case (accents are kept, as NLTK keeps them);
- pre-tokeniser: one regex that keeps word runs (`\\w+`), runs of punctuation (`...`, `--`), and splits
  English contractions the Treebank way (`don't` -> `do n't`, `dog's` -> `dog 's`); whitespace is dropped.

Ids are deterministic: `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3, then the words whose count reaches
`min_count`, by count descending and then alphabetically. A post-processor wraps every encoding in
`<start> ... <end>`, as the original did before the GRU.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel, WordPiece

from pipeline.atomic import atomic_output
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.official_vocab import OfficialVocabulary

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
WORD_PATTERN = r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]+"
# How a vocabulary splits captions: scan-pipe's own regex words, or the official SCAN code's NLTK tokenizer
# (for vocabularies imported from official runs, whose ids the model's embeddings are tied to).
SCAN_PIPE_TOKENIZER = "scan_pipe_words"
OFFICIAL_TOKENIZER = "official_nltk"
TOKENIZERS: tuple[str, ...] = (SCAN_PIPE_TOKENIZER, OFFICIAL_TOKENIZER)


class VocabularyError(UserError):
    """A vocabulary file is missing or not a valid scan-pipe word vocabulary; the message names the file."""


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)


def _word_level_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, START_ID), (END, END_ID)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def tokenize_words(caption: str) -> list[str]:
    """The words of a caption as the vocabulary sees them (normalised and pre-tokenised)."""
    normalized = _normalizer().normalize_str(caption)
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(normalized)]


class Vocabulary:
    """Word <-> id mapping with `<start> ... <end>` wrapping, backed by a `tokenizers.Tokenizer`."""

    tokenizer_name = SCAN_PIPE_TOKENIZER

    def __init__(self, tokenizer: Tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        for token, expected in zip(SPECIAL_TOKENS, range(4), strict=True):
            if vocab.get(token) != expected:
                raise VocabularyError(
                    f"special token {token!r} must have id {expected}, has {vocab.get(token)}"
                )
        self.tokenizer = tokenizer
        self._id_to_word = {i: w for w, i in vocab.items()}

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and self.tokenizer.token_to_id(word) is not None

    def word_to_id(self, word: str) -> int:
        """Id of a word (already normalised), `<unk>`'s id when unknown."""
        found = self.tokenizer.token_to_id(word)
        return UNK_ID if found is None else found

    def id_to_word(self, token_id: int) -> str:
        """The word of an id (IndexError when out of range)."""
        try:
            return self._id_to_word[int(token_id)]
        except KeyError:
            raise IndexError(f"token id {token_id} out of range for a vocabulary of {len(self)}") from None

    def tokens(self, caption: str) -> list[str]:
        """The words `encode` gives ids to (no `<start>`/`<end>`), as `OfficialVocabulary.tokens` does."""
        return tokenize_words(caption)

    def encode(self, caption: str) -> list[int]:
        """Ids of a caption wrapped in `<start> ... <end>`; unknown words map to `<unk>`."""
        return self.tokenizer.encode(caption).ids

    def encode_batch(self, captions: Sequence[str]) -> list[list[int]]:
        """`encode` for many captions at once (parallel in the Rust tokenizer)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(captions))]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Words of the ids joined by spaces; `<start>`, `<end>`, `<pad>` dropped unless `skip_special`."""
        words = [self.id_to_word(i) for i in ids]
        if skip_special:
            words = [w for w in words if w not in (PAD, START, END)]
        return " ".join(words)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer's own JSON, atomically."""
        path = Path(path)
        text = self.tokenizer.to_str(pretty=True)
        with atomic_output(path) as tmp_path:
            tmp_path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load a vocabulary JSON written by `save` (clear error naming the file when missing or corrupt)."""
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"{path}: vocabulary file not found")
        text = path.read_text()
        try:
            json.loads(text)
            tokenizer = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise VocabularyError(f"{path}: not a valid tokenizer JSON: {exc}") from exc
        try:
            return cls(tokenizer)
        except VocabularyError as exc:
            raise VocabularyError(f"{path}: {exc}") from None


def load_vocabulary(
    path: str | Path, tokenizer: str = SCAN_PIPE_TOKENIZER
) -> Vocabulary | OfficialVocabulary:
    """Load a vocabulary of either kind: the tokenizer decides the file format and how captions are split."""
    if tokenizer == SCAN_PIPE_TOKENIZER:
        return Vocabulary.load(path)
    if tokenizer == OFFICIAL_TOKENIZER:
        from pipeline.official_vocab import OfficialVocabulary  # NLTK and its tables only when asked for

        return OfficialVocabulary.load(path)
    raise VocabularyError(f"{path}: unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")


def count_words(captions: Iterable[str]) -> Counter[str]:
    """Word counts over captions, tokenised exactly as the vocabulary tokenises."""
    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    return counts


def build_vocabulary(captions: Iterable[str], min_count: int = 4) -> Vocabulary:
    """Vocabulary of the words occurring at least `min_count` times (callers pass train + val captions)."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = count_words(captions)
    kept = sorted(
        (item for item in counts.items() if item[1] >= min_count and item[0] not in SPECIAL_TOKENS),
        key=lambda item: (-item[1], item[0]),
    )
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word, _ in kept:
        vocab[word] = len(vocab)
    return Vocabulary(_word_level_tokenizer(vocab))


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def vocabulary_from_files(caption_files: Sequence[str | Path], min_count: int = 4) -> tuple[Vocabulary, int]:
    """The vocabulary of the captions in `caption_files` (captions.parquet tables) and their caption count."""
    from pipeline.captions import read_captions  # only this entry point reads caption tables

    missing = [str(path) for path in caption_files if not Path(path).is_file()]
    if missing:
        raise VocabularyError(f"captions file not found: {', '.join(missing)}")
    captions: list[str] = []
    for path in caption_files:
        captions.extend(read_captions(path).captions)
    if not captions:
        raise VocabularyError(f"no captions in {', '.join(str(path) for path in caption_files)}")
    return build_vocabulary(captions, min_count=min_count), len(captions)


def load_wordpiece(
    vocab_txt: str | Path, *, lowercase: bool = True, max_length: int | None = None
) -> Tokenizer:
    """A BERT WordPiece tokenizer (`[CLS] ... [SEP]`) from a `vocab.txt`, e.g. for a BERT text encoder.

    Uses BERT's normaliser (clean text, Chinese-character spacing, accent stripping when lower-casing) and
    pre-tokeniser, as the uncased BERT checkpoints expect. `max_length` enables truncation.
    """
    path = Path(vocab_txt)
    if not path.is_file():
        raise VocabularyError(f"{path}: WordPiece vocab.txt not found")
    vocab: dict[str, int] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        token = line.rstrip("\r\n")
        if token and token not in vocab:
            vocab[token] = line_number
    missing = [token for token in BERT_SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise VocabularyError(f"{path}: not a BERT vocab.txt (missing special tokens {missing})")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(BERT_SPECIAL_TOKENS) + [t for t in ("[MASK]",) if t in vocab])
    if max_length is not None:
        tokenizer.enable_truncation(max_length=max_length)
    return tokenizer
