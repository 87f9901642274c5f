"""`scan-pipe serve`'s web app over HTTP (FastAPI's TestClient): the form, results with the exact ranking,
bad queries as 4xx pages and JSON messages, an empty index as an explanatory page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from search_fixtures import built_index, scan_checkpoint, write_jpegs
from synthetic import SyntheticDataset, make_synthetic_dataset

from pipeline.captions import read_captions
from pipeline.index.meta import meta_path
from pipeline.search import Searcher, SearchOptions
from pipeline.serve import ServeError, create_app, open_app

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Searcher, SyntheticDataset, Path]:
    data = make_synthetic_dataset(
        tmp_path_factory.mktemp("serve-data"), splits={"train": 20, "val": 4, "test": 12}, img_dim=16
    )
    checkpoint = scan_checkpoint(data.root / "ckpt", data)
    index = built_index(data, checkpoint, data.root / "index", shard_size=8)
    searcher = Searcher.open(index)
    images = write_jpegs(data.root / "images", searcher.index.store.image_ids)
    app = open_app(index, images_dir=images)
    return TestClient(app), searcher, data, index


def _a_caption(data: SyntheticDataset) -> str:
    """A caption of the test split: words the model's vocabulary knows."""
    return read_captions(data.captions["test"]).captions[0]


def test_home_page_has_the_form(served) -> None:
    client, searcher, _, _ = served
    response = client.get("/")
    assert response.status_code == 200
    assert '<form class="query-form"' in response.text and 'name="q"' in response.text
    assert f"{searcher.index.meta.num_images} images indexed" in response.text


def test_text_query_gives_the_exact_ranking_as_html_and_json(served) -> None:
    client, searcher, data, _ = served
    text = _a_caption(data)
    expected = searcher.text(text, SearchOptions(k=10_000, top=5))
    assert expected.hits
    api = client.get("/api/search", params={"q": text, "k": 10_000, "top": 5})
    assert api.status_code == 200
    body = api.json()
    assert [hit["image_id"] for hit in body["hits"]] == [hit.image_id for hit in expected.hits]
    assert any("exceeds" in note for note in body["notes"])  # k above the gallery: clamped, said so
    page = client.get("/", params={"q": text, "top": 3})
    assert page.status_code == 200 and "Images for" in page.text
    assert expected.hits[0].image_id in page.text and page.text.count('class="card"') == 3
    assert "data:image/jpeg;base64," in page.text  # thumbnails / heat maps embedded


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"q": "   "}, 400, "empty"),
        ({"image": "not-there.jpg"}, 404, "not in the feature store"),
        ({"q": "a", "k": 0}, 400, "k must be"),
        ({"q": "a", "top": 1000}, 400, "top in"),
    ],
)
def test_bad_queries_are_4xx_with_a_message(served, params: dict, status: int, message: str) -> None:
    client = served[0]
    api = client.get("/api/search", params=params)
    assert api.status_code == status and message in api.json()["detail"]
    page = client.get("/", params=params)
    assert page.status_code == status and message in page.text and "Traceback" not in page.text


def test_out_of_vocabulary_query_returns_nothing_and_says_so(served) -> None:
    client = served[0]
    body = client.get("/api/search", params={"q": "zzqx vvbnm"}).json()
    assert body["hits"] == [] and any("vocabulary" in note for note in body["notes"])


def test_image_query_lists_captions(served) -> None:
    client, searcher, _, _ = served
    image_id = searcher.index.store.image_ids[0]
    body = client.get("/api/search", params={"image": image_id, "top": 3}).json()
    assert len(body["hits"]) == 3 and all(hit["caption"] for hit in body["hits"])


def test_an_empty_index_gets_an_explanatory_page(served, tmp_path: Path) -> None:
    index = served[3]
    empty = tmp_path / "empty-index"
    empty.mkdir()
    meta = json.loads(meta_path(index).read_text())
    meta["num_images"] = 0
    meta_path(empty).write_text(json.dumps(meta))
    client = TestClient(open_app(empty))
    page = client.get("/")
    assert page.status_code == 200 and "holds no images" in page.text and "scan-pipe index build" in page.text
    assert client.get("/api/search", params={"q": "a"}).status_code == 409


def test_a_missing_images_folder_is_refused(served, tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="images folder not found"):
        create_app(served[1], images_dir=tmp_path / "nope")
