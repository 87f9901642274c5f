"""Search a built index: shortlist k candidates cheaply, then score the shortlist with the exact score.

SCAN's exact score needs a cross-attention pass per (image, caption) pair, so a query cannot be scored
against a whole large gallery; `pipeline.index` shortlists instead, and the exact score (the same
`pipeline.evaluation.score_encoded` evaluation uses, on the stored float16 embeddings cast to float32)
orders the shortlist. The two stages are timed separately.

- text -> images (`Searcher.text`): SCAN probes the centroid lists with the query's words, then scores the
  `candidates` reached best with SCAN's own formula on centroid-substituted regions and keeps k
  (`pipeline.index.tokens`); MMCA shortlists by S0 = i0 . c0 in FAISS, then its full S on re-encoded
  shortlisted images. (PLAID's optional refinement with decompressed embeddings is the exact re-rank here:
  SCAN's score on the float16 rows; a larger k is that knob.)
- image -> captions (`Searcher.image`): over the caption set indexed at build time (`--captions`); the query
  image is read from the feature store and encoded by the model.

Decisions on odd input (each one line, no traceback, through `pipeline.errors.UserError`):
- an empty or whitespace-only query text, or one with no words after tokenisation: refused;
- a query whose every word is outside the model's vocabulary: NOT an error; the result is empty and its
  `notes` say so (every image would be scored on `<unk>` alone, which ranks nothing meaningfully). Some
  unknown words among known ones are read as `<unk>`, as in training and evaluation, and listed in `notes`;
- k larger than the gallery (or caption set): clamped to its size, with a note; the shortlist is then the
  whole gallery and the result equals the exact ranking;
- an image id that is not in the feature store, an index built from another checkpoint or store, an
  incomplete or empty index, or an index without captions for an image query: refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.atomic import write_text_atomic
from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import resolve_device
from pipeline.evaluation import EncodedCaptions, eval_mode, score_encoded
from pipeline.explain import Explainer, caption_reader
from pipeline.index.build import CAPTIONS, IMAGES
from pipeline.index.encode import (
    BertReader,
    QueryError,
    TextQuery,
    encode_bert_query,
    encode_raw_images,
    encode_word_query,
    query_vocabulary,
)
from pipeline.index.reader import SearchIndex
from pipeline.index.tokens import Rescore
from pipeline.models.xattn import xattn_scores_from_products

if TYPE_CHECKING:  # only for annotations
    from pipeline.official_vocab import OfficialVocabulary
    from pipeline.vocab import Vocabulary

DEFAULT_K = 128
DEFAULT_TOP = 10
DEFAULT_NPROBE = 8
# Items the second stage scores per shortlisted one, and at least: benchmarks/search_quality.py keeps 99 %
# of the exact top-10 at k = 128 with 2,048 (98.5 % with 1,024).
CANDIDATES_PER_K = 16
MIN_CANDIDATES = 2048


@dataclass(frozen=True)
class SearchOptions:
    """How much work a query does: `k` items scored exactly, `top` returned.

    `nprobe`: centroids probed per query word (SCAN) or IVF lists (MMCA, large galleries); `candidates`:
    items kept after the first stage for SCAN's score on centroids (None: max(16 k, 2048)).
    """

    k: int = DEFAULT_K
    top: int = DEFAULT_TOP
    nprobe: int = DEFAULT_NPROBE
    candidates: int | None = None

    def check(self) -> None:
        """Every count is a positive integer."""
        for name in ("k", "top", "nprobe"):
            if getattr(self, name) < 1:
                raise QueryError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.candidates is not None and self.candidates < 1:
            raise QueryError(f"--candidates must be at least 1, got {self.candidates}")

    def pool(self, k: int) -> int:
        """Items the second stage scores for a shortlist of k."""
        return max(self.candidates or max(CANDIDATES_PER_K * k, MIN_CANDIDATES), k)


@dataclass
class SearchHit:
    """One result: an image (text queries) or a caption (image queries)."""

    rank: int
    position: int  # in the index's gallery (images) or caption set
    image_id: str
    score: float  # the model's exact score
    shortlist_rank: int
    shortlist_score: float  # the shortlist's estimate (SCAN's score on centroids, or S0 for MMCA)
    caption: str | None = None


@dataclass
class SearchResult:
    """A query's answer, its timings (milliseconds) and notes (clamping, unknown words, ...)."""

    query: dict[str, Any]
    target: str  # "images" or "captions"
    hits: list[SearchHit]
    k: int  # items scored exactly
    k_requested: int
    gallery_size: int
    timings_ms: dict[str, float]
    notes: list[str] = field(default_factory=list)
    index: str = ""
    checkpoint: str = ""
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def write_result_json(result: SearchResult, path: str | Path) -> Path:
    """The result as JSON, written atomically."""
    path = Path(path)
    write_text_atomic(path, json.dumps(result.to_json(), indent=2) + "\n")
    return path


def _timings_ms(started: float, encoded: float, shortlisted: float, finished: float) -> dict[str, float]:
    """The three stages' milliseconds from their `perf_counter` marks."""
    return {
        "encode": round((encoded - started) * 1000.0, 3),
        "shortlist": round((shortlisted - encoded) * 1000.0, 3),
        "rerank": round((finished - shortlisted) * 1000.0, 3),
    }


def centroid_scorer(config: Any, rows: torch.Tensor, query_side: str) -> Rescore:
    """SCAN's score (options of `config`, a `ScanConfig`) of one query against candidates whose other side
    stands in by centroids: the `rescore` of `pipeline.index.tokens`. `rows` are the query's exact
    embeddings (its words for `query_side="captions"`, its regions for `"images"`)."""
    options = {
        "direction": config.direction,
        "raw_feature_norm": config.raw_feature_norm,
        "agg": config.agg,
        "lambda_softmax": config.lambda_softmax,
        "lambda_lse": config.lambda_lse,
    }
    rows = rows.float().cpu()
    gram = (rows @ rows.t())[None]
    length = torch.tensor([rows.shape[0]])

    def images(products: np.ndarray, image_gram: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        scores = xattn_scores_from_products(
            torch.from_numpy(products)[:, :, None, :],
            torch.from_numpy(image_gram),
            gram,
            length,
            region_lengths=torch.from_numpy(lengths),
            **options,
        )
        return scores[:, 0].numpy()

    def captions(products: np.ndarray, caption_gram: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        scores = xattn_scores_from_products(
            torch.from_numpy(products)[None],
            gram,
            torch.from_numpy(caption_gram),
            torch.from_numpy(lengths),
            **options,
        )
        return scores[0].numpy()

    return images if query_side == "captions" else captions


class Searcher:
    """An opened index with its model in eval mode: answers any number of queries."""

    def __init__(self, index: SearchIndex, *, device: str | torch.device = "cpu") -> None:
        self.index = index
        self.device = resolve_device(device)
        self.model, _ = load_checkpoint(index.info.path, map_location=self.device)
        self.model.eval()

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        *,
        checkpoint: str | Path | None = None,
        features: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> Searcher:
        """Open and check the index (`SearchIndex.open`), then load its model."""
        return cls(SearchIndex.open(index_dir, checkpoint=checkpoint, features=features), device=device)

    @cached_property
    def explainer(self) -> Explainer:
        """The model with `pipeline.explain`'s caption reader, for heat maps: loaded once, not per page."""
        loaded = self.bert.frozen if self.index.kind == "global" else None  # MMCA: the query's BERT
        reader = caption_reader(self.index.info, device=self.device, frozen=loaded)
        return Explainer(self.model, self.index.info, reader, self.device)

    @cached_property
    def vocab(self) -> Vocabulary | OfficialVocabulary:
        """SCAN: the vocabulary queries are read with (loaded once, not per query)."""
        return query_vocabulary(self.index.info)

    @cached_property
    def bert(self) -> BertReader:
        """MMCA: the BERT its checkpoint was trained on."""
        return BertReader.for_checkpoint(self.index.info, self.device)

    # ---------------------------------------------------------------------------------------------- text

    def _empty_result(self, query: dict[str, Any], target: str, k_requested: int, size: int) -> SearchResult:
        """A result for this index and model with no hits yet."""
        return SearchResult(
            query=query,
            target=target,
            hits=[],
            k=0,
            k_requested=k_requested,
            gallery_size=size,
            timings_ms={},
            index=str(self.index.root),
            checkpoint=str(self.index.info.path),
            model=self.index.info.model_name,
        )

    def _clamp(self, options: SearchOptions, size: int, what: str, notes: list[str]) -> int:
        if options.k > size:
            notes.append(f"k={options.k} exceeds the {size} indexed {what}: all {size} were scored exactly")
        return min(options.k, size)

    def encode_text(self, text: str) -> TextQuery:
        """The query as the model reads it; empty text is refused."""
        if not text or not text.strip():
            raise QueryError("the query text is empty")
        if self.index.kind == "global":
            query = encode_bert_query(self.model, self.bert, text, self.device)
        else:
            query = encode_word_query(self.model, self.vocab, text, self.device)
        if not query.words:
            raise QueryError(f"the query {text!r} has no words the model can read")
        return query

    def text(self, text: str, options: SearchOptions | None = None) -> SearchResult:
        """The `top` gallery images for a text query, by exact score over a shortlist of k."""
        options = options or SearchOptions()
        options.check()
        started = time.perf_counter()
        query = self.encode_text(text)
        encoded = time.perf_counter()
        gallery = self.index.meta.num_images
        query_fields = {"text": text, "words": query.words, "unknown_words": query.unknown}
        result = self._empty_result(query_fields, IMAGES, options.k, gallery)
        notes = result.notes
        if query.all_unknown:
            notes.append(
                f"every word of the query ({', '.join(query.unknown)}) is outside the model's vocabulary: "
                "nothing to search, no results"
            )
            result.timings_ms = _timings_ms(started, encoded, encoded, encoded)
            return result
        if query.unknown:
            notes.append(f"unknown word(s) read as <unk>: {', '.join(query.unknown)}")
        k = self._clamp(options, gallery, "images", notes)
        if self.index.kind == "global":
            positions, estimates = self.index.global_index(IMAGES).shortlist(
                query.embedding.embedding[0].float().cpu().numpy(), k, nprobe=options.nprobe
            )
            shortlisted = time.perf_counter()
            scores = self._mmca_image_scores(positions, query)
        else:
            positions, estimates = self.image_shortlist(query, k, options)
            shortlisted = time.perf_counter()
            scores = self._scan_image_scores(positions, query)
        finished = time.perf_counter()
        ids = self.index.image_ids(positions)
        result.hits = _ranked(positions, estimates, scores, ids, options.top)
        result.k = len(positions)
        result.timings_ms = _timings_ms(started, encoded, shortlisted, finished)
        return result

    def image_shortlist(
        self, query: TextQuery, k: int, options: SearchOptions
    ) -> tuple[np.ndarray, np.ndarray]:
        """SCAN's shortlist alone: the k gallery positions for a query, with their estimates."""
        words = query.embedding[0, : int(query.lengths[0])].float().cpu()
        return self.index.image_lists.shortlist(
            words.numpy(),
            k,
            nprobe=options.nprobe,
            candidates=options.pool(k),
            rescore=centroid_scorer(self.model.config, words, query_side="captions"),
        )

    @torch.no_grad()
    def _scan_image_scores(self, positions: np.ndarray, query: TextQuery) -> np.ndarray:
        """SCAN's exact score of the query against the shortlisted images' stored embeddings."""
        rows, lengths = self.index.images.gather(positions)
        img_emb = torch.from_numpy(rows).to(self.device)
        full = bool((lengths == rows.shape[1]).all())
        region_lengths = None if full else torch.from_numpy(lengths).to(self.device)
        captions = EncodedCaptions(
            indices=[torch.zeros(1, dtype=torch.long)],
            embeddings=[query.embedding],
            lengths=[query.lengths.to(self.device)],
            count=1,
        )
        with eval_mode(self.model):
            scores = score_encoded(self.model, img_emb, region_lengths, captions)
        return scores[:, 0].numpy()

    @torch.no_grad()
    def _mmca_image_scores(self, positions: np.ndarray, query: TextQuery) -> np.ndarray:
        """MMCA's full S for the shortlisted images, re-encoded from their raw region features."""
        records = self.index.store.read(self.index.image_ids(positions))
        images, _ = encode_raw_images(self.model, [record.features for record in records], self.device)
        with eval_mode(self.model):
            scores = self.model.similarity(images, query.embedding)
        return scores[:, 0].float().cpu().numpy()

    # --------------------------------------------------------------------------------------------- image

    def image(self, image_id: str, options: SearchOptions | None = None) -> SearchResult:
        """The `top` indexed captions for a gallery image, by exact score over a shortlist of k."""
        options = options or SearchOptions()
        options.check()
        if not image_id or not image_id.strip():
            raise QueryError("the query image id is empty")
        count = self.index.meta.num_captions
        _ = self.index.captions  # refuses an index without captions before any work
        started = time.perf_counter()
        store = self.index.store
        if image_id not in store:
            raise QueryError(f"image id {image_id!r} is not in the feature store {store.root}")
        record = store.read([image_id])[0]
        encoding, region_lengths = encode_raw_images(self.model, [record.features], self.device)
        encoded = time.perf_counter()
        result = self._empty_result({"image_id": image_id}, CAPTIONS, options.k, count)
        k = self._clamp(options, count, "captions", result.notes)
        if self.index.kind == "global":
            query_vector = encoding.embedding[0].float().cpu().numpy()
            positions, estimates = self.index.global_index(CAPTIONS).shortlist(
                query_vector, k, nprobe=options.nprobe
            )
            shortlisted = time.perf_counter()
            scores = self._mmca_caption_scores(positions, encoding)
        else:
            regions = encoding[0, : int(region_lengths[0])].float().cpu()
            positions, estimates = self.index.caption_codes.shortlist(
                regions.numpy(),
                k,
                candidates=options.pool(k),
                rescore=centroid_scorer(self.model.config, regions, query_side="images"),
            )
            shortlisted = time.perf_counter()
            scores = self._scan_caption_scores(positions, encoding, region_lengths)
        finished = time.perf_counter()
        captions = self.index.captions
        hits = _ranked(positions, estimates, scores, captions.item_field("ids", positions), options.top)
        texts = captions.item_field("captions", [hit.position for hit in hits])
        for hit, text in zip(hits, texts, strict=True):
            hit.caption = text
        result.hits = hits
        result.k = len(positions)
        result.timings_ms = _timings_ms(started, encoded, shortlisted, finished)
        return result

    @torch.no_grad()
    def _scan_caption_scores(
        self, positions: np.ndarray, image: torch.Tensor, region_lengths: torch.Tensor
    ) -> np.ndarray:
        rows, lengths = self.index.captions.gather(positions)
        captions = EncodedCaptions(
            indices=[torch.arange(len(positions))],
            embeddings=[torch.from_numpy(rows).to(self.device)],
            lengths=[torch.from_numpy(lengths).to(self.device)],
            count=len(positions),
        )
        full = bool((region_lengths == image.shape[1]).all())
        with eval_mode(self.model):
            scores = score_encoded(
                self.model, image.float(), None if full else region_lengths.to(self.device), captions
            )
        return scores[0].numpy()

    @torch.no_grad()
    def _mmca_caption_scores(self, positions: np.ndarray, image: Any) -> np.ndarray:
        texts = self.index.captions.item_field("captions", positions)
        rows, lengths, _ = self.bert.rows(texts)
        with eval_mode(self.model):
            captions = self.model.encode_captions(rows.to(self.device), lengths.to(self.device))
            scores = self.model.similarity(image, captions)
        return scores[0].float().cpu().numpy()


def _ranked(
    positions: np.ndarray, estimates: np.ndarray, scores: np.ndarray, ids: list[str], top: int
) -> list[SearchHit]:
    """Shortlisted items ordered by exact score (ties keep the shortlist's order), the first `top`."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:top]
    return [
        SearchHit(
            rank=rank + 1,
            position=int(positions[slot]),
            image_id=ids[slot],
            score=float(scores[slot]),
            shortlist_rank=int(slot) + 1,
            shortlist_score=float(estimates[slot]),
        )
        for rank, slot in enumerate(order)
    ]
