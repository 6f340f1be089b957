"""The HTTP hot path (POST /predict and v2 infer answered below ASGI) answers exactly as FastAPI does.

Two real servers on real sockets, one with HOT_PATH on and one with it off, get the same requests,
good and bad, with and without the API key; every answer must match (probabilities within a
tolerance: the two paths may batch differently). The hot path must really be taken for what it
claims, and must hand everything unusual to FastAPI.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mnist_service.serving.middleware import RequestContextMiddleware
from mnist_service.serving.protocol import uvicorn_drift
from mnist_service.settings import Settings
from mnist_service.tools.images import noise_image, png_bytes, user_digit
from mnist_service.tools.images import test_digit as mnist_digit

from .conftest import metric_samples, same_answer, served_in_thread

KEY = {"x-api-key": "s3cret"}
MNIST_PNG = png_bytes(Image.fromarray(mnist_digit(0)[0]))
PHOTO_PNG = png_bytes(user_digit(mnist_digit(1)[0]))
BIG_PNG = png_bytes(noise_image(600))  # over 64 KiB: decoded on the pool, off the loop
PIXELS = mnist_digit(0)[0].astype(np.uint8)


def _v2(data: Any, shape: list[int], datatype: str = "UINT8", **extra: Any) -> dict[str, Any]:
    return {"json": {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}], **extra}}


def _binary_v2() -> dict[str, Any]:
    header = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [2, 784], "datatype": "UINT8", "parameters": {"binary_data_size": 1568}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "prediction"}],
        }
    ).encode()
    body = header + np.stack([PIXELS.ravel(), PIXELS.ravel()]).tobytes()
    return {
        "content": body,
        "headers": {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))},
    }


RAW = {"content-type": "image/png"}
# (name, path, request keyword arguments, the status with the right API key, whether the hot path takes it)
CASES: list[tuple[str, str, dict[str, Any], int, bool]] = [
    ("multipart", "/predict", {"files": {"file": ("d.png", MNIST_PNG, "image/png")}}, 200, True),
    ("raw", "/predict", {"content": MNIST_PNG, "headers": RAW}, 200, True),
    ("photo", "/predict", {"content": PHOTO_PNG, "headers": RAW}, 200, True),
    ("large", "/predict", {"content": BIG_PNG, "headers": RAW}, 200, True),
    ("octet", "/predict", {"content": MNIST_PNG, "headers": {"content-type": "application/octet-stream"}}, 200, True),
    ("debug", "/predict?debug=true", {"content": MNIST_PNG, "headers": RAW}, 200, True),
    ("bad-debug", "/predict?debug=maybe", {"content": MNIST_PNG, "headers": RAW}, 422, True),
    ("pinned", "/predict?version=1", {"content": MNIST_PNG, "headers": RAW}, 200, True),
    ("label", "/predict?version=stable", {"content": MNIST_PNG, "headers": RAW}, 200, True),
    ("empty-version", "/predict?version=", {"content": MNIST_PNG, "headers": RAW}, 200, True),
    ("unknown-version", "/predict?version=7", {"content": MNIST_PNG, "headers": RAW}, 404, True),
    ("no-label", "/predict?version=canary", {"content": MNIST_PNG, "headers": RAW}, 404, True),
    ("not-an-image", "/predict", {"content": b"not an image", "headers": RAW}, 422, True),
    ("empty-body", "/predict", {"content": b"", "headers": RAW}, 422, True),
    ("wrong-field", "/predict", {"files": {"image": ("d.png", MNIST_PNG, "image/png")}}, 400, True),
    ("text-field", "/predict", {"data": {"file": "hello"}, "files": {"other": ("a", b"x", "text/plain")}}, 400, True),
    ("two-files", "/predict", {"files": [("file", ("a.png", MNIST_PNG, "image/png"))] * 2}, 400, True),
    ("no-boundary", "/predict", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, True),
    ("json-to-predict", "/predict", {"content": b"{}", "headers": {"content-type": "application/json"}}, 415, False),
    ("no-content-type", "/predict", {"content": MNIST_PNG}, 415, False),
    ("v2-uint8", "/v2/models/mnist/infer", _v2(PIXELS.ravel().tolist(), [1, 784]), 200, True),
    ("v2-fp32", "/v2/models/mnist/infer", _v2((PIXELS / 255).ravel().tolist(), [1, 1, 28, 28], "FP32"), 200, True),
    ("v2-id-outputs", "/v2/models/mnist/infer", _v2(PIXELS.tolist(), [1, 28, 28], id="r1",
                                                   outputs=[{"name": "prediction"}]), 200, True),
    ("v2-binary", "/v2/models/mnist/infer", _binary_v2(), 200, True),
    ("v2-pinned", "/v2/models/mnist/versions/1/infer", _v2(PIXELS.ravel().tolist(), [1, 784]), 200, True),
    ("v2-unknown-version", "/v2/models/mnist/versions/9/infer", _v2([0] * 784, [1, 784]), 404, True),
    ("v2-unknown-model", "/v2/models/other/infer", _v2([0] * 784, [1, 784]), 404, True),
    ("v2-bad-shape", "/v2/models/mnist/infer", _v2([0] * 10, [1, 10]), 400, True),
    ("v2-bad-json", "/v2/models/mnist/infer", {"content": b"{nope", "headers": {"content-type": "application/json"}},
     400, True),
    ("v2-short-binary", "/v2/models/mnist/infer",
     {"content": b"{}", "headers": {"inference-header-content-length": "99"}}, 400, True),
    ("v2-zero-header-length", "/v2/models/mnist/infer",
     {"content": b"{}", "headers": {"inference-header-content-length": "0"}}, 400, False),
    ("v2-gzip", "/v2/models/mnist/infer",
     {"content": b"x", "headers": {"content-type": "application/json", "content-encoding": "gzip"}}, 415, False),
    ("v2-escaped", "/v2/models/mn%69st/infer", _v2([0] * 784, [1, 784]), 200, False),
    ("batch-route", "/predict/batch", {"files": [("files", ("a.png", MNIST_PNG, "image/png"))]}, 200, False),
]
_COMPARED_HEADERS = (
    "content-type", "x-model-version", "connection", "retry-after", "www-authenticate",
    "inference-header-content-length",
)


@pytest.fixture(scope="module")
def servers(model_path: Any) -> Iterator[dict[str, tuple[FastAPI, httpx.Client]]]:
    """Two servers of the same model and settings: HOT_PATH on, and off."""
    with contextlib.ExitStack() as stack:
        running = {}
        for name, hot in (("hot", True), ("asgi", False)):
            settings = Settings(model_path=model_path, api_key="s3cret", hot_path=hot, request_timeout_s=10.0)
            app, url = stack.enter_context(served_in_thread(settings))
            running[name] = (app, stack.enter_context(httpx.Client(base_url=url, timeout=30)))
        yield running


def _answer(response: httpx.Response) -> dict[str, Any]:
    """What a client sees of an answer: status, the headers that mean something, the body decoded."""
    content_type = response.headers.get("content-type", "")
    if content_type == "application/octet-stream":  # v2 binary outputs: JSON header, then raw floats
        split = int(response.headers["inference-header-content-length"])
        body: Any = {"header": json.loads(response.content[:split]),
                     "tail": np.frombuffer(response.content[split:], "<f4").tolist()}
    else:
        body = response.json()
        if isinstance(body, dict):
            body.pop("request_id", None)
    return {"status": response.status_code, "body": body,
            **{name: response.headers.get(name) for name in _COMPARED_HEADERS}}


class _AsgiCount:
    """How many requests reached the FastAPI app (through our middleware, on either of its stacks)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = RequestContextMiddleware.__call__

        async def counted(middleware: Any, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.count += 1
            await original(middleware, scope, receive, send)

        monkeypatch.setattr(RequestContextMiddleware, "__call__", counted)


@pytest.mark.parametrize(("name", "path", "kwargs", "status", "hot"), CASES, ids=[c[0] for c in CASES])
def test_the_hot_path_answers_like_fastapi(
    servers: dict[str, tuple[FastAPI, httpx.Client]], monkeypatch: pytest.MonkeyPatch,
    name: str, path: str, kwargs: dict[str, Any], status: int, hot: bool,
) -> None:
    asgi_calls = _AsgiCount(monkeypatch)
    for key_headers, expected in ((KEY, status), ({}, 401), ({"authorization": "Bearer wrong"}, 401)):
        request = {**kwargs, "headers": {**kwargs.get("headers", {}), **key_headers}}
        before = asgi_calls.count
        a = servers["hot"][1].post(path, **request)
        reached_asgi = asgi_calls.count - before
        b = servers["asgi"][1].post(path, **request)
        if not (name == "v2-unknown-model" and not key_headers.get("x-api-key")):
            assert a.status_code == expected, (name, key_headers, a.text)
        assert same_answer(_answer(a), _answer(b)), (name, key_headers, _answer(a), _answer(b))
        assert a.headers["x-request-id"] and a.headers["x-request-id"] != b.headers["x-request-id"]
        # The hot path takes what it claims and hands the rest to FastAPI.
        taken_by = "FastAPI" if reached_asgi else "the hot path"
        assert reached_asgi == (0 if hot else 1), (name, f"taken by {taken_by}")


def test_a_request_id_is_echoed_and_the_metrics_count_both_paths_alike(
    servers: dict[str, tuple[FastAPI, httpx.Client]],
) -> None:
    counted = {}
    for name, (app, client) in servers.items():
        before = metric_samples(app, "mnist_requests_total")
        answer = client.post("/predict", content=MNIST_PNG, headers={**RAW, **KEY, "x-request-id": "trace-me-1"})
        assert answer.headers["x-request-id"] == "trace-me-1"
        bad = client.post("/v2/models/mnist/infer", json={"inputs": []}, headers=KEY)
        assert bad.status_code == 400
        after = metric_samples(app, "mnist_requests_total")
        counted[name] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert counted["hot"] == counted["asgi"]
    assert {dict(k)["endpoint"] for k in counted["hot"]} == {"/predict", "/v2/models/{model_name}/infer"}


def _raw(port: int, data: bytes, until_closed: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if until_closed:
            received = b""
            while chunk := s.recv(65536):
                received += chunk
            return received
        return s.recv(65536)


def _port(client: httpx.Client) -> int:
    return int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])


def _upload(path: str = "/predict", extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: s3cret\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(MNIST_PNG)}\r\n".encode() + extra + b"\r\n" + MNIST_PNG
    )


def _responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each HTTP/1.1 answer in a stream with content-length bodies."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
        out.append((lines[0], rest[:length]))
        data = rest[length:]
    return out


@pytest.mark.parametrize("which", ["hot", "asgi"])
def test_pipelined_requests_are_answered_in_order(servers: dict[str, tuple[FastAPI, httpx.Client]], which: str) -> None:
    port = _port(servers[which][1])
    stream = _upload() + _upload("/v2/models/mnist/infer") + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + _upload(
        extra=b"Connection: close\r\n"
    )
    answers = _responses(_raw(port, stream, until_closed=True))
    assert [line for line, _ in answers] == [
        b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"
    ]
    assert json.loads(answers[0][1])["prediction"] == json.loads(answers[3][1])["prediction"] == mnist_digit(0)[1]
    assert json.loads(answers[2][1]) == {"status": "ok"}


@pytest.mark.parametrize("which", ["hot", "asgi"])
def test_unusual_requests_go_to_fastapi_and_are_answered(
    servers: dict[str, tuple[FastAPI, httpx.Client]], which: str
) -> None:
    port = _port(servers[which][1])
    # Expect: 100-continue: the interim answer, then the real one.
    head = (f"POST /predict HTTP/1.1\r\nHost: t\r\nX-API-Key: s3cret\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(MNIST_PNG)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(MNIST_PNG)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:100]
    # A chunked body.
    chunked = (b"POST /predict HTTP/1.1\r\nHost: t\r\nX-API-Key: s3cret\r\nContent-Type: image/png\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + f"{len(MNIST_PNG):x}\r\n".encode() + MNIST_PNG + b"\r\n0\r\n\r\n")
    assert _raw(port, chunked, until_closed=True).startswith(b"HTTP/1.1 200 OK")
    # A declared body over MAX_UPLOAD_BYTES: 413 at once, before the body is read.
    too_large = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 999999999\r\n\r\n"
    answer = _raw(port, too_large)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert b"MAX_UPLOAD_BYTES" in answer


@pytest.mark.parametrize("which", ["hot", "asgi"])
def test_oversized_heads_get_431_and_the_server_carries_on(
    servers: dict[str, tuple[FastAPI, httpx.Client]], which: str
) -> None:
    app, client = servers[which]
    port = _port(client)
    before = metric_samples(app, "mnist_heads_refused_total").get((), 0)
    long_header = b"POST /predict HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    many_headers = b"POST /predict HTTP/1.1\r\nHost: t\r\n" + b"".join(
        f"X-H{i}: v\r\n".encode() for i in range(10_000)
    ) + b"\r\n"
    for head in (long_header, many_headers):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # it closes while we still write
                s.sendall(head)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:100]
        assert b"connection: close" in answer and (b"MAX_HEADER_BYTES" in answer or b"MAX_HEADERS" in answer)
    assert metric_samples(app, "mnist_heads_refused_total")[()] == before + 2
    ok = client.post("/predict", content=MNIST_PNG, headers={**RAW, **KEY})
    assert ok.status_code == 200 and ok.json()["prediction"] == mnist_digit(0)[1]


def test_the_uvicorn_internals_it_relies_on_are_there(monkeypatch: pytest.MonkeyPatch) -> None:
    assert uvicorn_drift() == [], (
        "the installed uvicorn differs from the one the hot path was built on (requirements.txt pins it): "
        f"{uvicorn_drift()}; re-check mnist_service/serving/protocol.py and hotpath.py against it"
    )
    monkeypatch.delattr(HttpToolsProtocol, "on_url")
    assert uvicorn_drift() == ["HttpToolsProtocol.on_url()"]
