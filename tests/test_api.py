"""The HTTP API through the app factory: answers, bad input, metrics, auth and failure handling.

Every test runs under both runtimes (TorchScript and ONNX Runtime) and both ways in (ASGI and the hot path).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import numpy as np
import onnxruntime
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mnist_service.inference.runtime import Runtime
from mnist_service.serving.api import create_app
from mnist_service.settings import Settings
from mnist_service.tools.images import png_bytes, user_digit

pytestmark = pytest.mark.both_runtimes

_NOISE_PNG = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 100), dtype=np.uint8)))


@pytest.fixture
def client(serve: Callable, settings: Settings) -> Iterator[TestClient]:
    """Every test here runs in-process (FastAPI answers) and over a socket with the hot path on."""
    with serve(settings) as c:
        yield c


@pytest.fixture(scope="module")
def digit_pngs(test_digits: tuple[np.ndarray, np.ndarray]) -> list[tuple[bytes, int]]:
    images, labels = test_digits
    return [(png_bytes(user_digit(images[i])), int(labels[i])) for i in range(20)]


def _predict(client: TestClient, data: bytes, **kwargs: object) -> dict:
    response = client.post("/predict", files={"file": ("digit.png", data, "image/png")}, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def test_probes_and_model_info(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model_version": "1"}  # MODEL_PATH: a repository of one version
    info = client.get("/model").json()
    sha256 = client.app.state.registry.default.predictor.sha256
    assert info["version"] == sha256 and 0 < info["test_accuracy"] <= 1
    assert info["model_version"] == "1" and info["labels"] == {"stable": 1}
    assert [(v["version"], v["state"], v["labels"], v["sha256"]) for v in info["versions"]] == [
        ("1", "READY", ["stable"], sha256)
    ]


def test_model_info_and_metrics_name_the_runtime(client: TestClient, runtime: str) -> None:
    info = client.get("/model").json()
    expected_version = {"torchscript": info["torch_version"], "onnxruntime": onnxruntime.__version__}[runtime]
    assert (info["runtime"], info["runtime_version"]) == (runtime, expected_version)
    assert info["torch_version"]  # what trained the model, whatever serves it
    assert info["versions"][0]["runtimes"] == ["torchscript", "onnxruntime"]
    platform = {"torchscript": "pytorch_torchscript", "onnxruntime": "onnxruntime_onnx"}[runtime]
    assert client.get("/v2/models/mnist").json()["platform"] == platform
    assert client.get("/v2/models/mnist/versions/1").json()["platform"] == platform
    info_lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("mnist_model_info{")]
    assert len(info_lines) == 1 and f'runtime="{runtime}"' in info_lines[0], info_lines


def test_predict_reads_user_images_correctly(client: TestClient, digit_pngs: list[tuple[bytes, int]]) -> None:
    answers = [_predict(client, data) for data, _ in digit_pngs]
    correct = sum(a["prediction"] == label for a, (_, label) in zip(answers, digit_pngs, strict=True))
    assert correct >= 17, f"only {correct}/20 right"
    for a in answers:
        assert a["label"] == str(a["prediction"])
        assert len(a["probabilities"]) == 10 and sum(a["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert a["confidence"] == max(a["probabilities"])
        assert a["model_version"] == "1"
        assert a["model_sha256"] == client.app.state.registry.default.predictor.sha256
        assert a["image_png_base64"] is None


def test_raw_body_upload_gives_the_same_answer(client: TestClient, digit_pngs: list[tuple[bytes, int]]) -> None:
    data = digit_pngs[0][0]
    raw = client.post("/predict", content=data, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200
    assert raw.json()["probabilities"] == pytest.approx(_predict(client, data)["probabilities"], abs=1e-6)


def test_batch_keeps_order(client: TestClient, digit_pngs: list[tuple[bytes, int]]) -> None:
    files = [("files", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(digit_pngs[:6])]
    answers = client.post("/predict/batch", files=files).json()
    assert [a["prediction"] for a in answers] == [_predict(client, d)["prediction"] for d, _ in digit_pngs[:6]]


def test_pixels_are_fed_as_given(client: TestClient, test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    digit = test_digits[0][3]
    answer = client.post("/predict/pixels", json={"pixels": digit.tolist()}).json()
    expected = client.app.state.registry.default.predictor.forward(digit[None])[0]
    np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-6)
    flat = client.post("/predict/pixels", json={"pixels": digit.reshape(-1).tolist()}).json()
    assert flat["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-6)


def test_debug_returns_the_image_the_model_saw(client: TestClient, digit_pngs: list[tuple[bytes, int]]) -> None:
    answer = _predict(client, digit_pngs[0][0], params={"debug": 1})
    seen = Image.open(io.BytesIO(base64.b64decode(answer["image_png_base64"])))
    assert seen.size == (28, 28) and seen.mode == "L"
    assert np.asarray(seen).max() > 200  # white ink on black, as in MNIST


def test_noise_gets_an_answer_not_an_error(client: TestClient) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    assert 0 <= _predict(client, png_bytes(noise))["prediction"] <= 9


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"files": {"file": ("x.png", b"not an image", "image/png")}}, 422, "not an image"),
        ({"files": {"file": ("x.png", b"", "image/png")}}, 422, "empty"),
        ({"files": {"file": ("x.png", _NOISE_PNG[: len(_NOISE_PNG) // 2], "image/png")}}, 422, "truncated"),
        ({"files": {"image": ("x.png", b"123", "image/png")}}, 400, "no multipart field named 'file'"),
        ({"data": {"file": "hello"}, "files": {"other": ("x", b"1")}}, 400, "must be a file upload"),
        ({"json": {"file": "x"}}, 415, "Content-Type"),
        ({"content": b"abc"}, 415, "Content-Type"),
        ({"files": {"file": ("x.png", png_bytes(Image.new("L", (64, 64), 0)), "image/png")}}, 422, "blank"),
    ],
)
def test_bad_uploads_get_actionable_4xx(client: TestClient, kwargs: dict, status: int, message: str) -> None:
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert message in body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"pixels": [0] * 10}, "784"),
        ({"pixels": [0.5] * 784}, "integers"),
        ({"pixels": [300] * 784}, "0-255"),
        ({"pixels": "abc"}, "pixels"),
        ({}, "pixels"),
    ],
)
def test_bad_pixels_get_422(client: TestClient, body: dict, message: str) -> None:
    response = client.post("/predict/pixels", json=body)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_malformed_json_gets_422(client: TestClient) -> None:
    response = client.post("/predict/pixels", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "invalid request" in response.json()["detail"]


def test_too_many_batch_files_is_refused(client: TestClient) -> None:
    limit = client.app.state.settings.max_batch_files
    files = [("files", (f"{i}.png", b"x", "image/png")) for i in range(limit + 1)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 400
    assert "Too many files" in response.json()["detail"] or str(limit) in response.json()["detail"]


@pytest.fixture
def small_limit_client(settings: Settings, serve: Callable) -> Iterator[TestClient]:
    with serve(Settings(model_path=settings.model_path, runtime=settings.runtime, max_upload_bytes=1000)) as c:
        yield c


def test_upload_over_the_limit_gets_413(small_limit_client: TestClient) -> None:
    response = small_limit_client.post("/predict", files={"file": ("big.png", b"x" * 5000, "image/png")})
    assert response.status_code == 413
    assert "MAX_UPLOAD_BYTES" in response.json()["detail"]


def test_chunked_upload_over_the_limit_gets_413(small_limit_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    response = small_limit_client.post("/predict", content=chunks(), headers={"Content-Type": "image/png"})
    assert response.status_code == 413


def test_decompression_bomb_gets_413(client: TestClient) -> None:
    from .test_preprocess import _png_header_only

    response = client.post("/predict", files={"file": ("bomb.png", _png_header_only(30_000, 30_000), "image/png")})
    assert response.status_code == 413


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    # Header injection attempts are replaced, not echoed.
    assert client.get("/healthz", headers={"X-Request-ID": "a b<script>"}).headers["x-request-id"] != "a b<script>"


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404 and "detail" in response.json()


def test_metrics_count_requests_predictions_and_batches(client: TestClient, digit_pngs: list) -> None:
    _predict(client, digit_pngs[0][0])
    client.post("/predict", files={"file": ("x.png", b"junk", "image/png")})
    text = client.get("/metrics").text
    assert 'mnist_requests_total{endpoint="/predict",method="POST",status="200",version="1"}' in text
    assert 'mnist_requests_total{endpoint="/predict",method="POST",status="422",version="1"}' in text
    for name in (
        "mnist_request_latency_seconds_bucket", "mnist_inference_seconds_bucket", "mnist_batch_size_bucket",
        "mnist_queue_wait_seconds_bucket", "mnist_queue_depth", "mnist_prediction_confidence_bucket",
        "mnist_predictions_total", "mnist_model_info",
    ):
        assert name in text, name
    assert client.app.state.registry.default.predictor.sha256 in text


def test_draining_server_is_not_ready(client: TestClient) -> None:
    client.app.state.draining = True
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["status"] == "draining"
    assert client.get("/healthz").status_code == 200


class _FailOnce:
    """A runtime that raises on its first forward pass, then answers: an injected inference failure."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.failed = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.failed:
            self.failed = True
            raise RuntimeError("secret internal detail: CUDA exploded at /opt/model.py:42")
        return self.inner.forward(x)


def test_inference_failure_is_a_generic_500_and_the_server_recovers(
    client: TestClient, digit_pngs: list[tuple[bytes, int]]
) -> None:
    predictor = client.app.state.registry.default.predictor
    predictor.runtime = _FailOnce(predictor.runtime)  # type: ignore[assignment]
    response = client.post("/predict", files={"file": ("d.png", digit_pngs[0][0], "image/png")})
    assert response.status_code == 500
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert "secret" not in response.text and "Traceback" not in response.text
    assert _predict(client, digit_pngs[0][0])["prediction"] == digit_pngs[0][1]


@pytest.fixture
def keyed_client(settings: Settings, serve: Callable) -> Iterator[TestClient]:
    with serve(Settings(model_path=settings.model_path, runtime=settings.runtime, api_key="s3cret")) as c:
        yield c


def test_api_key_guards_predictions_but_not_probes(keyed_client: TestClient, digit_pngs: list) -> None:
    files = {"file": ("d.png", digit_pngs[0][0], "image/png")}
    assert keyed_client.post("/predict", files=files).status_code == 401
    assert keyed_client.post("/predict", files=files, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed_client.post("/predict", files=files, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert keyed_client.post("/predict", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
    pixels = keyed_client.post("/predict/pixels", json={"pixels": [0] * 784})
    assert pixels.status_code == 401 and "API key" in pixels.json()["detail"]
    for path in ("/healthz", "/readyz", "/metrics", "/model"):
        assert keyed_client.get(path).status_code == 200, path


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.options(
        "/predict", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in response.headers


def test_cors_can_be_configured(settings: Settings) -> None:
    app = create_app(
        Settings(model_path=settings.model_path, runtime=settings.runtime, cors_origins=["https://app.example"])
    )
    with TestClient(app) as c:
        response = c.options(
            "/predict", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )
        assert response.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize(("mode", "logged"), [("all", {200, 422}), ("errors", {422}), ("off", set())])
def test_access_log_lines_follow_the_setting(
    settings: Settings, digit_pngs: list[tuple[bytes, int]], caplog: pytest.LogCaptureFixture, mode: str, logged: set,
    serve: Callable,
) -> None:
    with serve(settings.model_copy(update={"access_log": mode})) as c:
        with caplog.at_level("INFO", logger="mnist_service.access"):
            ok = c.post("/predict", files={"file": ("d.png", digit_pngs[0][0], "image/png")})
            bad = c.post("/predict", files={"file": ("x.png", b"junk", "image/png")})
    lines = [r.getMessage() for r in caplog.records if r.name == "mnist_service.access"]
    by_status = {200: ok, 422: bad}
    assert len(lines) == len(logged), lines
    for status in logged:
        request_id = by_status[status].headers["x-request-id"]
        assert any(f"status={status}" in line and request_id in line for line in lines), lines


@pytest.mark.parametrize(("value", "status"), [("yes", 200), ("0", 200), ("maybe", 422)])
def test_the_debug_flag_reads_like_a_boolean_query_parameter(
    client: TestClient, digit_pngs: list[tuple[bytes, int]], value: str, status: int
) -> None:
    files = [("files", ("d.png", digit_pngs[0][0], "image/png"))]
    response = client.post("/predict/batch", files=files, params={"debug": value})
    assert response.status_code == status, response.text
    if status == 200:
        assert (response.json()[0]["image_png_base64"] is not None) == (value == "yes")
    else:
        assert "debug must be true or false" in response.json()["detail"]
