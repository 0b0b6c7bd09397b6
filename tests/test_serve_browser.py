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
SCREENSHOTS = Path(__file__).resolve().parents[1] / "outputs" / "screenshots"  # git-ignored
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
    page.wait_for_selector("body[data-state=ready]", timeout=60_000)


def _params(page) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit
    return dict(parse_qsl(urlsplit(page.url).query))


def _shows_query(page, row: str) -> None:
    page.wait_for_selector(f"#query-caption[data-row='{row}']", timeout=30_000)
    _wait_ready(page)


def test_the_page_searches_uploads_clicks_and_survives_a_bad_file(page_url, browser, tmp_path):
    url, gallery = page_url
    k = gallery.k
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    _wait_ready(page)
    assert page.locator("#gallery img").count() == min(48, len(gallery))

    # Before a query: placeholders, no broken image, no results.
    assert page.locator("#empty").is_visible() and page.locator("#query-empty").is_visible()
    assert page.locator("#query-img").get_attribute("src") is None and page.locator("#query-img").is_hidden()
    assert page.locator(".hit").count() == 0
    assert "q" not in _params(page)
    page.screenshot(path=str(SCREENSHOTS / "empty.png"))
    _not_blank(SCREENSHOTS / "empty.png")

    # Hovering a gallery thumbnail shows its caption.
    item = page.locator("#gallery figure").nth(3)
    assert item.locator("figcaption").is_hidden()
    item.hover()
    assert item.locator("figcaption").is_visible()
    assert item.locator("figcaption").inner_text().startswith("#3 ")

    # Upload a photo from disk (a gallery image saved as a file): k results per scorer, labelled columns.
    photo = tmp_path / "query.jpg"
    photo.write_bytes(page.request.get(f"{url}image/5?full=true").body())
    box_before = page.locator("#gallery").bounding_box()
    page.set_input_files("#upload", str(photo))
    _shows_query(page, "upload")
    assert page.locator("#gallery").bounding_box() == box_before  # the query image pushes nothing down
    assert page.locator("#query-caption").inner_text() == "uploaded: query.jpg"
    assert _params(page)["q"] == "upload"
    assert [c.get_attribute("data-scorer") for c in page.locator(".column").all()] == SCORERS
    for scorer in SCORERS:
        assert page.locator(f".column[data-scorer={scorer}] .hit").count() == k
        assert "ms" in page.locator(f".column[data-scorer={scorer}] h3 .ms").inner_text()
        assert page.locator(f".column[data-scorer={scorer}] .meaning").inner_text().strip()
    first = page.locator(".column[data-scorer=cosine] .hit").first
    assert first.get_attribute("data-row") == "5"  # the photo itself is the nearest gallery image

    # Click a result: it becomes the query (and the URL's); results now carry relevance marks.
    target = page.locator(".column[data-scorer=euclid] .hit").nth(2)
    row = target.get_attribute("data-row")
    target.click()
    _shows_query(page, row)
    assert _params(page)["q"] == row
    assert gallery.ids[int(row)] in page.locator("#query-caption").inner_text()
    marked = page.locator(".hit.relevant").count() + page.locator(".hit.irrelevant").count()
    assert marked == k * len(SCORERS) and page.locator(".hit.relevant").count() > 0
    assert row not in [h.get_attribute("data-row") for h in page.locator(".hit").all()]
    # All k results of every scorer are on screen at 1400x1000, each with rank, score and file name.
    for hit in page.locator(".hit").all():
        box = hit.bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 1000, box
    card = page.locator(".column[data-scorer=cosine] .hit").first
    assert card.locator(".rank").inner_text().endswith("1") and float(card.locator(".score").inner_text())
    assert card.locator(".id").inner_text().strip("\u200e") == gallery.ids[int(card.get_attribute("data-row"))]
    page.screenshot(path=str(SCREENSHOTS / "search.png"))
    _not_blank(SCREENSHOTS / "search.png")

    # Open a result full size: the link targets the gallery image by row, and it is a real image.
    href = page.locator(".column[data-scorer=cosine] .hit a.full").first.get_attribute("href")
    full = page.request.get(url.rstrip("/") + href)
    assert full.ok and full.headers["content-type"] == "image/jpeg"

    # The controls: k and the scorers, per request, into the URL.
    page.fill("#k", "3")
    page.locator("#k").blur()  # commits the value: the browser's own change event
    page.wait_for_function("document.querySelectorAll('.column[data-scorer=cosine] .hit').length === 3", timeout=60_000)
    page.locator("#scorers input[value=euclid]").uncheck()
    page.wait_for_function("document.querySelectorAll('.column').length === 2", timeout=60_000)
    _wait_ready(page)
    assert _params(page) == {"q": row, "k": "3", "scorers": "cosine,dba_alpha_qe"}
    assert [c.get_attribute("data-scorer") for c in page.locator(".column").all()] == ["cosine", "dba_alpha_qe"]
    assert page.locator(".hit").count() == 6
    page.screenshot(path=str(SCREENSHOTS / "controls.png"))
    _not_blank(SCREENSHOTS / "controls.png")

    # The back button walks the history: euclid returns, then k, then the upload.
    page.go_back()
    page.wait_for_function("document.querySelectorAll('.column').length === 3", timeout=60_000)
    _wait_ready(page)
    assert _params(page)["k"] == "3" and page.locator("#scorers input[value=euclid]").is_checked()
    page.go_back()
    page.wait_for_function(f"document.querySelectorAll('.column[data-scorer=cosine] .hit').length === {k}", timeout=60_000)
    assert page.locator("#k").input_value() == str(k)
    page.go_back()
    _shows_query(page, "upload")
    page.go_forward()
    _shows_query(page, row)

    # Answers that arrive out of order: a slow earlier request never overwrites the latest one.
    held = []
    page.route("**/api/search/*", lambda route: held.append(route) if "k=2&" in route.request.url else route.continue_())
    page.fill("#k", "2")
    page.locator("#k").blur()  # held back by the route
    page.fill("#k", "4")
    page.locator("#k").blur()
    page.wait_for_function(f"document.querySelectorAll('.column[data-scorer=cosine] .hit').length === 4", timeout=60_000)
    assert len(held) == 1
    with page.expect_response(lambda r: "k=2&" in r.url):
        held[0].continue_()
    page.wait_for_timeout(500)
    assert page.locator(".column[data-scorer=cosine] .hit").count() == 4 and _params(page)["k"] == "4"
    page.unroute("**/api/search/*")

    # A shared link opens on its query, k and scorers.
    other = browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(f"{url}?q=7&k=4&scorers=euclid")
    _shows_query(other, "7")
    assert [c.get_attribute("data-scorer") for c in other.locator(".column").all()] == ["euclid"]
    assert other.locator(".hit").count() == 4 and not other.locator("#scorers input[value=cosine]").is_checked()
    other.close()

    # A bad file: a clear message; the previous results are cleared (they were another query's); back
    # restores them, and the page keeps working.
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture\n")
    page.set_input_files("#upload", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    _wait_ready(page)
    assert page.locator("#error").inner_text().startswith("notes.jpg: not a readable image")
    assert page.locator(".hit").count() == 0 and page.locator("#empty").is_visible()
    assert page.locator("#query-caption").get_attribute("data-row") == ""
    assert page.locator("#query-img").get_attribute("src") is None and page.locator("#query-img").is_hidden()
    assert "q" not in _params(page)
    page.screenshot(path=str(SCREENSHOTS / "bad-upload.png"))
    _not_blank(SCREENSHOTS / "bad-upload.png")
    page.go_back()
    _shows_query(page, row)
    page.locator("#gallery figure").nth(7).click()
    _shows_query(page, "7")
    assert page.locator("#error").is_hidden()
    assert page.locator(".column[data-scorer=cosine] .hit").count() == 4  # the k chosen above still holds
    assert _params(page) == {"q": "7", "k": "4", "scorers": "cosine,euclid,dba_alpha_qe"}
    page.close()
