"""Security checks: a clean bandit scan of the package, and the API key's reach and comparison."""

from __future__ import annotations

import hmac
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mnist_service.serving.api import create_app
from mnist_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KEY = "s3cret-key"
PIXELS = {"pixels": [0] * 784}
V2_BODY = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}


def test_bandit_finds_nothing_unexplained_in_the_package() -> None:
    # Intended findings are silenced inline with `# nosec BXXX - reason`, so any result is new.
    run = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", "mnist_service", "-f", "json", "-q"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    report = json.loads(run.stdout)
    findings = [f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"]]
    assert findings == [], "\n".join(findings)
    assert not report["errors"], report["errors"]
    assert report["metrics"]["_totals"]["loc"] > 1000  # it really scanned the package


@pytest.fixture(scope="module")
def keyed(model_path: Path) -> TestClient:
    with TestClient(create_app(Settings(model_path=model_path, api_key=KEY))) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v2/models/mnist/infer", V2_BODY),
        ("POST", "/v2/models/mnist/versions/{version}/infer", V2_BODY),
        ("GET", "/v2/models/mnist", None),
        ("POST", "/predict/pixels", PIXELS),
    ],
)
def test_the_api_key_guards_inference(keyed: TestClient, method: str, path: str, body: dict | None) -> None:
    path = path.format(version=keyed.get("/readyz").json()["model_version"])
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1] + "X"}, {"Authorization": "Bearer nope"}):
        assert keyed.request(method, path, json=body, headers=headers).status_code == 401, headers
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert keyed.request(method, path, json=body, headers=headers).status_code == 200, headers


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/healthz", "/readyz", "/metrics", "/"])
def test_probes_metrics_and_page_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_keys_are_compared_in_constant_time(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # A review check, not a timing test: the comparison that decides must be hmac.compare_digest.
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr("mnist_service.serving.deps.hmac.compare_digest", spy)
    assert keyed.post("/predict/pixels", json=PIXELS, headers={"X-API-Key": "guess"}).status_code == 401
    assert keyed.post("/predict/pixels", json=PIXELS, headers={"X-API-Key": KEY}).status_code == 200
    assert calls == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]
