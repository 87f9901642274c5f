"""The detector's class vocabularies (Visual Genome `objects_vocab.txt`, `attributes_vocab.txt`): one parser.

Line i names class id i (0-based, background excluded); a line may list synonyms separated by commas, and the
first one is the display name. Extraction records the lines in the store metadata; the report labels boxes
with them, or with a file the user passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import UserError


class LabelVocabularyError(UserError):
    """A vocabulary file is missing, empty or does not fit the detector's head."""


def read_label_vocabulary(path: str | Path, expected: int | None = None, kind: str = "class") -> list[str]:
    """The lines of a vocabulary file (trailing blank lines dropped); `expected`: the head's class count,
    `kind`: "object" or "attribute", for the message."""
    path = Path(path)
    if not path.is_file():
        raise LabelVocabularyError(f"{path}: vocabulary file not found")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelVocabularyError(f"{path}: not a readable UTF-8 text file ({exc})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise LabelVocabularyError(f"{path}: vocabulary file is empty")
    if expected is not None and len(lines) != expected:
        raise LabelVocabularyError(
            f"{path}: {len(lines)} {kind} names, but the detector has {expected} {kind} classes"
        )
    return lines


def display_names(lines: Sequence[str]) -> list[str]:
    """The first synonym of each vocabulary line."""
    return [str(line).split(",")[0].strip() for line in lines]
