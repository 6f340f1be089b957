"""Slow, idle and vanishing clients against a real uvicorn server on a real socket.

The server runs in a thread of the test process (one worker, the same protocol class and
middleware as in production), so a test can read its metrics and, for the inference tests, slow
its model down: what is checked is what a client sees on the wire and what the server counts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from mnist_service.settings import Settings
from mnist_service.tools.images import png_bytes

from .conftest import metric_samples, served_in_thread

HEADER_TIMEOUT = 0.6
BODY_TIMEOUT = 0.8
KEEPALIVE_TIMEOUT = 0.5


class _Running:
    def __init__(self, app: FastAPI, port: int) -> None:
        self.app, self.port = app, port

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(5)
        return s

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return metric_samples(self.app, name)

    def status_count(self, status: int) -> float:
        return sum(v for labels, v in self.samples("mnist_requests_total").items() if ("status", str(status)) in labels)


@pytest.fixture(params=[True, False], ids=["hot", "asgi"])
def server(model_path: Path, request: pytest.FixtureRequest) -> Iterator[_Running]:
    """The server with the hot path on (POST /predict below ASGI) and off: every test here runs both ways."""
    settings = Settings(
        model_path=model_path, header_timeout_s=HEADER_TIMEOUT, body_timeout_s=BODY_TIMEOUT,
        keepalive_timeout_s=KEEPALIVE_TIMEOUT, max_batch_delay_ms=0, hot_path=request.param,
    )
    with served_in_thread(settings) as (app, url):
        yield _Running(app, int(url.rsplit(":", 1)[1]))


def _read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := s.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def _digit_png() -> bytes:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[6:22, 12:16] = 255  # a 1
    return png_bytes(Image.fromarray(image))


def _raw_upload(body: bytes, length: int | None = None) -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {length if length is not None else len(body)}\r\n\r\n".encode()
        + body
    )


def test_headers_sent_too_slowly_get_408_and_the_connection_closed(server: _Running) -> None:
    with server.connect() as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\n")  # and never the rest
        data, waited = _read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"HEADER_TIMEOUT_S" in data
    assert HEADER_TIMEOUT * 0.8 < waited < HEADER_TIMEOUT + 3, waited
    assert server.samples("mnist_header_timeouts_total") == {(): 1.0}


def test_a_byte_at_a_time_does_not_extend_the_header_deadline(server: _Running) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 100
    with server.connect() as s:
        started = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in request:  # slowloris: every byte well inside the deadline, the whole far outside
                s.sendall(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - started < HEADER_TIMEOUT + 3
    assert server.samples("mnist_header_timeouts_total") == {(): 1.0}


def test_a_connection_that_sends_nothing_is_closed_silently(server: _Running) -> None:
    with server.connect() as s:
        data, waited = _read_until_closed(s)
    assert data == b""
    assert HEADER_TIMEOUT * 0.8 < waited < HEADER_TIMEOUT + 3, waited


def test_an_idle_keepalive_connection_is_closed(server: _Running) -> None:
    with server.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        first = s.recv(65536)
        data, waited = _read_until_closed(s)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert data == b""
    assert waited < KEEPALIVE_TIMEOUT + 3, waited


def test_a_keepalive_connection_in_use_is_not_cut(server: _Running) -> None:
    """Requests on one connection, spread over more than the header deadline: all answered."""
    with server.connect() as s:
        for _ in range(6):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_TIMEOUT / 3)


def test_a_body_sent_too_slowly_gets_408_and_the_connection_closed(server: _Running) -> None:
    png = _digit_png()
    with server.connect() as s:
        s.sendall(_raw_upload(png[:10], length=len(png)))
        data, waited = _read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"connection: close" in data.lower()
    assert b"BODY_TIMEOUT_S" in data
    assert BODY_TIMEOUT * 0.8 < waited < BODY_TIMEOUT + 3, waited
    assert server.status_count(408) == 1


def test_a_client_hanging_up_mid_upload_is_a_499_in_one_line(
    server: _Running, caplog: pytest.LogCaptureFixture
) -> None:
    png = _digit_png()
    caplog.set_level(logging.INFO)
    with server.connect() as s:
        s.sendall(_raw_upload(png[:10], length=len(png)))
        time.sleep(0.1)
    _wait_for(lambda: server.status_count(499) == 1, "the hang-up was never counted as 499")
    assert server.status_count(500) == 0
    lines = [r for r in caplog.records if "status=499" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert not any(r.exc_info for r in caplog.records), "a hang-up must not log a traceback"
    assert not any(r.levelno >= logging.ERROR for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_client_hanging_up_mid_json_body_is_a_499(server: _Running) -> None:
    """/predict/pixels reads its body through FastAPI, which turns a disconnect into a 400."""
    with server.connect() as s:
        s.sendall(
            b"POST /predict/pixels HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n{\"pixels\": [0, 0, "
        )
        time.sleep(0.1)
    _wait_for(lambda: server.status_count(499) == 1, "the hang-up was never counted as 499")
    assert server.status_count(400) == 0 and server.status_count(500) == 0


def _slow_model(server: _Running, seconds: float) -> list[int]:
    """Make every forward pass take `seconds`; returns the list of batch sizes it computes."""
    runtime = server.app.state.registry.default.predictor.runtime
    forward = runtime.forward
    computed: list[int] = []

    def slow(x: Any) -> Any:
        computed.append(int(x.shape[0]))
        time.sleep(seconds)
        return forward(x)

    runtime.forward = slow
    return computed


def test_a_request_whose_client_left_while_queued_is_not_computed(
    server: _Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed = _slow_model(server, 0.6)
    # As under load: no request is alone, so both go through the batcher's queue (a lone request
    # would run inline, on the event loop).
    monkeypatch.setattr(server.app.state.dataplane, "in_flight", SimpleNamespace(alone=lambda: False))
    _abandon_a_queued_request(server, computed)


def _abandon_a_queued_request(server: _Running, computed: list[int]) -> None:
    png = _digit_png()
    with server.connect() as first:
        first.sendall(_raw_upload(png))  # occupies the inference thread for 0.6 s
        _wait_for(lambda: computed == [1], "the first request never reached the model")
        with server.connect() as second:
            second.sendall(_raw_upload(png))  # queued behind it...
            time.sleep(0.1)
        # ...and its client gone before the first forward pass ends.
        answer = first.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    _wait_for(lambda: server.status_count(499) == 1, "the queued hang-up was never counted as 499")
    time.sleep(0.8)  # time enough for a second forward pass, had the request been kept
    assert computed == [1], f"the abandoned request was computed: batches {computed}"
    assert server.status_count(500) == 0


def test_a_lone_request_runs_inline_and_requests_that_arrive_together_are_batched(server: _Running) -> None:
    runtime = server.app.state.registry.default.predictor.runtime
    forward = runtime.forward
    passes: list[tuple[str, int]] = []  # (thread, images) of every forward pass

    def recording(x: Any) -> Any:
        passes.append((threading.current_thread().name, int(x.shape[0])))
        return forward(x)

    runtime.forward = recording
    upload = _raw_upload(_digit_png())
    with server.connect() as s:
        for _ in range(3):  # one client, one request at a time
            s.sendall(upload)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert passes and all(not thread.startswith("inference") for thread, _ in passes), passes
    passes.clear()
    # A lone request whose forward pass holds the event loop for 0.3 s; eight more are written
    # meanwhile, so the server reads them together: none is alone, and they share forward passes.
    def first_one_slow(x: Any) -> Any:
        out = recording(x)
        if len(passes) == 1:
            time.sleep(0.3)
        return out

    runtime.forward = first_one_slow
    clients = [server.connect() for _ in range(9)]
    try:
        for c in clients:  # every connection accepted and read by the server before the test proper
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        clients[0].sendall(upload)
        _wait_for(lambda: bool(passes), "the lone request never reached the model")
        for c in clients[1:]:
            c.sendall(upload)
        for c in clients:
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for c in clients:
            c.close()
    assert sum(n for _, n in passes) == 9
    assert len(passes) < 9 and any(thread.startswith("inference") for thread, _ in passes), passes


def test_many_slow_clients_do_not_delay_a_normal_one(server: _Running) -> None:
    """300 connections dribbling headers; a normal client is still answered at once, every time."""
    attackers = []
    for _ in range(300):
        s = server.connect()
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\n")
        attackers.append(s)
    png = _digit_png()
    latencies = []
    with server.connect() as s:
        for _ in range(10):
            started = time.monotonic()
            s.sendall(_raw_upload(png))
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            latencies.append(time.monotonic() - started)
    # The attackers are cut off at the deadline: each got its 408 and a closed connection.
    closed = 0
    for s in attackers:
        data, _ = _read_until_closed(s)
        closed += data.startswith(b"HTTP/1.1 408 ")
        s.close()
    assert closed == 300
    assert max(latencies) < HEADER_TIMEOUT, latencies  # answered long before any attacker was cut off


def _wait_for(condition: Callable[[], bool], message: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_cancellation_that_is_not_a_hangup_still_propagates() -> None:
    """A shutdown's cancellation must not be swallowed as a 499 (only CLIENT_GONE is)."""
    from mnist_service.metrics import Metrics
    from mnist_service.serving.middleware import RequestContextMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def run() -> None:
        metrics = Metrics()
        middleware = RequestContextMiddleware(app, metrics, 1000)
        scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        task = asyncio.create_task(middleware(scope, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


class _RecordingTransport(asyncio.Transport):
    """What the protocol writes, one entry per write() call: the system calls a socket would see."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _asgi_demo(scope: Any, receive: Any, send: Any) -> None:
    """/stream answers in two chunks, /fail starts an answer and raises, anything else answers 'hello'."""
    if scope["type"] != "http":
        return
    message = await receive()
    body = message.get("body", b"")
    if scope["path"] == "/fail":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        raise RuntimeError("broken app")
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await send({"type": "http.response.body", "body": b"two"})
        return
    answer = b"hello" + body
    length = str(len(answer)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]})
    await send({"type": "http.response.body", "body": answer})


def _writes_for(request: bytes, then: bytes = b"") -> _RecordingTransport:
    """Feed raw request bytes (and, after the protocol answered the first part, `then`) to the protocol."""
    import uvicorn
    from uvicorn.server import ServerState

    from mnist_service.serving.protocol import guarded_protocol

    async def run() -> _RecordingTransport:
        config = uvicorn.Config(app=_asgi_demo, log_config=None, server_header=False, date_header=False)
        config.load()
        protocol = guarded_protocol(5.0)(config=config, server_state=ServerState(), app_state={})
        transport = _RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(request)
        for _ in range(20):
            await asyncio.sleep(0)
        if then:
            protocol.data_received(then)
            for _ in range(20):
                await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    return asyncio.run(run())


def test_an_answer_leaves_in_one_write() -> None:
    """Head and body of an answer go out in one send(), not two: on loopback each send wakes the client."""
    get = _writes_for(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
    assert get.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
    post = _writes_for(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
    assert post.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nhelloabc"]
    # Two requests on one connection: one write each.
    keepalive = _writes_for(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", b"GET /y HTTP/1.1\r\nhost: a\r\n\r\n")
    assert [w.endswith(b"hello") for w in keepalive.writes] == [True, True]


def test_heads_without_a_body_and_interim_answers_are_not_held() -> None:
    head = _writes_for(b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n")
    assert head.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]
    # 100 Continue goes out at once (the client waits for it before sending its body).
    expect = _writes_for(
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n", b"abc"
    )
    assert expect.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nhelloabc"]
    # A streamed answer: the head rides with the first chunk, later chunks follow as they come.
    stream = _writes_for(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    assert stream.writes == [head + b"3\r\none\r\n", b"3\r\ntwo\r\n0\r\n\r\n"]
    # An app that fails after starting its answer: the head still reaches the client before the close.
    fail = _writes_for(b"GET /fail HTTP/1.1\r\nhost: a\r\n\r\n")
    assert fail.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"] and fail.closed
