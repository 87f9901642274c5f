"""The model's own encoders on gallery images, caption sets and queries: what the index stores and searches.

Everything goes through `model.encode_images` / `model.encode_captions` in eval mode, exactly as evaluation
encodes a split (`pipeline.evaluation.encode_images`), so the stored rows are what the exact scorer reads.
SCAN's outputs are per region / per word (stored row by row); MMCA's per-item global embedding (i0, c0) is
what its index holds, and its exact score re-encodes the shortlisted items from their raw inputs.

MMCA reads captions as a frozen BERT's last layer (`pipeline.bert_text`); the BERT is the one its checkpoint
records, loaded from the recorded folder and refused when its hashes differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointInfo
from pipeline.errors import UserError
from pipeline.evaluation import eval_mode
from pipeline.feature_table import RegionFeatureTable
from pipeline.loaders import (
    CaptionDataset,
    ImageDataset,
    TokenizedCaptions,
    caption_loader,
    image_loader,
    pad_regions,
    pad_tokens,
)
from pipeline.vocab import UNK_ID, Vocabulary, load_vocabulary

if TYPE_CHECKING:  # only for annotations
    from pipeline.official_vocab import OfficialVocabulary


class QueryError(UserError):
    """A query the index cannot answer (empty text, unknown image id, a BERT that is not the model's)."""


def _valid_rows(embedded: Tensor, lengths: Tensor) -> np.ndarray:
    """The rows below each item's length, item after item, as float16."""
    positions = torch.arange(embedded.shape[1], device=embedded.device)
    mask = positions[None, :] < lengths.to(embedded.device)[:, None]
    return embedded[mask].float().cpu().numpy().astype(np.float16)


@torch.no_grad()
def encode_image_rows(
    model: nn.Module,
    table: RegionFeatureTable,
    rows: np.ndarray,
    *,
    global_embedding: bool,
    batch_size: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of table rows `rows`: ((regions or images, d) float16, (n,) rows per image)."""
    pieces: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    with eval_mode(model):
        for batch in image_loader(ImageDataset(table, rows), batch_size):
            regions = batch.region_features.to(device)
            region_lengths = batch.region_lengths.to(device)
            if global_embedding:
                embedded = model.encode_images(regions, region_lengths).embedding
                pieces.append(embedded.float().cpu().numpy().astype(np.float16))
                lengths.append(np.ones(len(batch.indices), dtype=np.int32))
            else:
                pieces.append(_valid_rows(model.encode_images(regions, region_lengths), region_lengths))
                lengths.append(batch.region_lengths.numpy().astype(np.int32))
    return np.concatenate(pieces), np.concatenate(lengths)


def slice_tokens(tokens: TokenizedCaptions, start: int, stop: int) -> TokenizedCaptions:
    """Captions `start:stop` of a tokenised table as their own table (shares the ids' memory)."""
    offsets = tokens.offsets[start : stop + 1]
    return TokenizedCaptions(tokens.token_ids[offsets[0] : offsets[-1]], offsets - offsets[0])


@torch.no_grad()
def encode_word_captions(
    model: nn.Module, tokens: TokenizedCaptions, *, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """SCAN word embeddings of every caption of `tokens`: ((words, d) float16 in caption order, lengths)."""
    per_caption: list[np.ndarray | None] = [None] * len(tokens)
    with eval_mode(model):
        for batch in caption_loader(CaptionDataset(tokens), batch_size, sort_by_length=True):
            inputs, lengths = batch.caption_inputs.to(device), batch.caption_lengths.to(device)
            embedded = model.encode_captions(inputs, lengths)
            for slot, index in enumerate(batch.indices.tolist()):
                n = int(batch.caption_lengths[slot])
                per_caption[index] = embedded[slot, :n].float().cpu().numpy().astype(np.float16)
    rows = [row for row in per_caption if row is not None]
    return np.concatenate(rows), tokens.lengths.astype(np.int32)


# ------------------------------------------------------------------------------------------------ MMCA


@dataclass
class BertReader:
    """The frozen BERT an MMCA checkpoint was trained on, turning caption texts into its input rows."""

    frozen: Any  # pipeline.bert_text.FrozenBert

    @classmethod
    def for_checkpoint(cls, info: CheckpointInfo, device: torch.device) -> BertReader:
        """Load the BERT the checkpoint records (its folder), refusing one whose hashes differ."""
        from pipeline.bert_text import bert_identity, load_frozen_bert, resolve_bert_path
        from pipeline.text_inputs import bert_identity_of

        expected = bert_identity_of(info.extra, info.path)
        folder = resolve_bert_path(expected.path)
        if not folder.is_dir():
            raise QueryError(f"{info.path}: the BERT it was trained on is not at {folder} any more")
        found = bert_identity(folder)
        if not found.same_model(expected):
            raise QueryError(
                f"{folder}: BERT ({found.describe()}) is not the one {info.path} was trained on "
                f"({expected.describe()})"
            )
        return cls(load_frozen_bert(folder, device))

    def rows(self, captions: Sequence[str]) -> tuple[Tensor, Tensor, list[list[int]]]:
        """Padded float32 last-layer rows (n, N, D), lengths (n,) and the WordPiece ids of `captions`."""
        from pipeline.bert_text import encode_captions

        pieces: list[Tensor] = []
        ids: list[list[int]] = []
        for chunk in encode_captions(self.frozen, list(captions), dtype="float32", progress=False):
            for i in range(chunk.count):
                start, stop = chunk.offsets[i], chunk.offsets[i + 1]
                pieces.append(torch.from_numpy(np.array(chunk.features[start:stop])))
                ids.append(chunk.token_ids[start:stop].tolist())
        padded, lengths = pad_tokens(pieces)
        return padded, lengths, ids

    @property
    def unknown_id(self) -> int | None:
        """The WordPiece id of unknown text."""
        return self.frozen.tokenizer.unk_token_id


@torch.no_grad()
def encode_bert_captions(
    model: nn.Module, bert: BertReader, captions: Sequence[str], *, batch_size: int, device: torch.device
) -> np.ndarray:
    """MMCA's c0 of every caption: (n, d) float16."""
    pieces: list[np.ndarray] = []
    with eval_mode(model):
        for start in range(0, len(captions), batch_size):
            rows, lengths, _ = bert.rows(captions[start : start + batch_size])
            embedded = model.encode_captions(rows.to(device), lengths.to(device)).embedding
            pieces.append(embedded.float().cpu().numpy().astype(np.float16))
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------------------------- queries


@dataclass
class TextQuery:
    """A query text as the model reads it; `embedding` is what the scorer and the shortlist use."""

    text: str
    words: list[str]  # the tokens the model sees
    unknown: list[str]  # words of the query outside the vocabulary (read as <unk>)
    embedding: Any  # SCAN: (1, L, d) float32 tensor; MMCA: MMCACaptions
    lengths: Tensor  # (1,) int64

    @property
    def all_unknown(self) -> bool:
        """No word of the query is known to the model."""
        return bool(self.words) and len(self.unknown) == len(self.words)


def query_vocabulary(info: CheckpointInfo) -> Vocabulary | OfficialVocabulary:
    """SCAN: the checkpoint's vocabulary, to read queries with (load it once per searcher)."""
    if info.vocab_path is None:
        raise QueryError(f"{info.path}: checkpoint carries no vocabulary to read the query with")
    return load_vocabulary(info.vocab_path, info.tokenizer)


@torch.no_grad()
def encode_word_query(
    model: nn.Module, vocab: Vocabulary | OfficialVocabulary, text: str, device: torch.device
) -> TextQuery:
    """Tokenise with the checkpoint's vocabulary and encode with its text encoder (SCAN)."""
    ids = vocab.encode(text)
    words = list(vocab.tokens(text))  # the words the ids stand for, by the vocabulary's own tokenizer
    unknown = [word for word, token in zip(words, ids[1:-1], strict=False) if token == UNK_ID]
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    lengths = torch.tensor([len(ids)], dtype=torch.long)
    with eval_mode(model):
        embedding = model.encode_captions(tokens, lengths.to(device)).float()
    return TextQuery(text, words, unknown, embedding, lengths)


@torch.no_grad()
def encode_bert_query(model: nn.Module, bert: BertReader, text: str, device: torch.device) -> TextQuery:
    """Read the query with the model's BERT and encode it with MMCA's text side."""
    rows, lengths, ids = bert.rows([text])
    pieces = bert.frozen.tokenizer.convert_ids_to_tokens(ids[0][1:-1])
    unknown = [piece for piece, token in zip(pieces, ids[0][1:-1], strict=True) if token == bert.unknown_id]
    with eval_mode(model):
        embedding = model.encode_captions(rows.to(device), lengths.to(device))
    return TextQuery(text, list(pieces), unknown, embedding, lengths)


@torch.no_grad()
def encode_raw_images(
    model: nn.Module, features: Sequence[np.ndarray], device: torch.device
) -> tuple[Any, Tensor]:
    """The model's image side of raw region features (n images): (encoding, region lengths)."""
    regions, lengths = pad_regions([torch.from_numpy(np.asarray(f, dtype=np.float32)) for f in features])
    with eval_mode(model):
        return model.encode_images(regions.to(device), lengths.to(device)), lengths
