"""The search page's HTTP surface (FastAPI): a small static page and a JSON API over a prepared gallery.

Safe by construction rather than by filtering: images are addressed by integer gallery row and
re-encoded from the decoded pixels, never read from a client-supplied path; the page's own assets are
a fixed whitelist read from the package at start. Uploads are read up to a byte limit, refused above a
pixel limit before decoding, and decoded by the same hardened loader as the folder source.
"""

from __future__ import annotations

import io
from importlib import resources
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from cbir_jax.core.config import ServeConfig
from cbir_jax.data import ImageLoadError
from cbir_jax.data.base import decode_image
from cbir_jax.serve.gallery import (MAX_K, PreparedGallery, Ranked, SearchError, check_request, image_encoder,
                                    score_meaning, search_image, search_row)

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_PAGE = 200


class UploadRejected(Exception):
    """An upload the page refuses (too large, empty, too many pixels); `status` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _asset(name: str) -> str:
    return (resources.files("cbir_jax.serve") / "static" / name).read_text(encoding="utf-8")


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, f"the upload is {int(declared):,} bytes; the limit is {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadRejected(413, f"the upload is over the limit of {limit:,} bytes")
    if not body:
        raise UploadRejected(400, "the upload is empty")
    return bytes(body)


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Decodes an uploaded image; refuses one above `max_pixels` from its header, before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        width = height = 0  # the loader below names the problem
    if width * height > max_pixels:
        raise UploadRejected(413, f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
    return decode_image(data)  # the folder source's decoder: same checks, same one-line messages


def _row(gallery: PreparedGallery, row: int) -> dict[str, Any]:
    return {"row": row, "id": gallery.ids[row], "label": gallery.label_name(row)}


def _results(gallery: PreparedGallery, ranked: list[Ranked], query_row: int | None) -> list[dict[str, Any]]:
    """Each scorer's hits; `relevant` where the gallery has labels and the query is one of its images."""
    labels = gallery.labels
    out = []
    for r in ranked:
        hits = []
        for rank, (row, score) in enumerate(zip(r.rows.tolist(), r.scores.tolist()), start=1):
            relevant = None if labels is None or query_row is None else bool(labels[row] == labels[query_row])
            hits.append({"rank": rank, "score": score, "relevant": relevant, **_row(gallery, row)})
        out.append({"scorer": r.scorer, "ms": r.ms, "meaning": score_meaning(r.scorer), "hits": hits})
    return out


def parse_request(gallery: PreparedGallery, k: Optional[str], scorers: Optional[str]) -> tuple[int, list[str]]:
    """`?k=5&scorers=cosine,euclid` as checked values; a bad one is a 400 with one line, not a silent default."""
    number = None
    if k not in (None, ""):
        if not k.strip().isdigit():
            raise SearchError(f"k={k[:20]!r}: must be a whole number")
        if len(k.strip()) > 9:  # never parse a huge int
            raise SearchError(f"k={k.strip()[:9]}...: must be between 1 and {min(MAX_K, len(gallery))}")
        number = int(k.strip())
    names = [s.strip() for s in scorers.split(",") if s.strip()] if scorers else None
    return check_request(gallery, number, names)


def create_app(gallery: PreparedGallery, limits: ServeConfig) -> FastAPI:
    """The page and its API over one prepared gallery."""
    app = FastAPI(title="cbir_jax search", docs_url=None, redoc_url=None, openapi_url=None)
    index_html = _asset("index.html")
    assets = {name: (_asset(name), media) for name, media in ASSETS.items()}
    encode = image_encoder(gallery)

    def gallery_row(row: int) -> int:
        if not 0 <= row < len(gallery):
            raise HTTPException(404, f"no gallery image {row}")
        return row

    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(SearchError)
    async def _bad_search(request: Request, exc: SearchError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(ImageLoadError)
    async def _unreadable(request: Request, exc: ImageLoadError) -> JSONResponse:
        return JSONResponse({"detail": f"not a readable image ({exc})"}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return index_html

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "no such asset")
        text, media = assets[name]
        return Response(text, media_type=media)

    @app.get("/api/gallery")
    def listing(offset: int = 0, limit: int = 48) -> dict[str, Any]:
        offset, limit = max(0, offset), max(1, min(limit, MAX_PAGE))
        rows = range(offset, min(offset + limit, len(gallery)))
        return {
            "name": gallery.name, "size": len(gallery), "k": gallery.k, "max_k": min(MAX_K, len(gallery)),
            "labelled": gallery.labels is not None, "scorers": list(gallery.scorers),
            "meanings": {name: score_meaning(name) for name in gallery.scorers}, "backbone": gallery.backbone.name,
            "max_upload_bytes": limits.max_upload_bytes, "offset": offset, "items": [_row(gallery, r) for r in rows],
        }

    @app.get("/api/search/{row}")
    def search_by_row(row: int, k: Optional[str] = None, scorers: Optional[str] = None) -> dict[str, Any]:
        row = gallery_row(row)
        k_, names = parse_request(gallery, k, scorers)
        ranked = search_row(gallery, row, k_, names)
        return {"query": _row(gallery, row), "k": k_, "results": _results(gallery, ranked, row)}

    @app.post("/api/search")
    async def search_by_upload(request: Request, k: Optional[str] = None, scorers: Optional[str] = None) -> dict[str, Any]:
        k_, names = parse_request(gallery, k, scorers)  # before reading the body: a bad request costs nothing
        data = await read_limited(request, limits.max_upload_bytes)

        def work():
            return search_image(gallery, decode_upload(data, limits.max_pixels), k_, names)

        ranked = await run_in_threadpool(work)
        return {"query": {"row": None, "id": "upload", "label": None}, "k": k_,
                "results": _results(gallery, ranked, None)}

    @app.get("/image/{row}")
    def image(row: int, full: bool = False) -> Response:
        data = encode(gallery_row(row), full)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app
