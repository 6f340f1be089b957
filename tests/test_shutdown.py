"""Shutdown and startup of the real server process: what Kubernetes does to it on every rollout.

Each test starts `python model_inference.py` on a free port and sends it real signals. The drain
test runs the real stress tester against it while it drains.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mnist_service.process.server import worker_pids

from .conftest import ROOT, exit_code_within, running, start_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _predict_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mnist_requests_total{") and 'endpoint="/predict"' in line
    )


class _ReadinessProbe(threading.Thread):
    """Polls /readyz every ~10 ms, recording (sent, status), until the server stops answering.

    `answered` holds when each answer came back: under load an answer can lag its request.
    """

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, int]] = []
        self.answered: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    status = client.get(f"{self.url}/readyz").status_code
                    self.samples.append((sent, status))
                    self.answered.append(time.monotonic())
                except httpx.TransportError:
                    return
                self.stop.wait(max(0.0, 0.01 - (time.monotonic() - sent)))


def _batch_body(files: int = 64) -> tuple[bytes, str]:
    rng = np.random.default_rng(0)
    boundary = "drain-test-boundary"
    parts = []
    for i in range(files):
        image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
        png = io.BytesIO()
        image.save(png, format="PNG")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode() + png.getvalue() + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _slow_upload(url: str, body: bytes, content_type: str, until: float, out: dict) -> None:
    """POST /predict/batch, trickling the body so the request is in flight until `until` (monotonic)."""
    pieces = np.array_split(np.frombuffer(body, dtype=np.uint8), 40)

    def chunks() -> Iterator[bytes]:
        for piece in pieces:
            yield piece.tobytes()
            time.sleep(max(0.0, (until - time.monotonic()) / 20))

    try:
        response = httpx.post(
            f"{url}/predict/batch", content=chunks(), headers={"Content-Type": content_type}, timeout=30
        )
        out["status"], out["body"], out["done"] = response.status_code, response.json(), time.monotonic()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)


@pytest.mark.parametrize("hot_path", ["true", "false"], ids=["hot", "fastapi"])
def test_sigterm_drains_under_load_without_dropping_a_request(start_server, tmp_path: Path, hot_path: str) -> None:
    drain, timeout = 4.0, 5.0
    server = start_server(SHUTDOWN_DRAIN_SECONDS=str(drain), SHUTDOWN_TIMEOUT_SECONDS=str(timeout), HOT_PATH=hot_path)
    probe = _ReadinessProbe(server.url)
    probe.start()
    stress_json = tmp_path / "stress.json"
    # 2.5 s of load at concurrency 16; SIGTERM 0.5 s in, so the load runs on ~2 s into the 4 s drain
    # and stops before listeners close, as it would once Kubernetes took us out of the endpoints.
    stress = subprocess.Popen(
        [sys.executable, "stress_testing.py", "--url", server.url, "--concurrency", "16", "--duration", "2.5",
         "--sequential-requests", "0", "--json", str(stress_json), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while _predict_count(server.url) < 16:
        assert stress.poll() is None and time.monotonic() < deadline, "the stress tester never sent load"
        time.sleep(0.02)
    time.sleep(0.5)

    body, content_type = _batch_body()
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    drain_ends = signalled + drain

    # A 64-image batch whose upload is still running when the drain window ends and listeners close.
    upload: dict = {}
    time.sleep(max(0.0, drain_ends - 1.0 - time.monotonic()))
    uploader = threading.Thread(
        target=_slow_upload, args=(server.url, body, content_type, drain_ends + 1.0, upload), daemon=True
    )
    uploader.start()

    stress_output = stress.communicate(timeout=60)[0].decode()
    load_ended = time.monotonic()
    time.sleep(max(0.0, drain_ends + 0.5 - time.monotonic()))
    listener_closed = not _answers(server.port)
    uploader.join(timeout=30)
    code, waited = exit_code_within(server.proc, drain + timeout + 5)
    probe.stop.set()
    probe.join(timeout=5)
    log = server.stderr()

    # The load: no failed request, and it ended inside the drain window.
    assert stress.returncode == 0, stress_output
    concurrent = json.loads(stress_json.read_text())["concurrent"]
    assert concurrent["requests"] > 0 and concurrent["errors"] == 0, concurrent
    assert load_ended < drain_ends, f"the load ran {load_ended - drain_ends:.2f}s past the drain window"

    # Readiness: 200 before the signal; every probe sent 100 ms or more after it got 503.
    # Answered before the signal, rather than sent before it: under load an answer can lag.
    before = [status for (_, status), got in zip(probe.samples, probe.answered, strict=True) if got < signalled]
    after = [(sent - signalled, status) for sent, status in probe.samples if sent >= signalled + 0.1]
    assert before and set(before) == {200}, set(before)
    assert len(after) >= 10, f"too few readiness probes after the signal: {len(after)}"
    assert {status for _, status in after} == {503}, [a for a in after if a[1] != 503][:5]
    first_503 = min(sent - signalled for sent, status in probe.samples if status == 503)
    assert first_503 < 0.1, f"first 503 for a probe sent {first_503 * 1000:.0f} ms after SIGTERM"

    # Listeners closed at the end of the drain, yet the request in flight then was answered whole.
    assert listener_closed, "the port still accepted connections after the drain window"
    assert "error" not in upload, upload.get("error")
    assert upload["status"] == 200 and len(upload["body"]) == 64, upload
    assert upload["done"] > drain_ends, "the slow request finished before listeners closed: it proves nothing"

    assert code == 0, f"exit code {code}\n{log}"
    assert waited < drain + timeout + 5, waited
    assert "Traceback" not in log, log


def test_second_sigterm_exits_at_once(start_server) -> None:
    server = start_server(SHUTDOWN_DRAIN_SECONDS="60", SHUTDOWN_TIMEOUT_SECONDS="10")
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/readyz", timeout=2).status_code != 503:
        assert time.monotonic() < deadline, "/readyz never turned 503 after SIGTERM"
        time.sleep(0.01)
    assert server.proc.poll() is None, "the first SIGTERM must drain, not exit"
    server.proc.send_signal(signal.SIGTERM)
    code, waited = exit_code_within(server.proc, 10)  # the drain alone would take 60 s
    assert code is not None, "a second SIGTERM did not stop the server"
    assert waited < 10


def test_sigint_exits_promptly_and_cleanly(start_server) -> None:
    server = start_server(SHUTDOWN_DRAIN_SECONDS="60", SHUTDOWN_TIMEOUT_SECONDS="10")
    server.proc.send_signal(signal.SIGINT)  # Ctrl-C on a developer's terminal: no drain
    code, waited = exit_code_within(server.proc, 10)
    assert waited < 10
    assert code == 0, f"exit code {code}\n{server.stderr()}"
    assert "Traceback" not in server.stderr()


def _missing(pt: Path) -> None:
    pt.unlink()


def _truncated(pt: Path) -> None:
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])


def _tampered(pt: Path) -> None:
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "named"),
    [(_missing, "not found"), (_truncated, "truncated, tampered"), (_tampered, "truncated, tampered")],
    ids=["missing", "truncated", "tampered"],
)
def test_a_bad_model_file_stops_startup_with_one_clear_line(
    model_dir: Path, tmp_path: Path, damage, named: str
) -> None:
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("mnist_cnn.pt", "mnist_cnn.json"):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    damage(copy / "mnist_cnn.pt")
    server = start_process(copy / "mnist_cnn.pt", tmp_path)
    served = False
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        served = served or _answers(server.port)
        time.sleep(0.02)
    code, _ = exit_code_within(server.proc, 1)
    log = server.stderr()
    errors = [line for line in log.splitlines() if " ERROR " in line]

    assert code not in (None, 0), f"exit code {code}\n{log}"
    assert not served, "the port answered although the model is bad"
    assert len(errors) == 1, log
    assert named in errors[0] and "mnist_cnn.pt" in errors[0], errors[0]
    assert "Traceback" not in log, log


def test_workers_exit_when_the_supervisor_is_killed(start_server) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: they must notice on their own."""
    server = start_server()
    workers = worker_pids(server.proc.pid)
    assert len(workers) == 2 and all(running(p) for p in workers), workers
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 20
    while any(running(p) for p in workers):
        assert time.monotonic() < deadline, "a worker outlived its supervisor by 20 s"
        time.sleep(0.1)
