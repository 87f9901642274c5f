"""The detector's class vocabularies: one parser for extraction and the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.labels import LabelVocabularyError, display_names, read_label_vocabulary


def test_vocabulary_lines_and_display_names(tmp_path: Path) -> None:
    path = tmp_path / "objects_vocab.txt"
    path.write_text("yolk,egg yolk\ntree\n sky \n\n\n")
    lines = read_label_vocabulary(path, expected=3)
    assert lines == ["yolk,egg yolk", "tree", "sky"]
    assert display_names(lines) == ["yolk", "tree", "sky"]


def test_bad_vocabularies_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LabelVocabularyError, match=r"missing\.txt: vocabulary file not found"):
        read_label_vocabulary(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LabelVocabularyError, match=r"empty\.txt: vocabulary file is empty"):
        read_label_vocabulary(empty)
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(LabelVocabularyError, match=r"short\.txt: 2 object names, but the detector has 1600"):
        read_label_vocabulary(short, expected=1600, kind="object")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match=r"binary\.txt"):
        read_label_vocabulary(binary)
