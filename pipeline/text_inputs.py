"""The text side of a split as a model reads it: word token ids (SCAN) or a frozen BERT's cached rows (MMCA).

Which one is the registry's `text_input` of the model. Word models carry their vocabulary and tokenizer in
their checkpoints; BERT models carry the identity of the BERT whose outputs they were trained on, and a
cache built by another BERT (or of other captions) is refused before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import UserError
from pipeline.loaders import BertCaptions, CaptionInputs, tokenize_captions

if TYPE_CHECKING:
    from pipeline.bert_text import BertIdentity
    from pipeline.official_vocab import OfficialVocabulary
    from pipeline.text_features import TextFeatureTable
    from pipeline.vocab import Vocabulary

BERT_EXTRA_KEY = "bert"  # checkpoint.json extra: the identity of the BERT a BERT-input model was trained on


class TextInputError(UserError):
    """The captions' text inputs do not fit the model; the message names the file or option."""


@dataclass(frozen=True)
class TextSide:
    """How a model's captions become its inputs."""

    kind: str  # "words" or "bert" (pipeline.models.registry.TextInput)
    vocab: Vocabulary | OfficialVocabulary | None = None
    vocab_path: Path | None = None
    text_features_dir: Path | None = None
    bert: BertIdentity | None = None  # the BERT the model expects; None: take the cache's


def open_split_cache(side: TextSide, captions_path: str | Path) -> TextFeatureTable:
    """The BERT cache of one split (`<text_features_dir>/<split>`), checked against captions and BERT."""
    from pipeline.text_features import TextFeatureTable, split_name

    if side.text_features_dir is None:
        raise TextInputError(
            "this model reads cached BERT outputs: pass --text-features (the folder `scan-pipe tokenize` "
            "writes for BERT-input models)"
        )
    cache = TextFeatureTable(side.text_features_dir / split_name(captions_path))
    cache.check_captions(captions_path)
    if side.bert is not None:
        cache.check_identity(side.bert)
    return cache


def split_inputs(side: TextSide, captions: Sequence[str], captions_path: str | Path) -> CaptionInputs:
    """The inputs of `captions`, the first rows of the table at `captions_path` (all of it, or a prefix)."""
    if side.kind == "words":
        if side.vocab is None:
            raise TextInputError(f"{captions_path}: no vocabulary to tokenize these captions with")
        return tokenize_captions(captions, side.vocab, source=side.vocab_path or captions_path)
    cache = open_split_cache(side, captions_path)
    if len(captions) > len(cache):
        raise TextInputError(f"{cache.root}: {len(cache)} cached captions, {len(captions)} asked for")
    return BertCaptions(cache, np.arange(len(captions), dtype=np.int64))


def bert_identity_of(extra: dict[str, Any], source: Path) -> BertIdentity:
    """The BERT identity a checkpoint records (`extra["bert"]`); a BERT model without one is refused."""
    from pipeline.bert_text import BertError, BertIdentity

    try:
        return BertIdentity.from_json(extra.get(BERT_EXTRA_KEY))
    except BertError as exc:
        raise TextInputError(f"{source}: checkpoint does not record its BERT ({exc})") from None
