"""`pipeline.search` and `scan-pipe search`: two-stage = exact at full k, shortlists, odd input, pages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from search_fixtures import built_index, mmca_checkpoint, scan_checkpoint, write_jpegs
from synthetic import SyntheticDataset, make_synthetic_dataset
from typer.testing import CliRunner

from pipeline.captions import read_captions
from pipeline.evaluation import encode_and_score
from pipeline.index.build import build_index
from pipeline.index.encode import QueryError
from pipeline.index.meta import SearchIndexError
from pipeline.index.tokens import ImageTokenLists
from pipeline.loaders import open_feature_table, pad_regions, tokenize_captions
from pipeline.models.config import AGGREGATIONS, RAW_FEATURE_NORMS
from pipeline.models.xattn import xattn_scores, xattn_scores_from_products
from pipeline.search import Searcher, SearchOptions
from pipeline.vocab import Vocabulary
from stages import index as index_stage
from stages import search as search_stage

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SCORE_OPTIONS = ("direction", "raw_feature_norm", "agg", "lambda_softmax", "lambda_lse")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("search-data"),
        splits={"train": 30, "val": 6, "test": 24},
        img_dim=16,
        num_concepts=10,
        variable_regions=True,
    )


def _index(data: SyntheticDataset, checkpoint: Path, name: str, **options) -> Path:
    return built_index(data, checkpoint, data.root / name, shard_size=16, **options)


@pytest.fixture(scope="module", params=["scan_t2i_avg", "scan_i2t_lse"])
def scan_index(request: pytest.FixtureRequest, data: SyntheticDataset) -> Path:
    checkpoint = scan_checkpoint(data.root / f"ckpt-{request.param}", data, request.param)
    return _index(data, checkpoint, f"index-{request.param}")


@pytest.fixture(scope="module")
def searcher(data: SyntheticDataset) -> Searcher:
    checkpoint = scan_checkpoint(data.root / "ckpt-main", data)
    return Searcher.open(_index(data, checkpoint, "index-main"), device="cpu")


def _exact_gallery_scores(searcher: Searcher, text: str) -> np.ndarray:
    """The scorer on the whole gallery: the stored float16 embeddings as float32, every image at once."""
    query = searcher.encode_text(text)
    shards = searcher.index.images
    rows, lengths = shards.gather(np.arange(shards.count))
    with torch.no_grad():
        scores = searcher.model.similarity(
            torch.from_numpy(rows), query.embedding, query.lengths, torch.from_numpy(lengths)
        )
    return scores[:, 0].numpy()


@pytest.mark.parametrize("text", ["dog with a cat", "a photo of the kite near some bike and a horse"])
def test_text_search_at_full_k_is_the_exact_ranking(scan_index: Path, text: str) -> None:
    searcher = Searcher.open(scan_index, device="cpu")
    gallery = searcher.index.meta.num_images
    result = searcher.text(text, SearchOptions(k=gallery, top=gallery))
    exact = _exact_gallery_scores(searcher, text)
    order = np.argsort(-exact, kind="stable")
    assert [hit.position for hit in result.hits] == order.tolist()
    np.testing.assert_allclose([hit.score for hit in result.hits], exact[order], rtol=0, atol=1e-6)
    assert result.k == gallery and not result.notes
    assert [hit.image_id for hit in result.hits[:3]] == searcher.index.image_ids(order[:3])


def test_stored_embeddings_score_like_evaluation(searcher: Searcher, data: SyntheticDataset) -> None:
    """The index's float16 rows are the encoder's output: scores agree with evaluation's float32 path."""
    table = open_feature_table(data.features_dir, data.root / "cache")
    regions, region_lengths = pad_regions(
        [torch.from_numpy(np.array(table.features(i), dtype=np.float32)) for i in range(len(table))]
    )
    tokens = tokenize_captions(["dog with a cat"], Vocabulary.load(data.vocab_path))
    reference = encode_and_score(
        searcher.model, regions, tokens.item(0)[None], torch.tensor([len(tokens.item(0))]), region_lengths
    )[:, 0]
    result = searcher.text("dog with a cat", SearchOptions(k=len(table), top=len(table)))
    by_position = np.empty(len(table))
    by_position[[hit.position for hit in result.hits]] = [hit.score for hit in result.hits]
    np.testing.assert_allclose(by_position, reference.numpy(), atol=2e-3)


def test_image_search_at_full_k_is_the_exact_ranking(scan_index: Path, data: SyntheticDataset) -> None:
    searcher = Searcher.open(scan_index, device="cpu")
    captions = read_captions(data.captions["test"])
    result = searcher.image("test/00003.jpg", SearchOptions(k=len(captions), top=len(captions)))
    record = searcher.index.store.read(["test/00003.jpg"])[0]
    image = torch.from_numpy(np.array(record.features, dtype=np.float32))[None]
    rows, lengths = searcher.index.captions.gather(np.arange(len(captions)))
    with torch.no_grad():
        embedded = searcher.model.encode_images(image, torch.tensor([image.shape[1]]))
        exact = searcher.model.similarity(embedded, torch.from_numpy(rows), torch.from_numpy(lengths))[
            0
        ].numpy()
    order = np.argsort(-exact, kind="stable")
    assert [hit.position for hit in result.hits] == order.tolist()
    np.testing.assert_allclose([hit.score for hit in result.hits], exact[order], atol=1e-6)
    assert [hit.caption for hit in result.hits[:2]] == [captions.captions[i] for i in order[:2]]
    assert result.hits[0].image_id == captions.image_ids[order[0]]


def test_shortlists_are_the_best_estimates(searcher: Searcher) -> None:
    lists: ImageTokenLists = searcher.index.image_lists
    query = searcher.encode_text("dog and a cat")
    words = query.embedding[0].numpy()
    scores = words @ lists.centroids.T
    everything = lists.centroid_maxsim(scores, np.arange(lists.num_images))
    positions, estimates = lists.shortlist(words, 10, nprobe=lists.nlist, candidates=lists.num_images)
    np.testing.assert_allclose(estimates, np.sort(everything)[::-1][:10], rtol=1e-6)
    np.testing.assert_allclose(everything[positions], estimates, rtol=1e-6)
    # The default second stage: SCAN's score with each region's products from its centroid plus its decoded
    # residual code, and the Gram matrix of its centroids.
    positions, estimates = searcher.image_shortlist(query, 10, SearchOptions(nprobe=lists.nlist))
    codes = np.asarray(lists.codes)
    valid = codes < lists.nlist
    centroids = np.where(valid[:, :, None], lists.centroids[np.minimum(codes, lists.nlist - 1)], 0)
    books, residual_codes = lists.residuals
    decoded = np.concatenate(
        [books[j][np.asarray(residual_codes)[:, :, j]] for j in range(len(books))], axis=2
    )
    regions = torch.from_numpy(np.where(valid[:, :, None], centroids + decoded, 0).astype(np.float32))
    centroids = torch.from_numpy(centroids.astype(np.float32))
    with torch.no_grad():
        words = query.embedding[0]
        reference = xattn_scores_from_products(
            torch.einsum("nrd,ld->nrl", regions, words)[:, :, None, :],
            centroids @ centroids.transpose(1, 2),
            (words @ words.t())[None],
            query.lengths,
            region_lengths=torch.from_numpy(valid.sum(axis=1)),
            **{key: getattr(searcher.model.config, key) for key in SCORE_OPTIONS},
        )[:, 0].numpy()
    np.testing.assert_allclose(estimates, np.sort(reference)[::-1][:10], atol=1e-5)
    assert set(positions.tolist()) == set(np.argsort(-reference, kind="stable")[:10].tolist())


def test_a_shortlist_of_k_is_scored_and_timed(searcher: Searcher) -> None:
    result = searcher.text("dog with a cat", SearchOptions(k=8, top=5))
    assert result.k == 8 and len(result.hits) == 5
    assert set(result.timings_ms) == {"encode", "shortlist", "rerank"}
    assert all(hit.shortlist_rank <= 8 for hit in result.hits)
    assert [hit.score for hit in result.hits] == sorted((hit.score for hit in result.hits), reverse=True)
    few = searcher.text("dog with a cat", SearchOptions(k=8, top=5, candidates=3))
    assert few.k == 8 and len(few.hits) == 5  # the pool is never smaller than k
    captions = searcher.image("test/00004.jpg", SearchOptions(k=6, top=4))
    assert captions.k == 6 and len(captions.hits) == 4 and all(hit.caption for hit in captions.hits)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_the_score_from_products_is_the_score(direction: str) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(
        torch.randn(4, 7, 8, generator=generator, dtype=torch.float64), dim=-1
    )
    captions = torch.nn.functional.normalize(
        torch.randn(3, 5, 8, generator=generator, dtype=torch.float64), dim=-1
    )
    region_lengths, caption_lengths = torch.tensor([7, 2, 5, 7]), torch.tensor([5, 3, 1])
    for norm in RAW_FEATURE_NORMS:
        for agg in AGGREGATIONS:
            options = {"direction": direction, "raw_feature_norm": norm, "agg": agg, "lambda_softmax": 9.0,
                       "lambda_lse": 6.0}  # fmt: skip
            expected = xattn_scores(
                images, captions, caption_lengths, region_lengths=region_lengths, **options
            )
            products = torch.einsum("ird,cwd->ircw", images, captions)
            image_gram, caption_gram = images @ images.transpose(1, 2), captions @ captions.transpose(1, 2)
            found = xattn_scores_from_products(
                products, image_gram, caption_gram, caption_lengths, region_lengths=region_lengths, **options
            )
            torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


def test_odd_queries(searcher: Searcher) -> None:
    for text in ("", "   \t"):
        with pytest.raises(QueryError, match="query text is empty"):
            searcher.text(text)
    nothing = searcher.text("zebra xylophone")
    assert nothing.hits == [] and "outside the model's vocabulary" in nothing.notes[0]
    assert nothing.query["unknown_words"] == ["zebra", "xylophone"]
    partly = searcher.text("zebra dog", SearchOptions(k=5))
    assert len(partly.hits) == 5 and partly.notes == ["unknown word(s) read as <unk>: zebra"]
    clamped = searcher.text("dog", SearchOptions(k=10_000, top=3))
    assert clamped.k == searcher.index.meta.num_images and "exceeds the 60 indexed images" in clamped.notes[0]
    with pytest.raises(QueryError, match="not in the feature store"):
        searcher.image("test/missing.jpg")
    with pytest.raises(QueryError, match="--k must be at least 1"):
        searcher.text("dog", SearchOptions(k=0))


def test_an_index_without_captions_refuses_image_queries(data: SyntheticDataset, tmp_path: Path) -> None:
    checkpoint = scan_checkpoint(tmp_path / "ckpt", data)
    out = tmp_path / "no-captions"
    build_index(checkpoint, data.features_dir, out, cache_dir=data.root / "cache", progress=False)
    with pytest.raises(SearchIndexError, match="no captions to search; rebuild it with --captions"):
        Searcher.open(out).image("test/00001.jpg")


def test_mmca_text_and_image_search_at_full_k_are_exact(data: SyntheticDataset) -> None:
    checkpoint = mmca_checkpoint(data.root / "ckpt-mmca", data)
    searcher = Searcher.open(_index(data, checkpoint, "index-mmca"), device="cpu")
    assert searcher.index.kind == "global"
    gallery = searcher.index.meta.num_images
    result = searcher.text("a dog with a cat", SearchOptions(k=gallery, top=gallery))
    table = open_feature_table(data.features_dir, data.root / "cache")
    regions, lengths = pad_regions(
        [torch.from_numpy(np.array(table.features(i), dtype=np.float32)) for i in range(len(table))]
    )
    words, word_lengths, _ = searcher.bert.rows(["a dog with a cat"])
    with torch.no_grad():
        exact = searcher.model.score_matrix(regions, lengths, words, word_lengths)[:, 0].numpy()
    order = np.argsort(-exact, kind="stable")
    assert [hit.position for hit in result.hits] == order.tolist()
    np.testing.assert_allclose([hit.score for hit in result.hits], exact[order], atol=1e-5)
    short = searcher.text("a dog with a cat", SearchOptions(k=4, top=2))
    assert short.k == 4 and len(short.hits) == 2
    captions = searcher.image("test/00002.jpg", SearchOptions(k=1000, top=3))
    assert len(captions.hits) == 3 and "exceeds the 120 indexed captions" in captions.notes[0]


# ----------------------------------------------------------------------------------------------- the CLI


def _app() -> typer.Typer:
    app = typer.Typer()
    index_stage.register(app)
    search_stage.register(app)
    return app


def _invoke(args: list[str]):
    result = CliRunner().invoke(_app(), [str(arg) for arg in args])
    return result, " ".join(result.output.split())


def test_cli_search_writes_json_and_a_page(
    searcher: Searcher, data: SyntheticDataset, tmp_path: Path
) -> None:
    images = write_jpegs(
        tmp_path / "images", searcher.index.image_ids(np.arange(searcher.index.meta.num_images))
    )
    index = searcher.index.root
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    result, output = _invoke(
        ["search", "--index", index, "--text", "dog with a cat", "--k", "16", "--top", "4",
         "--images", images, "--json", out_json, "--html", out_html, "--device", "cpu"]
    )  # fmt: skip
    assert result.exit_code == 0, output
    assert "16 of 60 images scored exactly" in output and "shortlist" in output and "re-rank" in output
    document = json.loads(out_json.read_text())
    assert (
        len(document["hits"]) == 4 and document["k"] == 16 and document["query"]["text"] == "dog with a cat"
    )
    assert document["timings_ms"]["shortlist"] >= 0 and document["timings_ms"]["rerank"] > 0
    page = out_html.read_text()
    assert page.count("data:image/jpeg;base64,") == 4 and document["hits"][0]["image_id"] in page
    assert page.count("attention heat map of") == 4  # pipeline.explain is present in this checkout
    result, output = _invoke(
        ["search", "--index", index, "--image", "test/00005.jpg", "--top", "3", "--html", out_html,
         "--device", "cpu"]
    )  # fmt: skip
    assert result.exit_code == 0, output
    assert "120 of 120 captions" in output and "exceeds the 120 indexed captions" in output
    assert "no images folder given" in out_html.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "   "], "error: the query text is empty"),
        (["--text", "dog", "--image", "x.jpg"], "error: give exactly one of --text and --image"),
        ([], "error: give exactly one of --text and --image"),
        (["--image", "nowhere.jpg"], "error: image id 'nowhere.jpg' is not in the feature store"),
        (["--text", "dog", "--top", "0"], "error: --top must be at least 1"),
        (["--text", "dog", "--images", "/no/such/dir"], "error: /no/such/dir: --images folder not found"),
    ],
)
def test_cli_search_bad_input_is_one_line(searcher: Searcher, args: list[str], message: str) -> None:
    result, output = _invoke(["search", "--index", searcher.index.root, "--device", "cpu", *args])
    assert result.exit_code in (1, 2) and output.startswith(message), output
    assert "Traceback" not in output


def test_cli_search_refuses_other_checkpoint_and_empty_dirs(
    searcher: Searcher, data: SyntheticDataset, tmp_path: Path
) -> None:
    other = scan_checkpoint(tmp_path / "other", data, seed=3)
    result, output = _invoke(
        ["search", "--index", searcher.index.root, "--checkpoint", other, "--text", "dog"]
    )
    assert result.exit_code == 1 and str(other) in output and "ckpt-main" in output
    (tmp_path / "empty").mkdir()
    result, output = _invoke(["search", "--index", tmp_path / "empty", "--text", "dog"])
    assert result.exit_code == 1 and "not a search index" in output


def test_the_heat_map_is_the_pairs_own_attention(searcher: Searcher, tmp_path: Path) -> None:
    """A card's heat map is `blend_heat` of `explain_pair`'s region weights for that result and the query."""
    from pipeline.explain import caption_reader, explain_pair
    from pipeline.explain_render import blend_heat
    from pipeline.search_page import HeatMaps, _box_scale, picture_of

    result = searcher.text("dog with a cat", SearchOptions(k=8, top=2))
    stored = next(iter(searcher.index.store.read([result.hits[0].image_id])))
    # the synthetic store's boxes all cover the image: give each region its own strip, so weights show
    count, width = len(stored.boxes), stored.image_w
    strips = [[i * width / count, 0, (i + 1) * width / count - 1, stored.image_h - 1] for i in range(count)]
    record = dataclasses.replace(stored, boxes=np.array(strips, dtype=np.float32))
    picture, _ = picture_of(record, None)
    assert picture is not None
    shown = HeatMaps(searcher).heat_map(record, "dog with a cat", picture)
    explanation = explain_pair(
        searcher.model,
        searcher.index.info,
        record.features,
        record.boxes,
        "dog with a cat",
        reader=caption_reader(searcher.index.info, device=searcher.device),
        image_size=(record.image_w, record.image_h),
        device=searcher.device,
    )
    expected = blend_heat(picture, _box_scale(record, picture), explanation.region_weights())
    assert shown is not None and np.array_equal(np.asarray(shown), np.asarray(expected))
    other = blend_heat(picture, _box_scale(record, picture), explanation.region_weights()[::-1].copy())
    assert not np.array_equal(np.asarray(shown), np.asarray(other))  # the weights decide the picture


def test_a_pair_without_a_heat_map_leaves_boxes_and_says_why(
    searcher: Searcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.errors import UserError
    from pipeline.search_page import write_search_page

    result = searcher.text("dog", SearchOptions(k=8, top=3))
    page = write_search_page(result, searcher, tmp_path / "p.html").read_text()
    assert page.count("attention heat map of") == 3

    def refused(*args, **kwargs):
        raise UserError("caption 'zzz' has no known word")

    monkeypatch.setattr("pipeline.explain.Explainer.explain", refused)
    page = write_search_page(result, searcher, tmp_path / "q.html").read_text()
    assert "attention heat map of" not in page and page.count(" with its boxes") == 3
    assert "no heat map for some results (caption &#39;zzz&#39; has no known word)" in page


def test_mmca_page_heat_maps_reuse_the_searchers_bert(
    data: SyntheticDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heat maps of an MMCA page read captions with the BERT the searcher already loaded."""
    import pipeline.bert_text
    from pipeline.search_page import write_search_page

    checkpoint = mmca_checkpoint(data.root / "ckpt-mmca", data)
    searcher = Searcher.open(_index(data, checkpoint, "index-mmca"), device="cpu")
    result = searcher.text("a dog with a cat", SearchOptions(k=4, top=2))
    loads = []
    real_load = pipeline.bert_text.load_frozen_bert
    monkeypatch.setattr(
        pipeline.bert_text, "load_frozen_bert", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    page = write_search_page(result, searcher, tmp_path / "mmca.html").read_text()
    assert page.count("attention heat map of") == 2
    assert loads == []  # `searcher.bert` had loaded it for the query
    assert searcher.explainer.reader.frozen is searcher.bert.frozen
