"""A small local search page over a built index: type a query or pick an image, see ranked results with their
heat maps (`scan-pipe serve`).

FastAPI serves three routes; all the work is `pipeline.search.Searcher` (shortlist, exact re-rank) and
`pipeline.search_page` (thumbnails, boxes, heat maps):

* `GET /`: the query form; with `?q=TEXT` (images for a text) or `?image=ID` (captions for an image) the
  results below it. Bad queries (empty text, an image id not in the store, k out of range) come back as a
  400/404 page that says what is wrong; an index without images gets an explanatory page.
* `GET /api/search`: the same as JSON (`SearchResult`), errors as `{"detail": message}`.
* `GET /healthz`: "ok" once the index and model are loaded.

The server binds 127.0.0.1 by default: it is a viewer for one user's own data, not a public service.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from pipeline.errors import UserError
from pipeline.index.meta import read_meta
from pipeline.search import DEFAULT_K, DEFAULT_TOP, Searcher, SearchOptions, SearchResult
from pipeline.search_page import render_search_page

MAX_K = 100_000  # far above any useful shortlist; bounds what one request can make the server do
MAX_TOP = 100


class ServeError(UserError):
    """The server cannot start as asked (no index, images folder missing); names the path."""


def _form(text: str = "", image: str = "", k: int = DEFAULT_K, top: int = DEFAULT_TOP) -> str:
    """The query form: a text box, an image id box (a picker over the gallery's first ids), k and top."""
    return (
        '<form class="query-form" method="get" action="/">'
        f'<input type="text" name="q" placeholder="a caption, e.g. a dog on the grass" size="50" '
        f'value="{html.escape(text)}"> '
        f'<input type="text" name="image" list="gallery" placeholder="or an image id" size="24" '
        f'value="{html.escape(image)}"> '
        f'k <input type="number" name="k" min="1" max="{MAX_K}" value="{k}" style="width:6em"> '
        f'top <input type="number" name="top" min="1" max="{MAX_TOP}" value="{top}" style="width:4em"> '
        '<button type="submit">Search</button></form>'
    )


def _page(title: str, body: str, form: str) -> str:
    """A plain page (home, errors, empty index) in the style of the results page."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        'body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1200px;'
        "margin:2em auto;padding:0 1em;color:#1f2328}"
        ".callout{border-left:4px solid #d29922;background:#fff8c5;padding:.5em 1em;margin:.8em 0}"
        ".error{border-left-color:#cf222e;background:#ffebe9}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{form}{body}</body></html>"
    )


def _datalist(ids: list[str]) -> str:
    options = "".join(f'<option value="{html.escape(image_id)}">' for image_id in ids)
    return f'<datalist id="gallery">{options}</datalist>'


def create_app(
    searcher: Searcher | None,
    *,
    images_dir: str | Path | None = None,
    explain: bool = True,
    empty_index: str | Path | None = None,
) -> FastAPI:
    """The search page's web app over an opened `Searcher` (one model, one index, loaded once).

    `searcher` None with `empty_index` (the index folder): an index without images, which every route
    explains instead of searching.
    """
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ServeError(f"{images_dir}: images folder not found")
    app = FastAPI(title="scan-pipe search", docs_url=None, redoc_url=None)

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    if searcher is None:
        message = (
            f"The index at {empty_index} holds no images (it was built from an empty feature store), so "
            "there is nothing to search. Build it from a store with images: "
            "scan-pipe index build --checkpoint DIR --features STORE --out DIR"
        )

        @app.get("/", response_class=HTMLResponse)
        def empty_home() -> HTMLResponse:
            body = f'<div class="callout">{html.escape(message)}</div>'
            return HTMLResponse(_page("scan-pipe search: empty index", body, ""), status_code=200)

        @app.get("/api/search")
        def empty_search() -> JSONResponse:
            return JSONResponse({"detail": message}, status_code=409)

        return app

    index = searcher.index
    gallery_ids = list(index.store.image_ids[:200]) if index.features is not None else []
    picker = _datalist(gallery_ids)

    def run(text: str | None, image: str | None, k: int, top: int) -> SearchResult:
        if not (0 < k <= MAX_K) or not (0 < top <= MAX_TOP):
            raise _ClientError(400, f"k must be in 1..{MAX_K} and top in 1..{MAX_TOP} (got k={k}, top={top})")
        if image is not None and image.strip():
            if index.features is not None and image not in index.store:
                raise _ClientError(404, f"image id {image!r} is not in the feature store")
            return searcher.image(image, SearchOptions(k=k, top=top))
        if text is None or not text.strip():
            raise _ClientError(400, "the query is empty: type a caption or pick an image id")
        return searcher.text(text, SearchOptions(k=k, top=top))

    def answer(text: str | None, image: str | None, k: int, top: int) -> SearchResult:
        try:
            return run(text, image, k, top)
        except UserError as exc:  # the library's one-line messages (unknown words, no captions, ...)
            raise _ClientError(400, str(exc)) from None

    @app.get("/", response_class=HTMLResponse)
    def home(
        q: str | None = None,
        image: str | None = None,
        k: int = Query(DEFAULT_K),
        top: int = Query(DEFAULT_TOP),
    ) -> HTMLResponse:
        form = _form(q or "", image or "", k, top) + picker
        if q is None and image is None:
            body = (
                f"<p>{index.meta.num_images} images indexed with <code>{html.escape(index.info.model_name)}"
                "</code>. Type a caption (images are shortlisted, then scored exactly) or an image id "
                "(captions for it, when the index holds captions).</p>"
            )
            return HTMLResponse(_page("scan-pipe search", body, form))
        try:
            result = answer(q, image, k, top)
        except _ClientError as problem:
            body = f'<div class="callout error">{html.escape(problem.message)}</div>'
            return HTMLResponse(_page("scan-pipe search: bad query", body, form), status_code=problem.status)
        return HTMLResponse(
            render_search_page(result, searcher, images_dir=images_dir, explain=explain, header=form)
        )

    @app.get("/api/search")
    def api_search(
        q: str | None = None,
        image: str | None = None,
        k: int = Query(DEFAULT_K),
        top: int = Query(DEFAULT_TOP),
    ) -> JSONResponse:
        try:
            result = answer(q, image, k, top)
        except _ClientError as problem:
            return JSONResponse({"detail": problem.message}, status_code=problem.status)
        return JSONResponse(result.to_json())

    return app


class _ClientError(Exception):
    """A client error: the status and the message shown to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def serve(
    index_dir: str | Path,
    *,
    images_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
) -> None:
    """Open the index and its model once, then serve the page until interrupted."""
    import uvicorn

    uvicorn.run(open_app(index_dir, images_dir=images_dir, device=device), host=host, port=port)


def open_app(index_dir: str | Path, *, images_dir: str | Path | None = None, device: str = "cpu") -> FastAPI:
    """The app for an index folder: its searcher, or the explanatory page when the index has no images."""
    if read_meta(index_dir).num_images == 0:
        return create_app(None, images_dir=images_dir, empty_index=index_dir)
    return create_app(Searcher.open(index_dir, device=device), images_dir=images_dir)
