"""The stress tester's arithmetic, payloads and HTTP client (the e2e test runs it against a real server)."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import numpy as np
import pytest
from starlette.requests import Request

from mnist_service.serving import v2_codec
from mnist_service.tools.stress import Connection, Payload, PhaseResult, build_payload, run_phase


def test_summary_percentiles_and_errors() -> None:
    statuses = Counter({"200": 97, "503": 2, "ConnectError": 1})
    result = PhaseResult(latencies_ms=[float(i) for i in range(1, 101)], statuses=statuses, seconds=2.0)
    s = result.summary()
    assert s["requests"] == 100 and s["errors"] == 3 and s["throughput_rps"] == 50.0
    assert s["latency_ms"]["p50"] == pytest.approx(50.5) and s["latency_ms"]["max"] == 100.0
    assert s["latency_ms"]["p99"] == pytest.approx(99.01)


def test_empty_phase_reports_zeros() -> None:
    s = PhaseResult().summary()
    assert s["requests"] == 0 and s["throughput_rps"] == 0.0


def test_multipart_payload_parses_as_a_file_field() -> None:
    payload = build_payload(b"\x89PNGdata", "multipart")

    async def parse() -> bytes:
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            body_sent = True
            return {"type": "http.request", "body": payload.body, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", payload.content_type.encode())]}
        async with Request(scope, receive).form() as form:
            return await form["file"].read()

    assert asyncio.run(parse()) == b"\x89PNGdata"
    assert payload.path == "/predict"


def test_other_modes() -> None:
    assert build_payload(b"img", "raw").content_type == "image/png"
    pixels = build_payload(b"", "pixels", [0] * 784)
    assert pixels.path == "/predict/pixels" and pixels.body.startswith(b'{"pixels": [0, 0')
    with pytest.raises(ValueError, match="pixels mode"):
        build_payload(b"", "pixels")


def test_v2_mode_sends_the_digit_as_binary_tensor_data_the_server_decodes() -> None:
    """--mode v2: the UINT8 [1,28,28] tensor --protocol grpc sends, over REST with the binary extension."""
    pixels = np.arange(784) % 256
    payload = build_payload(b"", "v2", pixels.tolist())
    assert payload.path == "/v2/models/mnist/infer" and payload.content_type == "application/octet-stream"
    (name, length), = payload.headers
    assert name == "Inference-Header-Content-Length"
    header, binary = v2_codec.split_body(payload.body, int(length))
    request = v2_codec.parse_request(header)
    digits = v2_codec.decode_input(request.inputs[0], binary, max_batch=64)
    assert digits.shape == (1, 28, 28) and (digits.ravel() == pixels).all()
    assert request.parameters.binary_data_output  # answered in binary too, as the gRPC door answers raw
    # The header goes out with every request.
    head = Connection("http://127.0.0.1:1", payload, 1.0).request.split(b"\r\n\r\n")[0]
    assert f"Inference-Header-Content-Length: {length}".encode() in head.split(b"\r\n")


_ANSWERS = {
    "/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=1\r\nlo\r\n0\r\n\r\n",
    "/error": b"HTTP/1.1 422 Unprocessable Content\r\ncontent-length: 2\r\n\r\n{}",
    "/close": b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    "/eof": b"HTTP/1.0 200 OK\r\n\r\nbody until the end",
    "/garbage": b"SSH-2.0-OpenSSH\r\n\r\n",
    "/slow": b"",
}


async def _serve_scripted(connections: list[int]) -> asyncio.Server:
    """Answers each request by its path from _ANSWERS; counts the connections it accepted."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ")[1].decode()
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if path == "/slow":
                    await asyncio.sleep(5)
                writer.write(_ANSWERS[path])
                if path in ("/close", "/eof", "/garbage"):
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("path", "statuses", "reconnects"),
    [
        ("/length", {"200": 3}, False),
        ("/chunked", {"200": 3}, False),
        ("/error", {"422": 3}, False),
        ("/close", {"503": 3}, True),
        ("/eof", {"200": 3}, True),
        ("/garbage", {"ValueError": 3}, True),
    ],
)
def test_the_client_reads_every_framing_and_reconnects_when_it_must(
    path: str, statuses: dict[str, int], reconnects: bool
) -> None:
    async def scenario() -> tuple[PhaseResult, int]:
        connections: list[int] = []
        server = await _serve_scripted(connections)
        port = server.sockets[0].getsockname()[1]
        payload = Payload(path, b"abc", "text/plain")
        result = await run_phase(f"http://127.0.0.1:{port}", payload, requests=3, concurrency=1, progress=False)
        server.close()
        return result, len(connections)

    result, connections = asyncio.run(scenario())
    assert dict(result.statuses) == statuses
    assert connections == (3 if reconnects else 1)
    assert len(result.latencies_ms) == 3


def test_a_request_past_the_timeout_counts_as_an_error() -> None:
    async def scenario() -> PhaseResult:
        server = await _serve_scripted([])
        port = server.sockets[0].getsockname()[1]
        payload = Payload("/slow", b"abc", "text/plain")
        result = await run_phase(
            f"http://127.0.0.1:{port}", payload, requests=1, concurrency=1, timeout_s=0.2, progress=False
        )
        server.close()
        return result

    result = asyncio.run(scenario())
    assert dict(result.statuses) == {"TimeoutError": 1} and result.errors == 1


def test_a_refused_connection_is_reported_not_raised() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        result = asyncio.run(
            run_phase(f"http://127.0.0.1:{port}", Payload("/x", b"", "text/plain"), requests=2, concurrency=1,
                      progress=False)
        )
    assert dict(result.statuses) == {"ConnectionRefusedError": 2}
