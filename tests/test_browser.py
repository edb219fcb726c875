"""The real app in a real browser: what a person sees and clicks, through Playwright and Debian's Chromium.

Also refreshes the two screenshots in docs/. CI installs Chromium (.ci/run); without /usr/bin/chromium the module skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from benchmarks.live_server import start_app
from tests.conftest import SUBPROCESS_ENV

pytest.importorskip("playwright.sync_api", reason="the browser tests need the playwright package")
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (CI does this in .ci/run)", allow_module_level=True)

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Headless, offline: without the background-networking flags Chromium tries to reach outside hosts.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
QUERY = "a large red circle on the left of a blue background"
TIMEOUT = 60_000  # ms, for every wait: a search on 2 busy CI cores (the first one also warms the model up) is slow
THUMBNAIL = re.compile(r"^Thumbnail \d+ of \d+$")  # the gallery's aria-label for each result
SCORE = r"-?\d\.\d{3}"  # cosine similarity, as the app formats it


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        expect.set_options(timeout=TIMEOUT)
        yield browser
        expect.set_options(timeout=5_000)  # Playwright's default, for anything else in this process
        browser.close()


@contextmanager
def open_page(browser: Browser, server, heading: str = "crossmodal: text ↔ image search") -> Iterator[Page]:
    """A fresh page on ``server``'s app; afterwards, nothing was fetched from outside it and it logged no traceback."""
    log_start = server.log.stat().st_size
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    outside = []
    app = urlsplit(server.url).netloc

    def check(request) -> None:
        url = urlsplit(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.netloc != app:
            outside.append(request.url)

    page.on("request", check)
    page.goto(server.url)
    expect(page.get_by_role("heading", name=heading)).to_be_visible()
    yield page
    context.close()
    assert not outside, f"the page asked for something outside the app: {outside}"
    logged = server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in logged, f"the server logged an error:\n{logged[-1500:]}"


@pytest.fixture
def page(browser, app_server) -> Iterator[Page]:
    """A page on the tiny run's app (tests/conftest.py's app_server)."""
    with open_page(browser, app_server) as page:
        yield page


@pytest.fixture(scope="module")
def demo_server(demo_run, tmp_path_factory):
    """README's demo model (both towers pretrained), served again as `python app.py --artifacts runs/demo/artifacts`."""
    server = start_app(demo_run.artifacts, tmp_path_factory.mktemp("demo-app") / "server.log", env=SUBPROCESS_ENV)
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture
def demo_page(browser, demo_server) -> Iterator[Page]:
    with open_page(browser, demo_server) as page:
        yield page


def block(page: Page, label: str) -> Locator:
    """A Gradio component by its visible label (galleries and images label their block this way)."""
    return page.locator("div.block").filter(has=page.get_by_test_id("block-label").filter(has_text=label))


def gallery_results(page: Page, label: str) -> tuple[Locator, Locator]:
    """A gallery's result thumbnails and their caption labels (grid view)."""
    gallery = block(page, label)
    return gallery.get_by_role("button", name=THUMBNAIL), gallery.locator(".caption-label")


def expect_ranked(captions: Locator, count: int) -> list[float]:
    """`count` captions `#rank · score · caption`, ranks 1..count in order; returns the scores, not increasing."""
    expect(captions).to_have_count(count)
    expect(captions).to_have_text([re.compile(rf"^#{rank} · {SCORE} · \S") for rank in range(1, count + 1)])
    scores = [float(text.split(" · ")[1]) for text in captions.all_inner_texts()]
    assert scores == sorted(scores, reverse=True), scores
    return scores


def wait_for_images(page: Page) -> None:
    """Every visible <img> has loaded, so a screenshot shows pictures; a broken one fails the test, naming it."""
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # galleries load their images lazily
    visible = "[...document.images].filter(image => image.checkVisibility())"
    page.wait_for_function(f"() => {visible}.every(image => image.complete)")  # loaded, or failed to
    broken = page.evaluate(f"() => {visible}.filter(image => image.naturalWidth === 0).map(image => image.src)")
    assert not broken, f"{len(broken)} image(s) did not load: {broken}"
    page.evaluate("window.scrollTo(0, 0)")


def search(page: Page, query: str) -> None:
    box = page.get_by_label("Describe a picture")
    box.fill(query)
    box.press("Enter")


def test_text_to_image_and_more_like_this(page):
    results, captions = gallery_results(page, "Best matches")
    search(page, QUERY)

    expect(results).to_have_count(10)  # k defaults to 10
    for result in results.all():
        expect(result).to_be_visible()
    expect_ranked(captions, 10)
    first = captions.first.inner_text()
    results.nth(3).click()  # opens the preview; the app remembers which image was picked
    gallery = block(page, "Best matches")
    expect(gallery.get_by_test_id("detailed-image")).to_be_visible()
    page.get_by_role("button", name="More like the selected image").click()
    expect(captions.first).not_to_have_text(first)
    gallery.get_by_role("button", name="Close", exact=True).click()  # back from the preview to the grid
    expect(results).to_have_count(10)
    scores = expect_ranked(captions, 10)
    assert scores[0] > float(first.split(" · ")[1]), "neighbours of a result should be closer than the text query"


def test_image_to_text(page, app_server, tmp_path):
    images = pq.read_table(app_server.artifacts / "images.parquet", columns=["split", "thumbnail"])
    row = [index for index, split in enumerate(images.column("split").to_pylist()) if split == "test"][-1]
    upload = tmp_path / "query.jpg"
    upload.write_bytes(images.column("thumbnail")[row].as_py())

    page.get_by_role("tab", name="Image → Text").click()
    image = block(page, "Your image")
    image.locator("input[type=file]").set_input_files(upload)
    expect(image.locator("img")).to_have_attribute("src", re.compile(r"/gradio_api/file="))  # on the server, shown
    page.get_by_role("button", name="Find captions").click()

    table = page.get_by_role("grid", name="Captions that describe it best")
    rows = table.get_by_role("row").filter(has=page.get_by_role("gridcell"))
    expect(rows).to_have_count(10)
    scores = []
    for rank, row_locator in enumerate(rows.all(), start=1):
        cells = row_locator.get_by_role("gridcell").all_inner_texts()
        assert len(cells) == 4, cells  # rank, score, caption, image id
        assert cells[0].strip() == str(rank), cells
        assert 0 < float(cells[1]) <= 1, cells
        assert len(cells[2].split()) >= 3, cells
        scores.append(float(cells[1]))
    assert scores == sorted(scores, reverse=True), scores

    similar, similar_captions = gallery_results(page, "Visually similar images")
    expect(similar).to_have_count(10)
    scores = expect_ranked(similar_captions, 10)
    assert scores[0] >= 0.99, "an indexed picture, uploaded, should find itself first: upload and index encode alike"


def test_errors_are_shown_not_raised(page):
    page.get_by_role("button", name="Search", exact=True).click()  # nothing typed
    toast = page.get_by_test_id("toast-body")
    expect(toast).to_be_visible()
    expect(toast).to_contain_text(re.compile("type a description", re.IGNORECASE))
    expect(page.get_by_text("Traceback")).to_have_count(0)

    toast.get_by_role("button", name="Close", exact=True).click()
    expect(toast).to_have_count(0)
    results, captions = gallery_results(page, "Best matches")
    search(page, "a small white star at the top")  # the page is still usable
    expect(results).to_have_count(10)
    expect_ranked(captions, 10)


def test_the_demo_answers_plain_english_with_both_towers_pretrained(demo_page, demo_run):
    """What a new user meets after `bash scripts/demo.sh`: the header, then a short query in words of their own; the
    top results are red round figures at the top (scored over every pair by benchmarks/short_queries.py)."""
    page = demo_page
    expect(page.get_by_text("both towers pretrained")).to_be_visible()
    expect(page.get_by_text("tf_efficientnet_lite0").first).to_be_visible()
    results, captions = gallery_results(page, "Best matches")
    search(page, "a red ball at the top")
    expect(results).to_have_count(10)
    expect_ranked(captions, 10)
    wait_for_images(page)
    page.screenshot(path=DOCS / "screenshot_text_to_image.png", full_page=True)


def test_the_demo_finds_captions_for_one_of_its_pictures(demo_page, demo_run, tmp_path):
    images = pq.read_table(demo_run.artifacts / "images.parquet", columns=["split", "thumbnail"])
    row = next(index for index, split in enumerate(images.column("split").to_pylist()) if split == "test")
    upload = tmp_path / "query.jpg"
    upload.write_bytes(images.column("thumbnail")[row].as_py())
    page = demo_page
    page.get_by_role("tab", name="Image → Text").click()
    image = block(page, "Your image")
    image.locator("input[type=file]").set_input_files(upload)
    expect(image.locator("img")).to_have_attribute("src", re.compile(r"/gradio_api/file="))
    page.get_by_role("button", name="Find captions").click()
    rows = page.get_by_role("grid", name="Captions that describe it best").get_by_role("row")
    expect(rows.filter(has=page.get_by_role("gridcell"))).to_have_count(10)
    similar, similar_captions = gallery_results(page, "Visually similar images")
    expect(similar).to_have_count(10)
    # The upload is the stored thumbnail, a JPEG re-encoding of the picture: Lite0 at 224 px sees its artefacts
    # (cosine to the picture's own row: median 0.98 over the test split, 98% found first; this one 0.98).
    assert expect_ranked(similar_captions, 10)[0] >= 0.95
    wait_for_images(page)
    page.screenshot(path=DOCS / "screenshot_image_to_text.png", full_page=True)


@pytest.fixture
def pictures_page(browser, pictures_run) -> Iterator[Page]:
    """README's "Search your own pictures": the index of ~/Pictures, served by `python app.py`."""
    with open_page(browser, pictures_run.server, heading="crossmodal: search your own pictures") as page:
        yield page


def test_your_own_pictures_are_searched_by_text_and_by_image(pictures_page, pictures_run, tmp_path):
    page = pictures_page
    images = pq.read_table(pictures_run.index / "images.parquet", columns=["filename", "duplicate_of"]).to_pydict()
    groups = len(set(images["duplicate_of"]))
    expect(page.get_by_text(f"{len(images['filename'])} pictures from Pictures")).to_be_visible()
    expect(page.get_by_text("Recall")).to_have_count(0)  # the model's test metrics say nothing about these pictures
    expect(page.get_by_text(str(pictures_run.home))).to_have_count(0)  # nor is any local path shown

    results, captions = gallery_results(page, "Best matches")
    search(page, "a big cat lying in the grass")
    expect(results).to_have_count(min(10, groups))  # each group of near-duplicates once
    expect_ranked(captions, min(10, groups))
    shown = [text.split(" · ")[2] for text in captions.all_inner_texts()]
    assert {path.split(" (+")[0] for path in shown} <= set(images["filename"]), shown  # paths in the folder
    wait_for_images(page)
    page.screenshot(path=DOCS / "screenshot_own_pictures.png", full_page=True)

    page.get_by_role("tab", name="Search by image").click()
    examples = page.locator("img[src*='/thumbnail_']:visible")  # the tab's examples: nothing else in it has one yet
    expect(examples).to_have_count(3)
    shown = examples.evaluate_all("images => images.map(image => image.src)")
    rows = [int(re.search(r"thumbnail_(\d+)\.jpg", src).group(1)) for src in shown]
    assert len(rows) == 3 and all(images["duplicate_of"][row] == row for row in rows), rows  # one of each group
    image = block(page, "Your image")
    image.locator("input[type=file]").set_input_files(pictures_run.home / "Pictures" / "holidays" / "lion.jpg")
    expect(image.locator("img")).to_have_attribute("src", re.compile(r"/gradio_api/file="))
    page.get_by_role("button", name="Find captions").click()
    similar, similar_captions = gallery_results(page, "Visually similar images")
    expect(similar).to_have_count(min(10, groups))
    scores = expect_ranked(similar_captions, min(10, groups))
    assert "holidays/lion.jpg" in similar_captions.first.inner_text() and scores[0] >= 0.999
