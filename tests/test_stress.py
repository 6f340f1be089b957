"""The stress tester's arithmetic and payloads (the e2e test runs it against a real server)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from starlette.requests import Request

from mnist_service.stress import PhaseResult, build_payload


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
