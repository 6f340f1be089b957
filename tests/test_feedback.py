"""Capture through every front door and feedback on it: POST /feedback, /feedback/examples, DELETE
/captures/{id}, and their metrics. In process (FastAPI answering everything) and on a real socket with
the hot path, over a real SQLite file; then real multi-worker servers writing one SQLite file, and a
real PostgreSQL stopped under load.
"""

from __future__ import annotations

import base64
import contextlib
import io
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from benchmarks.postgres import Postgres
from mnist_service.capture.store import CaptureStore
from mnist_service.inference.images import png_bytes
from mnist_service.serving.api import create_app
from mnist_service.settings import Settings

from .conftest import metric_samples
from .test_capture import postgres  # noqa: F401  # the session's PostgreSQL server

API_KEY = "feedback-key"


def _png(image: np.ndarray) -> bytes:
    return png_bytes(Image.fromarray(image))


@pytest.fixture
def capture_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"capture_sample": 1.0, "capture_database": str(tmp_path / "c.sqlite3")})


@pytest.fixture
def captured(
    serve: Callable[[Settings], contextlib.AbstractContextManager[httpx.Client]], capture_settings: Settings
) -> Iterator[httpx.Client]:
    with serve(capture_settings) as client:
        yield client


def _predict(client: httpx.Client, image: np.ndarray) -> httpx.Response:
    response = client.post("/predict", files={"file": ("d.png", _png(image), "image/png")})
    assert response.status_code == 200, response.text
    return response


def test_every_front_door_captures_what_the_model_saw(
    captured: httpx.Client, capture_settings: Settings, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = test_digits
    upload = _predict(captured, images[0])
    batch = captured.post("/predict/batch", files=[("files", ("a.png", _png(images[1]), "image/png")),
                                                   ("files", ("b.png", _png(images[2]), "image/png"))])
    pixels = captured.post("/predict/pixels", json={"pixels": images[3].tolist()})
    v2 = captured.post("/v2/models/mnist/infer", json={"inputs": [
        {"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": images[4].ravel().tolist()}]})
    compare = captured.post("/predict/compare", files={"file": ("d.png", _png(images[5]), "image/png")})
    for response in (batch, pixels, v2, compare):
        assert response.status_code == 200, response.text
    store = CaptureStore(capture_settings.capture_database)
    deadline = time.monotonic() + 10

    def found(response: httpx.Response) -> list:
        while not (rows := store.find(response.headers["x-request-id"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        return rows

    (one,) = found(upload)
    assert one.route == "/predict" and one.version == "1"
    debug = captured.post("/predict?debug=1", files={"file": ("d.png", _png(images[0]), "image/png")}).json()
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(debug["image_png_base64"]))))
    np.testing.assert_array_equal(one.image, seen)  # the 28x28 the model saw, not the upload
    assert np.allclose(one.probabilities, upload.json()["probabilities"], atol=1e-6)
    assert one.prediction == upload.json()["prediction"]
    assert [(c.route, c.item) for c in found(batch)] == [("/predict/batch", 0), ("/predict/batch", 1)]
    (pixel_row,) = found(pixels)
    assert pixel_row.route == "/predict/pixels"
    np.testing.assert_array_equal(pixel_row.image, images[3])
    (v2_row,) = found(v2)
    assert v2_row.route.startswith("/v2/models/")
    np.testing.assert_array_equal(v2_row.image, images[4])
    time.sleep(1.0)  # a comparison is never captured (several versions answer one request)
    assert store.find(compare.headers["x-request-id"]) == []


def test_feedback_labels_replaces_and_counts(
    captured: httpx.Client, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images = test_digits[0]
    answer = _predict(captured, images[0])
    request_id, predicted = answer.headers["x-request-id"], answer.json()["prediction"]
    wrong = (predicted + 1) % 10
    first = captured.post("/feedback", json={"request_id": request_id, "label": wrong})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body == {
        "request_id": request_id, "item": 0, "label": wrong, "prediction": predicted, "model_version": "1",
        "correct": False, "replaced": False, "previous_label": None, "detail": body["detail"],
    }
    again = captured.post("/feedback", json={"request_id": request_id, "label": predicted}).json()
    assert again["replaced"] and again["previous_label"] == wrong and again["correct"]
    assert f"replaces label {wrong}" in again["detail"]

    app = captured.app  # type: ignore[attr-defined]
    feedback = metric_samples(app, "mnist_feedback_total")
    # At 0 before the first label (so increase() counts it); the replacement is not counted again.
    assert feedback == {(("outcome", "wrong"), ("version", "1")): 1.0, (("outcome", "correct"), ("version", "1")): 0.0}
    assert metric_samples(app, "mnist_feedback_wrong_total") == {
        (("label", str(wrong)), ("predicted", str(predicted)), ("version", "1")): 1.0
    }
    test_accuracy = app.state.registry.resolve(None).metadata["test_accuracy"]
    assert metric_samples(app, "mnist_model_test_accuracy") == {(("version", "1"),): test_accuracy}
    counts = metric_samples(app, "mnist_labelled_captures")
    assert counts[(("label", str(predicted)),)] == 1 and sum(counts.values()) == 1


def test_feedback_errors(captured: httpx.Client, test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    request_id = _predict(captured, test_digits[0][0]).headers["x-request-id"]
    unknown = captured.post("/feedback", json={"request_id": "never-made", "label": 3})
    assert unknown.status_code == 404 and "POST /feedback/examples" in unknown.json()["detail"]
    for label in (10, -1, "seven", None):
        response = captured.post("/feedback", json={"request_id": request_id, "label": label})
        assert response.status_code == 422, (label, response.text)
        assert "label" in response.json()["detail"]
    item = captured.post("/feedback", json={"request_id": request_id, "label": 3, "item": 1})
    assert item.status_code == 404 and "item is 0 to 0" in item.json()["detail"]
    assert captured.post("/feedback", json={"request_id": "bad id!", "label": 3}).status_code == 422


def test_a_labelled_example_is_stored_with_its_image(
    captured: httpx.Client, capture_settings: Settings, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_digits
    response = captured.post(f"/feedback/examples?label={labels[7]}", content=_png(images[7]),
                             headers={"Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    receipt = response.json()
    assert receipt["request_id"] == response.headers["x-request-id"] and receipt["label"] == labels[7]
    (row,) = CaptureStore(capture_settings.capture_database).find(receipt["request_id"])
    assert row.label == labels[7] and row.route == "/feedback/examples" and row.prediction == receipt["prediction"]
    assert row.image.max() > 0
    bad = captured.post("/feedback/examples?label=12", content=_png(images[7]), headers={"Content-Type": "image/png"})
    assert bad.status_code == 422
    feedback = metric_samples(captured.app, "mnist_feedback_total")  # type: ignore[attr-defined]
    assert set(feedback.values()) == {0.0}  # not live accuracy


def test_erasure(
    captured: httpx.Client, capture_settings: Settings, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    answer = _predict(captured, test_digits[0][0])
    request_id = answer.headers["x-request-id"]
    assert captured.post("/feedback", json={"request_id": request_id, "label": 7}).status_code == 200
    (kept,) = captured.get(f"/captures/{request_id}").json()  # an access request: what was kept
    assert kept["label"] == 7 and kept["route"] == "/predict" and kept["prediction"] == answer.json()["prediction"]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(kept["image_png_base64"]))))
    np.testing.assert_array_equal(image, CaptureStore(capture_settings.capture_database).find(request_id)[0].image)
    erased = captured.delete(f"/captures/{request_id}")
    assert erased.status_code == 200 and erased.json() == {"request_id": request_id, "deleted": 1}
    assert CaptureStore(capture_settings.capture_database).find(request_id) == []
    assert captured.delete(f"/captures/{request_id}").status_code == 404
    assert captured.get(f"/captures/{request_id}").status_code == 404
    assert captured.post("/feedback", json={"request_id": request_id, "label": 7}).status_code == 404


def test_feedback_is_off_without_capture(client: TestClient, test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    request_id = _predict(client, test_digits[0][0]).headers["x-request-id"]
    response = client.post("/feedback", json={"request_id": request_id, "label": 7})
    assert response.status_code == 404 and "CAPTURE_SAMPLE" in response.json()["detail"]
    assert client.delete(f"/captures/{request_id}").status_code == 404
    assert client.app.state.capture is None  # type: ignore[attr-defined]


def test_feedback_needs_the_api_key(capture_settings: Settings, test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    with TestClient(create_app(capture_settings.model_copy(update={"api_key": SecretStr(API_KEY)}))) as client:
        auth = {"X-API-Key": API_KEY}
        answer = client.post("/predict", files={"file": ("d.png", _png(test_digits[0][0]), "image/png")}, headers=auth)
        body = {"request_id": answer.headers["x-request-id"], "label": 7}
        assert client.post("/feedback", json=body).status_code == 401
        assert client.post("/feedback", json={"label": 99}).status_code == 401  # the key before the body
        assert client.delete(f"/captures/{body['request_id']}").status_code == 401
        assert client.get(f"/captures/{body['request_id']}").status_code == 401
        assert client.post("/feedback/examples?label=1", content=b"x", headers={"Content-Type": "image/png"}
                           ).status_code == 401
        assert client.post("/feedback", json=body, headers=auth).status_code == 200


def test_sampling_keeps_about_the_share_asked(settings: Settings, tmp_path: Path) -> None:
    database = str(tmp_path / "c.sqlite3")
    with TestClient(create_app(settings.model_copy(update={"capture_sample": 0.3, "capture_database": database}))
                    ) as client:
        for _ in range(300):
            assert client.post("/predict/pixels", json={"pixels": [0] * 784}).status_code == 200
    kept = CaptureStore(database).count()
    assert 45 <= kept <= 135, kept  # 90 expected; outside this is about 1 in a million


def test_feedback_answers_503_while_the_database_is_down(
    settings: Settings, postgres: Postgres, test_digits: tuple[np.ndarray, np.ndarray]  # noqa: F811
) -> None:
    with TestClient(create_app(settings.model_copy(update={"capture_sample": 1.0,
                                                           "capture_database": postgres.url}))) as client:
        request_id = _predict(client, test_digits[0][0]).headers["x-request-id"]
        postgres.stop()
        try:
            assert _predict(client, test_digits[0][1]).status_code == 200  # serving goes on
            response = client.post("/feedback", json={"request_id": request_id, "label": 7})
            assert response.status_code == 503 and response.headers["retry-after"]
            assert "postgres" not in response.text and "secret" not in response.text  # no DSN to clients
        finally:
            postgres.start()
    with contextlib.suppress(Exception), CaptureStore(postgres.url).transaction() as cur:
        cur.execute("DROP TABLE IF EXISTS captures")


# --- real servers --------------------------------------------------------------------------------------


def _load(url: str, images: np.ndarray, concurrency: int = 16) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda image: http.post("/predict", files={"file": ("d.png", _png(image), "image/png")}),
                             images))


def _scrape(url: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    }


@pytest.mark.e2e
def test_two_workers_write_one_sqlite_file(
    start_server: Callable[..., object], tmp_path: Path, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    database = tmp_path / "captures.sqlite3"
    server = start_server(WORKERS="2", CAPTURE_SAMPLE="1", CAPTURE_DATABASE=str(database))
    images, labels = test_digits
    answers = _load(server.url, images[:400], concurrency=32)  # type: ignore[attr-defined]
    assert all(r.status_code == 200 for r in answers)
    store = CaptureStore(str(database))
    deadline = time.monotonic() + 30
    while store.count() < 400:
        assert time.monotonic() < deadline, f"{store.count()} of 400 captured"
        time.sleep(0.2)
    # Feedback on a new connection reaches either worker, for captures either worker wrote.
    with httpx.Client(base_url=server.url, timeout=30) as http:  # type: ignore[attr-defined]
        for answer, label in zip(answers[:40], labels[:40], strict=True):
            response = http.post("/feedback", json={"request_id": answer.headers["x-request-id"],
                                                    "label": int(label)}, headers={"Connection": "close"})
            assert response.status_code == 200, response.text
    assert sum(store.label_counts().values()) == 40
    feedback = _scrape(server.url, "mnist_feedback_total")  # type: ignore[attr-defined]
    assert sum(feedback.values()) == 40
    assert set(_scrape(server.url, "mnist_capture_dropped_total").values()) == {0.0}  # type: ignore[attr-defined]
    assert _scrape(server.url, "mnist_captures_total")[""] == 400  # type: ignore[attr-defined]
    assert store.path is not None and Path(f"{store.path}-wal").exists()  # WAL mode


@pytest.mark.e2e
@pytest.mark.slow
def test_postgres_killed_under_load_fails_no_prediction(
    start_server: Callable[..., object], postgres: Postgres,  # noqa: F811
    test_digits: tuple[np.ndarray, np.ndarray],
) -> None:
    server = start_server(WORKERS="2", CAPTURE_SAMPLE="1", CAPTURE_DATABASE=postgres.url, CAPTURE_BUFFER="100")
    url = server.url  # type: ignore[attr-defined]
    images = test_digits[0]
    assert all(r.status_code == 200 for r in _load(url, images[:100]))
    store = CaptureStore(postgres.url)
    deadline = time.monotonic() + 30
    while store.count() < 100:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with ThreadPoolExecutor(1) as background:
        during = background.submit(_load, url, images[100:1600])
        time.sleep(1.0)
        postgres.stop()
        answers = during.result()
    try:
        failed = [r.status_code for r in answers if r.status_code != 200]
        assert not failed, f"{len(failed)} predictions failed while the database was down: {set(failed)}"
        dropped = _scrape(url, "mnist_capture_dropped_total")
        print(f"PostgreSQL stopped under load: {len(answers)} predictions, {len(failed)} failed; captures dropped "
              f"{dropped}, written {_scrape(url, 'mnist_captures_total')}")
        assert dropped["reason=database_error"] + dropped["reason=buffer_full"] > 0
        assert "can't be written" in server.stderr()  # type: ignore[attr-defined]
    finally:
        postgres.start()
    # Back: the buffers are written, and new predictions are captured again (a prediction while a
    # worker's buffer is still full may be dropped: keep predicting until one is stored).
    deadline = time.monotonic() + 60
    while True:
        (after,) = _load(url, images[2000:2001], concurrency=1)
        time.sleep(0.5)
        with contextlib.suppress(Exception):
            if CaptureStore(postgres.url).find(after.headers["x-request-id"]):
                break
        assert time.monotonic() < deadline, "capture did not resume after the database came back"
    assert "writable again" in server.stderr()  # type: ignore[attr-defined]
    with contextlib.suppress(Exception), CaptureStore(postgres.url).transaction() as cur:
        cur.execute("DROP TABLE IF EXISTS captures")
