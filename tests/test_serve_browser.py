"""The search page in a real browser: headless Chromium (Debian's package) driven by Playwright.

No browser is downloaded: Playwright is pointed at the system `chromium` through `executable_path`.
Skips with a reason when either is missing; `.ci/run` installs both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[browser]')")

from cbir_jax.runs.cli import to_typed  # noqa: E402
from cbir_jax.serve import server  # noqa: E402
from cbir_jax.serve.app import create_app  # noqa: E402
from cbir_jax.serve.gallery import prepare_gallery  # noqa: E402
from helpers import compose_config  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "outputs" / "serve"
SCORERS = ["cosine", "euclid", "dba_alpha_qe"]


def _not_blank(path: Path) -> None:
    """A screenshot that shows something: many colours, and pixels that differ from the background."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    colours = np.unique(img.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1]))
    assert len(colours) > 500, f"{path}: only {len(colours)} colours"
    assert img.std() > 20, f"{path}: nearly uniform (std {img.std():.1f})"


@pytest.fixture(scope="module")
def page_url():
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium browser (apt-get install chromium)")
    cfg = compose_config(f"serve.scorers=[{','.join(SCORERS)}]")  # the embedded photos, pixel features
    gallery = prepare_gallery(cfg)
    with server.in_background(create_app(gallery, to_typed(cfg).serve)) as url:
        yield url, gallery


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _wait_ready(page) -> None:
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)


def test_the_page_searches_uploads_clicks_and_survives_a_bad_file(page_url, browser, tmp_path):
    url, gallery = page_url
    k = gallery.k
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    _wait_ready(page)
    assert page.locator("#gallery img").count() == min(48, len(gallery))

    # Upload a photo from disk (a gallery image saved as a file): k results per scorer, labelled columns.
    photo = tmp_path / "query.jpg"
    photo.write_bytes(page.request.get(f"{url}image/5?full=true").body())
    page.set_input_files("#upload", str(photo))
    page.wait_for_selector("#query-caption[data-row=upload]", timeout=30_000)
    _wait_ready(page)
    assert page.locator("#query-caption").inner_text() == "uploaded: query.jpg"
    assert [c.get_attribute("data-scorer") for c in page.locator(".column").all()] == SCORERS
    for scorer in SCORERS:
        assert page.locator(f".column[data-scorer={scorer}] .hit").count() == k
        assert "ms" in page.locator(f".column[data-scorer={scorer}] h3 .ms").inner_text()
    first = page.locator(".column[data-scorer=cosine] .hit").first
    assert first.get_attribute("data-row") == "5"  # the photo itself is the nearest gallery image

    # Click a result: it becomes the query; results now carry relevance marks (same source photo).
    target = page.locator(".column[data-scorer=euclid] .hit").nth(2)
    row = target.get_attribute("data-row")
    target.click()
    page.wait_for_selector(f"#query-caption[data-row='{row}']", timeout=30_000)
    _wait_ready(page)
    assert gallery.ids[int(row)] in page.locator("#query-caption").inner_text()
    marked = page.locator(".hit.relevant").count() + page.locator(".hit.irrelevant").count()
    assert marked == k * len(SCORERS) and page.locator(".hit.relevant").count() > 0
    assert row not in [h.get_attribute("data-row") for h in page.locator(".hit").all()]
    page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)
    _not_blank(SCREENSHOTS / "search.png")

    # Open a result full size: the link targets the gallery image by row, and it is a real image.
    href = page.locator(".column[data-scorer=cosine] .hit a.full").first.get_attribute("href")
    full = page.request.get(url.rstrip("/") + href)
    assert full.ok and full.headers["content-type"] == "image/jpeg"

    # A bad file: a clear message on the page; the last results stay; the page keeps working.
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture\n")
    page.set_input_files("#upload", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert page.locator("#error").inner_text().startswith("notes.jpg: not a readable image")
    assert page.locator("#query-caption").get_attribute("data-row") == row
    page.screenshot(path=str(SCREENSHOTS / "bad-upload.png"), full_page=False)
    _not_blank(SCREENSHOTS / "bad-upload.png")
    page.locator("#gallery img").nth(7).click()
    page.wait_for_selector("#query-caption[data-row='7']", timeout=30_000)
    assert page.locator("#error").is_hidden()
    assert page.locator(".column[data-scorer=cosine] .hit").count() == k
    page.close()
