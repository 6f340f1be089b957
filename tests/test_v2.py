"""Open Inference Protocol (v2): the real tritonclient against a real uvicorn server, and bad requests.

Every test runs under both runtimes (TorchScript and ONNX Runtime), with the hot path on and off.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from mnist_service.errors import Overloaded
from mnist_service.inference.predictor import InferenceFailed
from mnist_service.settings import Settings

from .conftest import served_in_thread

pytestmark = pytest.mark.both_runtimes

N_DIGITS = 64  # MAX_BATCH_FILES, the largest batch v2 accepts
PLATFORMS = {"torchscript": "pytorch_torchscript", "onnxruntime": "onnxruntime_onnx"}  # as Triton names them


@pytest.fixture(scope="module", params=[(True, "torchscript"), (False, "torchscript"), (True, "onnxruntime"),
                                        (False, "onnxruntime")], ids=lambda p: f"{'hot' if p[0] else 'asgi'}-{p[1]}")
def server(model_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A real server on a free port (tritonclient needs real HTTP), with the hot path on and off, under each
    runtime: (url, runtime)."""
    hot_path, runtime = request.param
    settings = Settings(
        model_path=model_path, max_batch_delay_ms=1.0, request_timeout_s=10.0, hot_path=hot_path, runtime=runtime
    )
    with served_in_thread(settings) as (_, url):
        yield url, runtime


@pytest.fixture(scope="module")
def server_url(server: tuple[str, str]) -> str:
    return server[0]


@pytest.fixture
def client(serve: Callable, settings: Settings) -> Iterator[TestClient]:
    """Every test here runs in-process (FastAPI answers) and over a socket with the hot path on."""
    with serve(settings) as c:
        yield c


@pytest.fixture(scope="module")
def triton(server_url: str) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server_url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def digits(test_digits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = test_digits
    return images[:N_DIGITS], labels[:N_DIGITS]


@pytest.fixture(scope="module")
def reference(server_url: str, digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """What our own /predict/pixels answers for the same digits: probabilities (N, 10)."""
    with httpx.Client(base_url=server_url, timeout=10) as http:
        rows = []
        for image in digits[0]:
            response = http.post("/predict/pixels", json={"pixels": image.tolist()})
            assert response.status_code == 200, response.text
            rows.append(response.json()["probabilities"])
    return np.array(rows, dtype=np.float32)


def test_server_and_model_are_live_ready_and_described(
    triton: httpclient.InferenceServerClient, server: tuple[str, str]
) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("mnist")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    model = triton.get_model_metadata("mnist")
    assert model["name"] == "mnist" and model["platform"] == PLATFORMS[server[1]]
    assert model["versions"] == ["1"]  # MODEL_PATH: a repository of one version
    assert model["inputs"][0]["datatype"] == "FP32" and model["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]),
        "prediction": ("INT64", [-1]),
    }
    assert triton.is_model_ready("mnist", model_version="1")
    assert triton.is_model_ready("mnist", model_version="stable")
    assert not triton.is_model_ready("mnist", model_version="2")


@pytest.mark.parametrize("n", [1, N_DIGITS])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_tritonclient_infer_matches_predict_pixels(
    triton: httpclient.InferenceServerClient,
    digits: tuple[np.ndarray, np.ndarray],
    reference: np.ndarray,
    datatype: str,
    binary: bool,
    n: int,
) -> None:
    images = digits[0][:n]
    array = (images / 255.0).astype(np.float32)[:, None] if datatype == "FP32" else images.reshape(n, 784)
    tensor = httpclient.InferInput("input", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("prediction", binary_data=binary),
    ]
    result = triton.infer("mnist", [tensor], outputs=outputs, request_id=f"req-{datatype}-{n}")

    assert result.get_response()["id"] == f"req-{datatype}-{n}"
    probs, prediction = result.as_numpy("probabilities"), result.as_numpy("prediction")
    assert probs.dtype == np.float32 and probs.shape == (n, 10)
    assert prediction.dtype == np.int64 and prediction.shape == (n,)
    np.testing.assert_allclose(probs, reference[:n], atol=1e-5)
    np.testing.assert_array_equal(prediction, reference[:n].argmax(1))


def test_a_batch_is_mostly_right(
    triton: httpclient.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """Guards the scaling: a model fed wrongly scaled pixels agrees with itself but not with the labels."""
    images, labels = digits
    tensor = httpclient.InferInput("pixels", [N_DIGITS, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images)
    result = triton.infer("mnist", [tensor])  # no outputs named: both come back, as binary
    assert (result.as_numpy("prediction") == labels).mean() >= 0.85
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(1), 1.0, atol=1e-5)


def test_versioned_infer_and_unknown_names(
    triton: httpclient.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    version = triton.get_model_metadata("mnist")["versions"][0]
    tensor = httpclient.InferInput("input", [1, 784], "UINT8")
    tensor.set_data_from_numpy(digits[0][:1].reshape(1, 784))
    result = triton.infer("mnist", [tensor], model_version=version)
    assert result.as_numpy("prediction")[0] == digits[1][0]
    with pytest.raises(InferenceServerException, match="unknown model 'resnet'") as caught:
        triton.infer("resnet", [tensor])
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match=r"version 2 is not loaded; loaded: 1 \(stable\)") as caught:
        triton.infer("mnist", [tensor], model_version="2")
    assert caught.value.status() == "404"


def test_a_client_mistake_reaches_tritonclient_as_a_readable_error(triton: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("input", [1, 784], "FP32")
    tensor.set_data_from_numpy(np.full((1, 784), 255.0, dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"in \[0, 1\]") as caught:
        triton.infer("mnist", [tensor])
    assert caught.value.status() == "400"


# Bad requests, over the in-process client.

INFER = "/v2/models/mnist/infer"


def _body(shape: list[int] | None = None, datatype: str = "UINT8", data: object = None, **extra: object) -> dict:
    shape = shape or [1, 784]
    values = data if data is not None else [0] * int(np.prod(shape))
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": values}], **extra}


def _binary(header: dict, tail: bytes, header_length: int | None = None) -> dict:
    head = json.dumps(header).encode()
    length = len(head) if header_length is None else header_length
    return {"content": head + tail, "headers": {"Inference-Header-Content-Length": str(length)}}


def _assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert words in body["error"]


@pytest.mark.parametrize(
    ("request_kwargs", "words"),
    [
        ({"json": _body(datatype="INT64")}, "'FP32' or 'UINT8'"),
        ({"json": _body(shape=[1, 3, 28, 28])}, "is not accepted"),
        ({"json": _body(shape=[1, 784], data=[0] * 783)}, "783 values"),
        ({"json": _body(shape=[65, 784])}, "N=65"),
        ({"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, "not valid JSON"),
        ({"content": b"\x89PNG\r\n", "headers": {"content-type": "application/octet-stream"}}, "not valid JSON"),
        ({"json": _body(outputs=[{"name": "logits"}])}, "outputs.0.name"),
        ({"json": {"inputs": [_body()["inputs"][0]] * 2}}, "at most 1"),
        (
            _binary(
                {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8",
                             "parameters": {"binary_data_size": 784}}]},
                b"\0" * 780,
            ),
            "780 bytes follow",
        ),
        (
            _binary(
                {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32",
                             "parameters": {"binary_data_size": 784}}]},
                b"\0" * 784,
            ),
            "needs 3136 bytes",
        ),
        (_binary(_body(), b"", header_length=10**6), "body has"),
        ({"json": _body(), "headers": {"Inference-Header-Content-Length": "-5"}}, "inference-header-content-length"),
    ],
)
def test_bad_requests_get_a_protocol_400(client: TestClient, request_kwargs: dict, words: str) -> None:
    _assert_error(client.post(INFER, **request_kwargs), 400, words)


def test_unknown_model_and_version_are_404(client: TestClient) -> None:
    _assert_error(client.post("/v2/models/resnet/infer", json=_body()), 404, "serves 'mnist'")
    _assert_error(client.get("/v2/models/resnet"), 404, "unknown model")
    _assert_error(client.get("/v2/models/resnet/ready"), 404, "unknown model")
    _assert_error(client.post("/v2/models/mnist/versions/7/infer", json=_body()), 404, "model version 7 is not loaded")
    _assert_error(client.post("/v2/models/mnist/versions/x/infer", json=_body()), 404, "unknown model version")
    version = client.get("/v2/models/mnist").json()["versions"][0]
    assert client.post(f"/v2/models/mnist/versions/{version}/infer", json=_body()).status_code == 200


def test_compressed_bodies_are_refused(client: TestClient) -> None:
    _assert_error(client.post(INFER, json=_body(), headers={"Content-Encoding": "gzip"}), 415, "uncompressed")


def test_api_key_guards_model_routes_but_not_health(model_path: Path, serve: Callable) -> None:
    settings = Settings(model_path=model_path, api_key="s3cret")
    with serve(settings) as client:
        for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        _assert_error(client.get("/v2/models/mnist"), 401, "API key")
        _assert_error(client.post(INFER, json=_body()), 401, "API key")
        assert client.post(INFER, json=_body(), headers={"X-API-Key": "s3cret"}).status_code == 200


def test_draining_makes_readiness_fail(client: TestClient) -> None:
    client.app.state.draining = True
    _assert_error(client.get("/v2/health/ready"), 503, "draining")
    _assert_error(client.get("/v2/models/mnist/ready"), 503, "draining")
    assert client.get("/v2/health/live").status_code == 200


def _failing(client: TestClient, error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def submit(digits: np.ndarray, *, alone: bool = False) -> asyncio.Future[np.ndarray]:
        if isinstance(error, Overloaded):
            raise error  # a full queue refuses at once
        failed: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        failed.set_exception(error)  # a failed forward pass fails the request's future
        return failed

    monkeypatch.setattr(client.app.state.registry.default.predictor, "submit", submit)


def test_overload_keeps_its_503_and_retry_after(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing(client, Overloaded("queue full", 2), monkeypatch)
    response = client.post(INFER, json=_body())
    _assert_error(response, 503, "queue full")
    assert response.headers["retry-after"] == "2"


def test_inference_failure_is_a_500_without_internals(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing(client, InferenceFailed("boom at layer 3"), monkeypatch)
    response = client.post(INFER, json=_body(), headers={"X-Request-ID": "abc-123"})
    _assert_error(response, 500, "abc-123")
    assert "boom" not in response.text


def test_json_answer_shape(client: TestClient) -> None:
    response = client.post(INFER, json=_body(id="my-id", outputs=[{"name": "prediction"}]))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"] == "my-id" and body["model_name"] == "mnist"
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [("prediction", "INT64", [1])]
    assert isinstance(body["outputs"][0]["data"][0], int)


def test_openapi_documents_both_body_encodings(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(operation["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert "/v2/models/{model_name}/versions/{model_version}/infer" in spec["paths"]
    assert "/v2/health/ready" in spec["paths"]


def test_errors_raised_outside_the_v2_router_use_the_protocol_shape(model_path: Path, serve: Callable) -> None:
    """A wrong method, and a body refused by the upload limit before any route runs."""
    with serve(Settings(model_path=model_path, max_upload_bytes=1000)) as small:
        wrong_method = small.get("/v2/models/mnist/infer")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        too_big = small.post(
            "/v2/models/mnist/infer", content=b"x" * 5000, headers={"Content-Type": "application/json"}
        )
        assert too_big.status_code == 413
        assert "MAX_UPLOAD_BYTES" in too_big.json()["error"]
        # Our own endpoints keep their shape.
        assert "error" not in small.post("/predict", content=b"x" * 5000, headers={"Content-Type": "image/png"}).json()
