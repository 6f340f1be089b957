"""LOG_FORMAT=json: one JSON object per line, with the request id and the W3C trace context."""

from __future__ import annotations

import base64
import io
import json
import logging

import httpx
import pytest
from PIL import Image

from mnist_service.logconfig import JsonFormatter, trace_context

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}),
        (TRACEPARENT.upper(), {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}),
        (None, {}),
        ("", {}),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", {}),  # all-zero trace id: invalid
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", {}),  # all-zero span id: invalid
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", {}),  # no flags
        ("garbage\n{\"injected\": 1}", {}),
    ],
)
def test_trace_context_reads_only_valid_traceparent_headers(header: str | None, expected: dict) -> None:
    assert trace_context(header) == expected


def test_json_formatter_writes_one_object_with_extras_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=True)
        import sys

        record.exc_info = sys.exc_info()
    record.status = 500
    line = JsonFormatter().format(record)
    assert "\n" not in line.split('"exception"')[0]
    entry = json.loads(line)
    assert entry["message"] == "failed here" and entry["level"] == "error" and entry["logger"] == "x.y"
    assert entry["status"] == 500 and "ValueError: boom" in entry["exception"]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("hot_path", ["true", "false"], ids=["hot", "fastapi"])
def test_json_logs_of_the_real_server_carry_request_and_trace_ids_and_never_image_bytes(
    start_server, hot_path: str
) -> None:
    server = start_server(LOG_FORMAT="json", ACCESS_LOG="all", HOT_PATH=hot_path)
    image = Image.new("L", (28, 28), 0)
    image.paste(255, (12, 6, 16, 22))
    png = io.BytesIO()
    image.save(png, format="PNG")
    headers = {"traceparent": TRACEPARENT, "X-Request-ID": "req-42"}
    ok = httpx.post(f"{server.url}/predict", files={"file": ("d.png", png.getvalue(), "image/png")}, headers=headers)
    bad = httpx.post(f"{server.url}/predict", files={"file": ("d.png", b"not an image", "image/png")})
    assert ok.status_code == 200 and bad.status_code == 422
    server.proc.terminate()
    server.proc.wait(timeout=30)
    log = server.stderr()
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    assert {"time", "level", "pid", "logger", "message"} <= set(entries[0])
    access = [e for e in entries if e["logger"] == "mnist_service.access" and e["path"] == "/predict"]
    traced = next(e for e in access if e["status"] == 200)
    assert traced["request_id"] == "req-42" and traced["trace_id"] == TRACEPARENT.split("-")[1]
    assert traced["span_id"] == TRACEPARENT.split("-")[2] and traced["method"] == "POST"
    assert traced["version"] == "1" and traced["duration_ms"] > 0
    untraced = next(e for e in access if e["status"] == 422)
    assert "trace_id" not in untraced and len(untraced["request_id"]) == 32
    for needle in ("PNG", base64.b64encode(png.getvalue())[:24].decode(), "not an image"):
        assert needle not in log, needle
