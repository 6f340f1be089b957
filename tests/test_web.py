"""The web page at /: served by the app, and used in a real browser (Debian's Chromium via Playwright).

The browser tests start a real uvicorn server in a thread and draw with real mouse and touch
strokes, so they cover the canvas code, the PNG export, /predict and the page's rendering together.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from mnist_service.serving.api import create_app
from mnist_service.serving.routes.web import STATIC_DIR
from mnist_service.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's 5 s default is short on a shared 2-core CI machine running the rest of the suite.
expect.set_options(timeout=20_000)
# Playwright's own browser download is not used: it drives the distribution's Chromium.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: run scripts/install_chromium.sh"
)
API_KEY = "web-test-key"
RESULT = re.compile(r"^\d · \d{1,3}\.\d%$")  # "7 · 99.2%"


# --- the page as the app serves it (no browser) ----------------------------------------------


def test_page_has_its_controls(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for element_id in ("draw", "predict", "clear", "result", "error", "file", "bars", "seen"):
        assert f'id="{element_id}"' in response.text, element_id
    assert 'name="viewport"' in response.text


def test_page_sends_security_headers(client: TestClient) -> None:
    headers = client.get("/").headers
    assert headers["x-content-type-options"] == "nosniff"
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "img-src 'self' data:" in csp


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/static/app.js", "javascript"), ("/static/style.css", "text/css"), ("/static/index.html", "text/html")],
)
def test_assets_are_served_with_their_content_types(client: TestClient, path: str, content_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert content_type in response.headers["content-type"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (STATIC_DIR / Path(path).name).read_bytes()


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/../api.py", "/static/%2e%2e/api.py"])
def test_unknown_or_escaping_asset_paths_are_json_404s(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["detail"]


def test_page_is_not_part_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/static")]


def test_page_loads_nothing_from_other_origins() -> None:
    # The page must work offline and under CSP 'self': no CDN, no absolute URLs.
    for asset in STATIC_DIR.iterdir():
        text = asset.read_text(encoding="utf-8")
        assert not re.search(r"https?://|[\"'(]//", text), f"{asset.name} refers to another origin"


def test_page_stays_open_when_an_api_key_is_set(model_path: Path) -> None:
    settings = Settings(model_path=model_path, api_key=API_KEY)
    with TestClient(create_app(settings)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert client.post("/predict", content=b"x", headers={"Content-Type": "image/png"}).status_code == 401


# --- a real server and a real browser -------------------------------------------------------


@contextmanager
def _serving(settings: Settings) -> Iterator[str]:
    """The app under uvicorn in a thread, on a free port, until the block ends; yields its URL."""
    # Binding the socket here, not by port number, leaves no window for another process to take it.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert thread.is_alive(), "the server thread died while starting; see the log above"
            assert time.monotonic() < deadline, f"{url}/readyz never said ready"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def server_url(model_path: Path) -> Iterator[str]:
    with _serving(Settings(model_path=model_path, max_batch_delay_ms=1.0, request_timeout_s=10.0)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Opens the page of a server in a fresh browser context; fails the test on any JS error."""
    contexts = []
    problems: list[str] = []

    def _on_console(msg: ConsoleMessage) -> None:
        # Chromium logs every 4xx/5xx fetch as a console error; the error tests cause those on purpose.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            problems.append(msg.text)

    def _open(url: str, **context_options: object) -> Page:
        context = browser.new_context(**context_options)  # type: ignore[arg-type]
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"uncaught exception: {exc}"))
        page.on("console", _on_console)
        page.goto(url)
        return page

    yield _open
    for context in contexts:
        context.close()
    assert not problems, f"the page logged errors (CSP violations show up here too): {problems}"


@pytest.fixture
def page(server_url: str, open_page: Callable[..., Page]) -> Page:
    return open_page(server_url, viewport={"width": 1000, "height": 760})


def _draw(page: Page, *strokes: list[tuple[float, float]]) -> None:
    """Mouse strokes through points given in canvas pixels (0-280), like a person drawing."""
    box = page.locator("#draw").bounding_box()
    assert box is not None
    scale = box["width"] / 280
    for points in strokes:
        page.mouse.move(box["x"] + points[0][0] * scale, box["y"] + points[0][1] * scale)
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(box["x"] + x * scale, box["y"] + y * scale, steps=15)
        page.mouse.up()


def _result(page: Page) -> str:
    result = page.locator("#result")
    expect(result).to_have_text(RESULT)
    return result.inner_text()


def _screenshot(page: Page, path: Path) -> None:
    page.screenshot(path=path, full_page=True, animations="disabled")  # bars at their final width
    assert path.stat().st_size > 0


def _canvas_is_blank(page: Page) -> bool:
    return page.evaluate(
        """() => {
            const c = document.getElementById("draw");
            return c.getContext("2d").getImageData(0, 0, c.width, c.height).data.every(v => v === 255);
        }"""
    )


ONE = [(150, 35), (138, 245)]
SEVEN = [(65, 60), (140, 55), (215, 58), (170, 140), (125, 245)]


@needs_chromium
@pytest.mark.parametrize(("digit", "strokes"), [("1", [ONE]), ("7", [SEVEN])])
def test_drawn_digit_is_recognised_with_the_predict_button(
    page: Page, tmp_path: Path, digit: str, strokes: list[list[tuple[float, float]]]
) -> None:
    page.locator("#live").uncheck()  # so the answer can only come from the button
    _draw(page, *strokes)
    assert not _canvas_is_blank(page)
    page.wait_for_timeout(600)
    assert page.locator("#result").inner_text() == ""  # live prediction is off
    page.locator("#predict").click()
    text = _result(page)
    assert text.startswith(digit), f"the drawn {digit} was read as {text}"
    # The bars and the 28x28 image explain the answer.
    assert page.locator(".bar").count() == 10
    assert page.locator(".bar.top").get_attribute("data-digit") == digit
    expect(page.locator("#seen-box")).to_be_visible()
    assert page.locator("#seen").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [28, 28]
    _screenshot(page, tmp_path / f"drawn-{digit}.png")


@needs_chromium
def test_prediction_follows_the_drawing_and_clear_resets(page: Page, tmp_path: Path) -> None:
    _draw(page, ONE)  # live prediction is on by default: no click
    assert _result(page).startswith("1")
    page.locator("#clear").click()
    assert _canvas_is_blank(page)
    expect(page.locator("#result")).to_have_text("")
    expect(page.locator("#seen-box")).to_be_hidden()
    _screenshot(page, tmp_path / "cleared.png")


@needs_chromium
def test_uploaded_test_set_digit_is_recognised(
    page: Page, tmp_path: Path, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_digits
    # MNIST is white on black; a scan or a photo is black on white and bigger.
    path = tmp_path / "digit.png"
    Image.fromarray(255 - images[0]).resize((140, 140), Image.Resampling.BILINEAR).save(path)
    page.set_input_files("#file", path)
    text = _result(page)
    assert text.startswith(str(labels[0])), f"test image 0 ({labels[0]}) was read as {text}"
    assert not _canvas_is_blank(page)  # the upload is shown where the user draws
    _screenshot(page, tmp_path / "uploaded.png")


@needs_chromium
def test_server_error_detail_is_shown(page: Page, server_url: str, tmp_path: Path) -> None:
    bad = b"this is not an image"
    expected = httpx.post(f"{server_url}/predict", files={"file": ("notes.txt", bad, "text/plain")})
    assert expected.status_code == 422
    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": bad})
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(expected.json()["detail"])
    expect(error).to_contain_text("422")
    expect(page.locator("#result")).to_have_text("")
    _screenshot(page, tmp_path / "error.png")


@needs_chromium
def test_empty_canvas_and_network_failures_are_explained(page: Page) -> None:
    page.locator("#predict").click()
    expect(page.locator("#error")).to_contain_text("empty")
    page.route("**/predict*", lambda route: route.abort("connectionrefused"))
    _draw(page, ONE)
    page.locator("#predict").click()
    expect(page.locator("#error")).to_contain_text("Could not reach the server")
    expect(page.locator("#result")).to_have_text("")


@needs_chromium
def test_footer_shows_the_model(page: Page, server_url: str) -> None:
    info = httpx.get(f"{server_url}/model").json()
    expect(page.locator("#model-version")).to_have_text(info["version"][:12])
    shown = page.locator("#model-accuracy")
    expect(shown).to_have_text(re.compile(r"^\d{1,3}\.\d%$"))
    assert float(shown.inner_text().rstrip("%")) == pytest.approx(info["test_accuracy"] * 100, abs=0.051)


@needs_chromium
def test_phone_layout_and_touch_drawing(server_url: str, open_page: Callable[..., Page], tmp_path: Path) -> None:
    page = open_page(
        server_url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the side
    box = page.locator("#draw").bounding_box()
    assert box is not None and 200 <= box["width"] <= 390
    # A finger stroke, as the touchscreen sends it: only pointer events with touch-action: none draw it.
    cdp = page.context.new_cdp_session(page)
    scale = box["width"] / 280
    (x0, y0), (x1, y1) = ONE
    touches = [{"x": box["x"] + x * scale, "y": box["y"] + y * scale}
               for x, y in zip(np.linspace(x0, x1, 21), np.linspace(y0, y1, 21), strict=True)]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": touches[:1]})
    for touch in touches[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [touch]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    assert _result(page).startswith("1")
    assert page.evaluate("window.scrollY") == 0  # the stroke drew, it did not scroll the page
    _screenshot(page, tmp_path / "phone.png")


@needs_chromium
def test_api_key_from_the_page(model_path: Path, open_page: Callable[..., Page], tmp_path: Path) -> None:
    with _serving(Settings(model_path=model_path, api_key=API_KEY)) as url:
        page = open_page(url, viewport={"width": 1000, "height": 760})
        page.locator("#live").uncheck()
        _draw(page, ONE)
        page.locator("#predict").click()
        expect(page.locator("#error")).to_contain_text("401")
        expect(page.locator("#key-box")).to_have_attribute("open", "")
        page.locator("#api-key").fill(API_KEY)
        page.locator("#api-key").dispatch_event("change")
        page.locator("#predict").click()
        assert _result(page).startswith("1")
        expect(page.locator("#error")).to_be_hidden()
        page.reload()  # the key is remembered in this browser
        expect(page.locator("#api-key")).to_have_value(API_KEY)
        _screenshot(page, tmp_path / "with-key.png")
