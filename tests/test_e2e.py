"""End to end with real processes: train, serve with uvicorn, call with client.py and stress_testing.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import DATA_DIR, ROOT, free_port, wait_ready

pytestmark = pytest.mark.e2e


def _run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e-model")
    result = _run("model_train.py", "--data-dir", DATA_DIR, "--output", out, "--epochs", "1", "--max-train", "2000")
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stdout and "test_accuracy=" in result.stdout
    return out / "mnist_cnn.pt"


@pytest.fixture(scope="module")
def server(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("e2e-log") / "server.log").open("w")
    env = {**os.environ, "SHUTDOWN_DRAIN_SECONDS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "model_inference.py", "--model", str(trained), "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, Path(log.name))
    except AssertionError:
        proc.kill()
        raise
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    log.close()


def test_client_script_classifies_a_user_image(server: str, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    made = _run("utils.py", "digit", "--index", "0", "--out", image)
    assert made.returncode == 0 and "label 7" in made.stdout
    result = _run("client.py", image, "--url", server)
    assert result.returncode == 0, result.stderr
    assert f"{image}: 7 (confidence" in result.stdout
    as_json = json.loads(_run("client.py", image, "--url", server, "--json").stdout)
    assert as_json["prediction"] == 7 and len(as_json["probabilities"]) == 10


def test_client_script_reports_errors_and_fails(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    result = _run("client.py", bad, "--url", server)
    assert result.returncode == 1
    assert "HTTP 422" in result.stderr and "not an image" in result.stderr


def test_noise_and_pixels_from_utils_are_served(server: str, tmp_path: Path) -> None:
    noise, pixels = tmp_path / "noise.png", tmp_path / "pixels.json"
    assert _run("utils.py", "noise", "--out", noise).returncode == 0
    assert _run("utils.py", "pixels", "--index", "1", "--out", pixels).returncode == 0
    assert _run("client.py", noise, "--url", server).returncode == 0
    answer = httpx.post(
        f"{server}/predict/pixels", content=pixels.read_bytes(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 200 and 0 <= answer.json()["prediction"] <= 9


def test_stress_tester_reports_both_phases(server: str, tmp_path: Path) -> None:
    out = tmp_path / "stress.json"
    result = _run(
        "stress_testing.py", "--url", server, "--requests", "300", "--concurrency", "8",
        "--sequential-requests", "50", "--json", out, "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"sequential", "concurrent"}
    assert report["sequential"]["requests"] == 50 and report["concurrent"]["requests"] == 300
    for phase in report.values():
        assert set(phase) == {"requests", "errors", "throughput_rps", "latency_ms"}
        assert phase["errors"] == 0 and phase["throughput_rps"] > 0
        lat = phase["latency_ms"]
        assert set(lat) == {"mean", "p50", "p90", "p95", "p99", "max"}
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert "sequential: 50 requests" in result.stdout and "concurrent: 300 requests" in result.stdout


def test_stress_tester_fails_on_errors(server: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"junk")
    result = _run(
        "stress_testing.py", "--url", server, "--image", junk, "--requests", "20", "--concurrency", "4",
        "--sequential-requests", "0", "--no-progress",
    )
    assert result.returncode == 1
    assert "422: 20" in result.stdout and "exceeds --max-error-rate" in result.stderr


def _pixels_200s(url: str) -> float:
    line = 'mnist_requests_total{endpoint="/predict/pixels",method="POST",status="200",version="1"}'
    for row in httpx.get(f"{url}/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    return 0.0


def test_metrics_add_up_across_worker_processes(server: str) -> None:
    """The server runs two workers by default; every scrape must count both workers' requests."""
    before = _pixels_200s(server)
    for _ in range(60):
        # A new connection each time, so the kernel spreads the requests over the workers.
        response = httpx.post(f"{server}/predict/pixels", json={"pixels": [0] * 784}, headers={"Connection": "close"})
        assert response.status_code == 200
    scrapes = {_pixels_200s(server) - before for _ in range(6)}
    assert scrapes == {60.0}, scrapes
