"""The web page at /: served by the app, and used in a real browser (Debian's Chromium via Playwright).

The browser tests start a real uvicorn server in a thread and draw with real mouse and touch
strokes, so they cover the canvas code, the PNG export, /predict and the page's rendering together.
The version tests serve a model repository with two different models, versions 1 and 2.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, Response, expect, sync_playwright

from mnist_service.registry.repository import ModelConfig, Repository
from mnist_service.serving.api import create_app
from mnist_service.serving.routes.web import STATIC_DIR
from mnist_service.settings import Settings
from mnist_service.tools.images import png_bytes

from .conftest import add_version

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
PERCENT = re.compile(r"(\d{1,3}\.\d)%$")


# --- the page as the app serves it (no browser) ----------------------------------------------


def test_page_has_its_controls(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for element_id in ("draw", "predict", "clear", "result", "error", "file", "bars", "seen", "version", "compare"):
        assert f'id="{element_id}"' in response.text, element_id
    assert 'name="viewport"' in response.text
    assert '<label for="version">' in response.text  # the picker has a name a screen reader says


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
    expect(page.locator("#model-version")).to_have_text("v1")
    expect(page.locator("#model-sha")).to_have_text(info["version"][:12])
    shown = page.locator("#model-accuracy")
    expect(shown).to_have_text(re.compile(r"^\d{1,3}\.\d%$"))
    assert _percent(shown.inner_text()) == pytest.approx(info["test_accuracy"] * 100, abs=0.051)


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
    page.locator("#compare").tap()
    expect(page.locator("#comparison-table tbody tr")).to_have_count(1)  # one model file: one version
    expect(page.locator("#verdict")).to_have_text("Only one version is loaded: nothing to compare it with.")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # the table fits too
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


# --- several model versions -------------------------------------------------------------------


def _percent(text: str) -> float:
    """The number of a "… 98.9%" text."""
    match = PERCENT.search(text)
    assert match, f"no percentage at the end of {text!r}"
    return float(match.group(1))


def _two_versions(root: Path, first: Path, second: Path) -> Repository:
    """A model repository under `root`: version 1 (stable) from `first`, version 2 (canary) from `second`."""
    repo = Repository(root / "models", "mnist")
    add_version(repo, 1, first)
    add_version(repo, 2, second)
    repo.write_config(ModelConfig(labels={"stable": 1, "canary": 2}))
    return repo


def _repository_settings(repo: Repository) -> Settings:
    return Settings(model_repository=repo.root, repository_poll_s=0.2, max_batch_delay_ms=1.0, request_timeout_s=10.0)


@pytest.fixture(scope="module")
def versions_url(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, other_model_dir: Path) -> Iterator[str]:
    """A server of two different models: v1 stable, v2 canary (left unchanged by the tests that use it)."""
    repo = _two_versions(tmp_path_factory.mktemp("web-repo"), model_dir, other_model_dir)
    with _serving(_repository_settings(repo)) as url:
        yield url


@pytest.fixture
def versions_page(versions_url: str, open_page: Callable[..., Page]) -> Page:
    page = open_page(versions_url, viewport={"width": 1000, "height": 760})
    expect(page.locator("#version option")).to_have_count(3)  # /model read: the picker is filled
    return page


def _is_prediction(response: Response) -> bool:
    return urlsplit(response.url).path == "/predict" and response.request.method == "POST"


def _version_asked(response: Response) -> list[str]:
    return parse_qs(urlsplit(response.url).query).get("version", [])


@needs_chromium
def test_version_picker_lists_the_ready_versions(versions_page: Page, versions_url: str) -> None:
    info = httpx.get(f"{versions_url}/model").json()
    options = versions_page.locator("#version option")
    expect(options).to_have_text(
        ["default (stable: v1)", re.compile(r"^v1 · stable · [\d.]+%$"), re.compile(r"^v2 · canary · [\d.]+%$")]
    )
    assert options.evaluate_all("options => options.map(o => o.value)") == ["", "1", "2"]
    accuracy = {v["version"]: v["test_accuracy"] * 100 for v in info["versions"]}
    assert _percent(options.nth(1).inner_text()) == pytest.approx(accuracy["1"], abs=0.051)
    assert _percent(options.nth(2).inner_text()) == pytest.approx(accuracy["2"], abs=0.051)
    expect(versions_page.get_by_label("Model version")).to_have_value("")  # the default is picked
    expect(versions_page.locator("#model-version")).to_have_text("v1")
    expect(versions_page.locator("#model-sha")).to_have_text(info["version"][:12])


@needs_chromium
def test_a_picked_version_answers(versions_page: Page) -> None:
    page = versions_page
    answered_by = page.locator("#answered-by")
    with page.expect_response(_is_prediction) as default:
        _draw(page, ONE)
    assert _version_asked(default.value) == []  # the default: no ?version
    assert default.value.headers["x-model-version"] == "1"
    expect(answered_by).to_have_text("Answered by model version 1 (stable)")

    # Picking a version asks it about the drawing on screen at once...
    with page.expect_response(_is_prediction) as pinned:
        page.get_by_label("Model version").select_option("2")
    assert _version_asked(pinned.value) == ["2"]
    assert pinned.value.headers["x-model-version"] == "2"
    expect(answered_by).to_have_text("Answered by model version 2 (canary)")
    _result(page)

    # ...and every drawing after it.
    page.locator("#clear").click()
    expect(answered_by).to_have_text("")
    with page.expect_response(_is_prediction) as drawn:
        _draw(page, SEVEN)
    assert _version_asked(drawn.value) == ["2"]
    assert drawn.value.json()["model_version"] == "2"
    expect(answered_by).to_have_text("Answered by model version 2 (canary)")
    _result(page)


def _compare_cases(url: str, test_digits: tuple[np.ndarray, np.ndarray]) -> dict[bool, tuple[bytes, dict]]:
    """A test-set image the two versions agree on (key True) and one they disagree on (False), with
    /predict/compare's answer to each."""
    images, _ = test_digits
    found: dict[bool, tuple[bytes, dict]] = {}
    with httpx.Client(base_url=url, timeout=10) as http:
        for image in images[:1000]:
            png = png_bytes(Image.fromarray(255 - image).resize((140, 140), Image.Resampling.BILINEAR))
            response = http.post("/predict/compare", files={"file": ("digit.png", png, "image/png")})
            assert response.status_code == 200, response.text
            found.setdefault(response.json()["agree"], (png, response.json()))
            if len(found) == 2:
                return found
    raise AssertionError(f"the two models {'never' if True in found else 'always'} agreed on 1000 test digits")


def _compare_upload(page: Page, png: bytes) -> None:
    page.set_input_files("#file", {"name": "digit.png", "mimeType": "image/png", "buffer": png})
    _result(page)
    page.get_by_role("button", name="Compare all versions").click()


@needs_chromium
def test_compare_shows_every_version_and_whether_they_agree(
    versions_page: Page, versions_url: str, test_digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    page = versions_page
    cases = _compare_cases(versions_url, test_digits)
    rows = page.locator("#comparison-table tbody tr")
    verdict = page.locator("#verdict")

    png, expected = cases[False]
    _compare_upload(page, png)
    expect(rows).to_have_count(2)
    cells = rows.evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    digits = [str(p["prediction"]) for p in expected["predictions"]]
    assert [row[:3] for row in cells] == [["v1", "stable", digits[0]], ["v2", "canary", digits[1]]]
    for row, answer in zip(cells, expected["predictions"], strict=True):
        assert _percent(row[3]) == pytest.approx(answer["confidence"] * 100, abs=0.2)
    expect(verdict).to_have_text(f"The versions disagree: v1 says {digits[0]}, v2 says {digits[1]}.")
    expect(verdict).to_have_class(re.compile(r"\bdisagree\b"))
    _screenshot(page, tmp_path / "compare-disagree.png")

    png, expected = cases[True]
    _compare_upload(page, png)
    expect(rows).to_have_count(2)
    expect(verdict).to_have_text(f"All 2 versions agree: {expected['predictions'][0]['prediction']}.")
    expect(verdict).to_have_class(re.compile(r"\bagree\b"))

    page.locator("#clear").click()  # the table was about that picture
    expect(page.locator("#comparison")).to_be_hidden()


@needs_chromium
def test_a_version_unloaded_meanwhile_is_an_error_and_the_picker_refreshes(
    tmp_path: Path, model_dir: Path, open_page: Callable[..., Page]
) -> None:
    repo = _two_versions(tmp_path, model_dir, model_dir)  # any two versions do here
    with _serving(_repository_settings(repo)) as url:
        page = open_page(url, viewport={"width": 1000, "height": 760})
        page.clock.install()  # fake timers, from the reload on
        page.reload()
        expect(page.locator("#version option")).to_have_count(3)
        # Stopped: the page's timed refresh of the picker never fires, so any refresh seen below is
        # the page reacting to the error.
        page.clock.pause_at(time.time() + 3600)
        page.locator("#live").uncheck()
        picker = page.get_by_label("Model version")
        picker.select_option("2")

        repo.write_config(ModelConfig(version_policy={"specific": {"versions": [1]}}, labels={"stable": 1}))
        deadline = time.monotonic() + 60
        while [v["version"] for v in httpx.get(f"{url}/model").json()["versions"]] != ["1"]:
            assert time.monotonic() < deadline, "version 2 was never unloaded"
            time.sleep(0.1)
        expected = httpx.post(
            f"{url}/predict", params={"version": "2"}, content=b"x", headers={"Content-Type": "image/png"}
        )
        assert expected.status_code == 404

        _draw(page, ONE)
        with page.expect_request(lambda request: urlsplit(request.url).path == "/model"):
            page.locator("#predict").click()  # the 404 makes the page read /model again
        error = page.locator("#error")
        expect(error).to_contain_text("404")
        expect(error).to_contain_text(expected.json()["detail"])
        expect(page.locator("#result")).to_have_text("")
        # The pick stays (the page never answers with a model nobody picked), marked as gone.
        expect(page.locator("#version option")).to_have_text(
            ["default (stable: v1)", re.compile(r"^v1 · stable"), "v2 · not loaded"]
        )
        expect(picker).to_have_value("2")

        picker.select_option("")
        page.locator("#predict").click()
        assert _result(page).startswith("1")
        expect(error).to_be_hidden()
        expect(page.locator("#answered-by")).to_have_text("Answered by model version 1 (stable)")


# --- feedback: "was it right?" ---------------------------------------------------------------------


def test_page_has_the_feedback_buttons(client: TestClient) -> None:
    text = client.get("/").text
    assert 'id="feedback-right"' in text and 'id="feedback-status"' in text
    assert [int(d) for d in re.findall(r'class="feedback-digit" data-label="(\d)"', text)] == list(range(10))


def _labels(database: Path) -> dict[str, list[tuple[str, int | None]]]:
    """request id -> [(route, label)] of every capture in the database."""
    from mnist_service.capture.store import CaptureStore

    store = CaptureStore(str(database))
    with store.transaction() as cur:
        rows = cur.fetchall("SELECT request_id, route, label FROM captures ORDER BY request_id, item", ())
    out: dict[str, list[tuple[str, int | None]]] = {}
    for request_id, route, label in rows:
        out.setdefault(request_id, []).append((route, label))
    return out


@needs_chromium
def test_feedback_buttons_label_the_answer_and_change_it(
    model_path: Path, open_page: Callable[..., Page], tmp_path: Path
) -> None:
    database = tmp_path / "captures.sqlite3"
    with _serving(Settings(model_path=model_path, capture_sample=1.0, capture_database=str(database))) as url:
        page = open_page(url, viewport={"width": 1000, "height": 760})
        feedback, status = page.locator("#feedback"), page.locator("#feedback-status")
        expect(feedback).to_be_hidden()  # nothing to judge yet
        with page.expect_response(_is_prediction) as predicted:
            _draw(page, ONE)
        assert _result(page).startswith("1")
        request_id = predicted.value.headers["x-request-id"]
        expect(feedback).to_be_visible()

        page.get_by_role("button", name="Right").click()
        expect(status).to_have_text("Thank you: 1 was right.")
        expect(page.locator("#feedback-right")).to_have_attribute("aria-pressed", "true")
        assert _labels(database)[request_id] == [("/predict", 1)]

        page.locator('.feedback-digit[data-label="7"]').click()
        expect(status).to_have_text("Changed to 7 (it was 1). Thank you!")
        expect(page.locator('.feedback-digit[data-label="7"]')).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#feedback-right")).to_have_attribute("aria-pressed", "false")
        assert _labels(database)[request_id] == [("/predict", 7)]
        _screenshot(page, tmp_path / "feedback.png")

        page.locator("#clear").click()  # the buttons were about that answer
        expect(feedback).to_be_hidden()


@needs_chromium
def test_feedback_on_an_uncaptured_answer_sends_the_picture(
    model_path: Path, open_page: Callable[..., Page], tmp_path: Path
) -> None:
    database = tmp_path / "captures.sqlite3"
    # Capture on but sampling (almost) nothing: the answer's id is unknown to the server.
    with _serving(Settings(model_path=model_path, capture_sample=1e-12, capture_database=str(database))) as url:
        page = open_page(url, viewport={"width": 1000, "height": 760})
        page.locator("#live").uncheck()
        _draw(page, SEVEN)
        page.locator("#predict").click()
        said = _result(page)[0]
        page.locator('.feedback-digit[data-label="4"]').click()
        expect(page.locator("#feedback-status")).to_have_text(
            f"Thank you: it was 4, not {said}. It is kept for the next training."
        )
        (request_id,) = _labels(database)
        assert _labels(database)[request_id] == [("/feedback/examples", 4)]
        page.locator('.feedback-digit[data-label="5"]').click()  # changes that example, sends nothing twice
        expect(page.locator("#feedback-status")).to_have_text("Changed to 5 (it was 4). Thank you!")
        assert _labels(database) == {request_id: [("/feedback/examples", 5)]}


@needs_chromium
def test_feedback_on_a_server_without_capture_says_so(page: Page) -> None:
    _draw(page, ONE)
    _result(page)
    page.get_by_role("button", name="Right").click()
    status = page.locator("#feedback-status")
    expect(status).to_contain_text("404")
    expect(status).to_contain_text("feedback is off")
    expect(status).to_have_class(re.compile(r"\bfailed\b"))
