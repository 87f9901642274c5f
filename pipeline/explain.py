"""Why a pair matched: the attention weights and per-item relevances behind one image-caption score.

The numbers are the scorer's own, so the figures show the weights that made the score:

* SCAN (every registered variant): regions and words are encoded by the evaluation path
  (`pipeline.evaluation.encode_images` / `encode_captions`), the score is `score_encoded` on those embeddings
  (what `scan-pipe evaluate` computes for the pair) and the attention and relevances are
  `pipeline.models.xattn.xattn_relevance` on the same embeddings. t2i: every word attends over the regions
  (softmax over regions) and its relevance is the cosine with its attended image vector; the score aggregates
  the words' relevances (Mean or LogSumExp). i2t: the same with regions attending over words.
* MMCA: the score is the evaluation path's `score_matrix` (`pipeline.evaluation.encode_and_score`); the
  attention is the cross unit's, from `MMCA.intermediates` (the same softmax spelled out): each word's
  weights on the regions, averaged over the heads. That softmax runs over the pair's regions AND words, so a
  word's weights on the regions sum to its mass on regions (below 1), which is reported as its relevance. It
  is not a term of the score (S = i0.c0 + alpha i1.c1 pools all rows).

Captions are read as the model reads them: the checkpoint's vocabulary and tokenizer (`<start>`/`<end>`
included, they are query items too) or the BERT the checkpoint was trained on (`[CLS]`/`[SEP]` included,
mmca.md A16), its rows rounded to the cache's dtype (`tokenize.text_feature_dtype`) as the evaluated cache
was. A caption with words outside the vocabulary is explained with those words read as `<unk>` (listed in
`unknown_words`); a caption made only of such words is refused: the model would see nothing but `<unk>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint_info
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.evaluation import encode_and_score, encode_captions, encode_images, eval_mode, score_encoded
from pipeline.loaders import CaptionBatch, ImageBatch
from pipeline.models.registry import model_family, model_text_input
from pipeline.models.xattn import xattn_relevance
from pipeline.vocab import END_ID, START_ID, UNK_ID, load_vocabulary

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from pipeline.bert_text import FrozenBert
    from pipeline.official_vocab import OfficialVocabulary
    from pipeline.store import RegionRecord
    from pipeline.vocab import Vocabulary


class ExplainError(UserError):
    """An input of an explanation is unusable (image id, image file, caption); the message names it."""


# --------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionInput:
    """A caption as the model reads it: one display label and one input row per token."""

    tokens: tuple[str, ...]
    inputs: Tensor  # (n,) int64 token ids, or (n, D) float32 BERT rows
    unknown_words: tuple[str, ...] = ()  # caption words read as the unknown token


class CaptionReader(Protocol):
    """Turns a caption into the model's text input (`VocabularyReader`, `BertReader`)."""

    def read(self, caption: str) -> CaptionInput: ...


def _check_caption(caption: str) -> None:
    if not caption.strip():
        raise ExplainError("caption is empty (only whitespace): give the text to explain")


def _all_unknown(caption: str, words: Sequence[str], source: object) -> ExplainError:
    listed = ", ".join(words) if words else "none"
    return ExplainError(
        f"caption {caption!r}: every word is outside the vocabulary of {source} (words: {listed}); "
        "the model would read nothing but the unknown token, so there is nothing to explain"
    )


class VocabularyReader:
    """SCAN's text input: ids of the checkpoint's word vocabulary, wrapped in `<start> ... <end>`."""

    def __init__(self, vocab: Vocabulary | OfficialVocabulary, source: str | Path = "the vocabulary") -> None:
        self.vocab = vocab
        self.source = source

    def read(self, caption: str) -> CaptionInput:
        _check_caption(caption)
        ids = self.vocab.encode(caption)
        words = list(self.vocab.tokens(caption))
        if len(words) != len(ids) - 2 or ids[0] != START_ID or ids[-1] != END_ID:  # never seen; be safe
            words = [self.vocab.id_to_word(i) for i in ids[1:-1]]
        unknown = [word for word, token_id in zip(words, ids[1:-1], strict=True) if token_id == UNK_ID]
        if len(unknown) == len(words):
            raise _all_unknown(caption, words, self.source)
        labels = [
            f"{word} (unk)" if token_id == UNK_ID else self.vocab.id_to_word(token_id)
            for word, token_id in zip(words, ids[1:-1], strict=True)
        ]
        tokens = (self.vocab.id_to_word(START_ID), *labels, self.vocab.id_to_word(END_ID))
        return CaptionInput(tokens, torch.tensor(ids, dtype=torch.long), tuple(unknown))


class BertReader:
    """MMCA's text input: the frozen BERT's last layer, computed as `scan-pipe tokenize` caches it."""

    def __init__(self, frozen: FrozenBert, max_words: int, dtype: str = "float16") -> None:
        self.frozen = frozen
        self.max_words = max_words
        self.dtype = dtype

    def read(self, caption: str) -> CaptionInput:
        from pipeline.bert_text import encode_captions as bert_rows

        _check_caption(caption)
        (chunk,) = list(  # one caption, one chunk; consumed whole so the generator closes its progress bar
            bert_rows(
                self.frozen,
                [caption],
                batch_size=1,
                max_words=self.max_words,
                dtype=self.dtype,
                progress=False,
            )
        )
        ids = chunk.token_ids.tolist()
        tokens = self.frozen.tokenizer.convert_ids_to_tokens(ids)
        unk = self.frozen.tokenizer.unk_token_id
        pieces = tokens[1:-1]
        unknown = [token for token, token_id in zip(pieces, ids[1:-1], strict=True) if token_id == unk]
        if len(unknown) == len(pieces):
            raise _all_unknown(caption, pieces, self.frozen.identity.path)
        rows = torch.from_numpy(np.array(chunk.features, dtype=np.float32))  # rounded as the cache is
        return CaptionInput(tuple(tokens), rows, tuple(unknown))


class ExplainCheckpointError(ExplainError):
    """The checkpoint's text side cannot be rebuilt (vocabulary, BERT); the message names the file."""


def caption_reader(
    info: CheckpointInfo,
    *,
    bert: str | Path | None = None,
    max_words: int | None = None,
    text_dtype: str = "float16",
    device: str | torch.device = "cpu",
    frozen: FrozenBert | None = None,
) -> CaptionReader:
    """How the checkpoint's model reads captions: its vocabulary, or its BERT (`bert`: a folder or "sample";
    None: the folder the checkpoint records; `frozen`: one already loaded), which must be the model the
    checkpoint was trained on."""
    if model_text_input(info.model_name) == "words":
        path = info.vocab_path
        if path is None or not path.is_file():
            raise ExplainCheckpointError(f"{info.path}: checkpoint carries no vocabulary file (vocab.json)")
        vocab = load_vocabulary(path, info.tokenizer)
        expected = info.model_config.get("vocab_size")
        if expected is not None and len(vocab) != expected:
            raise ExplainCheckpointError(
                f"{path}: vocabulary has {len(vocab)} words but the model was trained with {expected}"
            )
        return VocabularyReader(vocab, path)
    from pipeline.bert_text import load_frozen_bert, resolve_bert_path, resolve_max_words
    from pipeline.text_inputs import bert_identity_of

    expected_bert = bert_identity_of(info.extra, info.path)
    folder = resolve_bert_path(bert) if bert is not None else Path(expected_bert.path)
    if frozen is None:
        frozen = load_frozen_bert(folder, device)
    if not frozen.identity.same_model(expected_bert):
        raise ExplainCheckpointError(
            f"{folder}: not the BERT checkpoint {info.path} was trained on ({expected_bert.describe()})"
        )
    return BertReader(frozen, resolve_max_words(frozen, max_words), text_dtype)


# ------------------------------------------------------------------------------------------ explanation


@dataclass(frozen=True)
class Explanation:
    """The attention and relevances behind one pair's score.

    `direction` says who attends: "t2i" words over regions (SCAN t2i, and MMCA's words-to-regions view of
    its cross unit), "i2t" regions over words. `attention` is (queries, contexts): words x regions for t2i,
    regions x words for i2t; `relevance` has one value per query item.
    """

    model_name: str
    family: str  # scan | mmca
    direction: str  # t2i | i2t
    caption: str
    tokens: tuple[str, ...]
    boxes: np.ndarray  # (regions, 4) x1 y1 x2 y2 in original-image pixels
    attention: np.ndarray  # (queries, contexts) float32
    relevance: np.ndarray  # (queries,) float32
    score: float
    note: str  # how the numbers relate to the score
    image_size: tuple[int, int] | None = None  # (width, height) the boxes refer to
    unknown_words: tuple[str, ...] = ()
    num_heads: int | None = None  # MMCA: heads the attention is averaged over

    @property
    def num_regions(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def queries(self) -> str:
        """What the relevances are of: "words" (t2i, MMCA) or "regions" (i2t)."""
        return "words" if self.direction == "t2i" else "regions"

    def region_weights(self) -> np.ndarray:
        """One weight per region for a heat map of the whole caption: the words' attention summed over the
        words (t2i, MMCA), or each region's relevance (i2t, where regions are the queries)."""
        if self.direction == "t2i":
            return self.attention.sum(axis=0)
        return self.relevance.copy()

    @property
    def region_weights_label(self) -> str:
        """What `region_weights` means, for a colour bar or a figure caption."""
        if self.family == "mmca":
            return "cross attention of the caption's words on each region, summed over words"
        if self.direction == "t2i":
            return "attention of the caption's words on each region, summed over words"
        return "relevance of each region (cosine with the caption vector it attends to)"


def _as_regions(
    region_features: Any, boxes: Any, img_dim: int | None, source: object
) -> tuple[Tensor, np.ndarray]:
    features = np.asarray(region_features)
    box_array = np.asarray(boxes, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] < 1:
        raise ExplainError(f"{source}: the image has no regions (features of shape {features.shape})")
    if img_dim is not None and features.shape[1] != img_dim:
        raise ExplainError(
            f"{source}: region features have dimension {features.shape[1]}, the model expects {img_dim}"
        )
    if box_array.shape != (features.shape[0], 4):
        raise ExplainError(f"{source}: {features.shape[0]} regions but boxes of shape {box_array.shape}")
    return torch.from_numpy(np.array(features, dtype=np.float32)), box_array


def _scan_numbers(
    model: nn.Module, regions: Tensor, text: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, float]:
    """Attention, relevance and score of one pair by the evaluation path and the scorer's intermediates."""
    one = torch.zeros(1, dtype=torch.long)
    images = [ImageBatch(regions[None], torch.tensor([regions.shape[0]]), one)]
    captions = [CaptionBatch(text[None], torch.tensor([text.shape[0]]), one)]
    with eval_mode(model):
        img_emb, region_lengths = encode_images(model, images, 1, device=device)
        encoded = encode_captions(model, captions, 1, device=device)
        score = float(score_encoded(model, img_emb, region_lengths, encoded)[0, 0])
    config = model.config
    with torch.no_grad():
        found = xattn_relevance(
            img_emb,
            encoded.embeddings[0],
            encoded.lengths[0],
            direction=config.direction,
            raw_feature_norm=config.raw_feature_norm,
            lambda_softmax=config.lambda_softmax,
            region_lengths=region_lengths,
        )
    return found.attention[0, 0].cpu(), found.relevance[0, 0].cpu(), score


def _mmca_numbers(
    model: nn.Module, regions: Tensor, text: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, float]:
    """Words-to-regions cross attention (mean over heads), each word's mass on regions, and the score."""
    region_lengths = torch.tensor([regions.shape[0]])
    word_lengths = torch.tensor([text.shape[0]])
    score = float(
        encode_and_score(model, regions[None], text[None], word_lengths, region_lengths, device=device)[0, 0]
    )
    with eval_mode(model), torch.no_grad():
        trace = model.intermediates(
            regions[None].to(device),
            region_lengths.to(device),
            text[None].to(device),
            word_lengths.to(device),
            pairs=[(0, 0)],
        )
    weights = trace["pair0__cross_attention"].float().cpu()  # (heads, T, T), regions first (mmca.md A3)
    n_regions = regions.shape[0]
    attention = weights[:, n_regions:, :n_regions].mean(dim=0)  # (words, regions)
    return attention, attention.sum(dim=1), score


def _scan_note(model: nn.Module) -> str:
    config = model.config
    queries, contexts = ("words", "regions") if config.direction == "t2i" else ("regions", "words")
    aggregate = f"LogSumExp (lambda_lse {config.lambda_lse:g})" if config.agg == "LogSumExp" else config.agg
    return (
        f"each of the {queries} attends over the {contexts} (softmax over {contexts}, lambda_softmax "
        f"{config.lambda_softmax:g}); its relevance is the cosine with its attended vector; the score is the "
        f"{aggregate} of the relevances"
    )


def explain_pair(
    model: nn.Module,
    info: CheckpointInfo,
    region_features: Any,
    boxes: Any,
    caption: str,
    *,
    reader: CaptionReader | None = None,
    image_size: tuple[int, int] | None = None,
    device: str | torch.device | None = None,
) -> Explanation:
    """The attention, relevances and score of one image (its `(n, D)` region features and `(n, 4)` boxes)
    and one caption under `model`, the model of checkpoint `info` (`reader`: default from `info`), computed
    on `device` (None: where the model is; the model itself is never moved)."""
    _check_caption(caption)
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    family = model_family(info.model_name)
    regions, box_array = _as_regions(region_features, boxes, info.model_config.get("img_dim"), info.path)
    text = (reader or caption_reader(info, device=target)).read(caption)
    if family == "mmca":
        attention, relevance, score = _mmca_numbers(model, regions, text.inputs, target)
        heads = int(model.config.num_heads)
        direction = "t2i"
        note = (
            f"MMCA cross unit: each word's attention on the regions, mean over {heads} heads; the softmax "
            "runs over regions AND words, so a word's relevance is its mass on regions (not a term of the "
            f"score, S = i0.c0 + {model.config.alpha:g} i1.c1)"
        )
    else:
        attention, relevance, score = _scan_numbers(model, regions, text.inputs, target)
        heads, direction, note = None, model.config.direction, _scan_note(model)
    return Explanation(
        model_name=info.model_name,
        family=family,
        direction=direction,
        caption=caption,
        tokens=text.tokens,
        boxes=box_array,
        attention=attention.numpy(),
        relevance=relevance.numpy(),
        score=score,
        note=note,
        image_size=image_size,
        unknown_words=text.unknown_words,
        num_heads=heads,
    )


@dataclass(frozen=True)
class Explainer:
    """A checkpoint's model and caption reader, loaded once to explain several pairs (report examples)."""

    model: nn.Module
    info: CheckpointInfo
    reader: CaptionReader
    device: torch.device

    def explain(self, record: RegionRecord, caption: str) -> Explanation:
        """`explain_pair` on one stored image."""
        return explain_pair(
            self.model,
            self.info,
            record.features,
            record.boxes,
            caption,
            reader=self.reader,
            image_size=(record.image_w, record.image_h),
            device=self.device,
        )


def load_explainer(
    checkpoint: str | Path,
    *,
    bert: str | Path | None = None,
    max_words: int | None = None,
    text_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> Explainer:
    """Load a checkpoint's model and its caption reader (see `caption_reader` for the BERT options)."""
    target = resolve_device(device)
    model, info = load_checkpoint(checkpoint, map_location=target)
    reader = caption_reader(info, bert=bert, max_words=max_words, text_dtype=text_dtype, device=target)
    return Explainer(model.eval(), info, reader, target)


# ------------------------------------------------------------------------------------------ one command


@dataclass(frozen=True)
class ExplainRun:
    """What `explain_to_files` computed and wrote."""

    explanation: Explanation
    image_id: str
    image_path: Path
    checkpoint: CheckpointInfo
    region_names: tuple[str, ...]
    figures: list[Path] = field(default_factory=list)


def region_names(record: RegionRecord, object_names: Sequence[str] | None) -> tuple[str, ...]:
    """A label per region: the detector's class name (the store's vocabulary), else "region i"."""
    from pipeline.labels import display_names

    names = display_names(object_names) if object_names else []
    labels = []
    for index in range(record.num_boxes):
        label = f"region {index}"
        if record.object_ids is not None and index < len(record.object_ids):
            object_id = int(record.object_ids[index])
            label = names[object_id] if 0 <= object_id < len(names) else f"obj {object_id}"
        labels.append(label)
    return tuple(labels)


def load_picture(path: Path) -> PILImage.Image:
    """The image file as RGB pixels (stored orientation, as extraction reads it by default)."""
    from PIL import Image

    if not path.is_file():
        raise ExplainError(f"{path}: image file not found")
    try:
        with Image.open(path) as source:
            return source.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ExplainError(f"{path}: not a readable image ({exc})") from None


def explain_to_files(
    checkpoint: str | Path,
    features: str | Path,
    images: str | Path,
    image_id: str,
    caption: str,
    out_dir: str | Path,
    *,
    bert: str | Path | None = None,
    max_words: int | None = None,
    text_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> ExplainRun:
    """Explain `caption` against stored image `image_id` and write the figures into `out_dir`.

    The cheap checks (caption, checkpoint metadata, image id, image file) come before loading anything.
    """
    from pipeline.explain_render import write_explanation_figures
    from pipeline.store import FeatureStore

    _check_caption(caption)
    read_checkpoint_info(checkpoint)
    store = FeatureStore(features)
    if image_id not in store:
        raise ExplainError(
            f"{features}: image id {image_id!r} is not in the feature store ({len(store)} images)"
        )
    record = store.read([image_id])[0]
    image_path = Path(images) / image_id
    if not image_path.is_file():
        raise ExplainError(f"{image_path}: image file of {image_id!r} not found under {images}")
    picture = load_picture(image_path)
    explainer = load_explainer(
        checkpoint, bert=bert, max_words=max_words, text_dtype=text_dtype, device=device
    )
    explanation = explainer.explain(record, caption)
    names = region_names(record, store.metadata.get("object_names"))
    figures = write_explanation_figures(explanation, picture, out_dir, region_names=names)
    return ExplainRun(explanation, image_id, image_path, explainer.info, names, figures)
