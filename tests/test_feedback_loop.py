"""The ground-truth loop, end to end, with real processes: a two-worker server captures its answers on
digits its model gets wrong more often (the test set's second half, slanted by 40 degrees: a users'
style), users label them through /feedback, `model_train.py --feedback` trains a short run on them,
the result is published as the canary, beats the stable version on held-out slanted digits, the
shadow agreement and live-accuracy series exist in a real Prometheus, and it is promoted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mnist_service.capture.dataset import read_labelled
from mnist_service.capture.store import CaptureStore
from mnist_service.inference.images import png_bytes
from mnist_service.registry.repository import METADATA_FILE, ModelConfig, Repository

from .conftest import ROOT, STARTUP_TIMEOUT_S, Server, add_version, start_process, wait_ready
from .test_monitoring import _eventually, _ready, _start_prometheus

SLANT_DEG = 40


def _slanted(images: np.ndarray) -> list[bytes]:
    """Test digits rotated by SLANT_DEG, as 28x28 PNG uploads."""
    return [png_bytes(Image.fromarray(image).rotate(SLANT_DEG, resample=Image.Resampling.BILINEAR))
            for image in images]


def _accuracy(http: httpx.Client, uploads: list[bytes], labels: np.ndarray, version: str) -> float:
    right = 0
    for upload, label in zip(uploads, labels, strict=True):
        response = http.post("/predict", params={"version": version}, files={"file": ("d.png", upload, "image/png")})
        assert response.status_code == 200, response.text
        right += response.json()["prediction"] == label
    return right / len(labels)


def _cli(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def loop_server(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Server, Repository, Path]]:
    repo = Repository(tmp_path / "models", "mnist")
    add_version(repo, 1, model_dir)
    repo.write_config(ModelConfig(labels={"stable": 1}))
    database = tmp_path / "captures.sqlite3"
    server = start_process(
        model_dir / "mnist_cnn.pt", tmp_path, MODEL_REPOSITORY=str(repo.root), WORKERS="2", CAPTURE_SAMPLE="1",
        CAPTURE_DATABASE=str(database), REPOSITORY_POLL_S="0.5", SHADOW_SAMPLE="1",
    )
    try:
        wait_ready(server.url, server.proc, server.log, STARTUP_TIMEOUT_S)
        yield server, repo, database
    finally:
        server.proc.kill()
        server.proc.wait()


@pytest.mark.e2e
@pytest.mark.slow
def test_labelled_captures_train_a_version_that_beats_stable_on_them(
    loop_server: tuple[Server, Repository, Path], test_digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    server, repo, database = loop_server
    images, labels = test_digits
    users, users_labels = _slanted(images[5000:5400]), labels[5000:5400]
    unseen, unseen_labels = _slanted(images[5400:5700]), labels[5400:5700]  # never sent as feedback
    prometheus, prometheus_url, prometheus_log = _start_prometheus(tmp_path, f"127.0.0.1:{server.port}")
    try:
        _eventually(lambda: _ready(f"{prometheus_url}/-/ready"), "prometheus ready")
        with httpx.Client(base_url=server.url, timeout=60) as http:
            # Users send slanted digits and say what each one was.
            for upload, label in zip(users, users_labels, strict=True):
                answer = http.post("/predict", files={"file": ("d.png", upload, "image/png")})
                assert answer.status_code == 200, answer.text
                receipt = http.post("/feedback", json={"request_id": answer.headers["x-request-id"],
                                                       "label": int(label)})
                assert receipt.status_code == 200, receipt.text
            stable_on_users = read_labelled(str(database))
            assert len(stable_on_users) == len(users)

            # A short run with the labelled captures, published as version 2 (stable stays 1), then the canary.
            out = _cli("model_train.py", "--repository", str(repo.root), "--feedback", str(database),
                       "--epochs", "2", "--max-train", "3000", "--seed", "1", "--drift-images", "2000",
                       "--feedback-repeat", "5", "--feedback-holdout", "0.25")
            assert "feedback_accuracy=" in out and "stable stays 1" in out, out
            metadata = json.loads((repo.folder / "2" / METADATA_FILE).read_text())
            feedback = metadata["feedback"]
            assert feedback["train"]["rows"] + feedback["held_out"]["rows"] == len(users)
            assert feedback["holdout_fraction"] == 0.25  # --feedback-holdout, recorded in the lineage
            assert 0.15 < feedback["held_out"]["rows"] / len(users) < 0.35
            assert feedback["train"]["first_captured_at"] <= feedback["train"]["last_captured_at"]
            assert "sha256" in feedback["train"] and metadata["feedback_accuracy"] is not None
            # The same rows give the same hash (data lineage).
            train, held = read_labelled(str(database)).split(0.25)
            assert train.sha256() == feedback["train"]["sha256"] and held.sha256() == feedback["held_out"]["sha256"]

            _cli("model_repository.py", "--repository", str(repo.root), "canary", "2")
            _eventually(lambda: http.post("/predict", params={"version": "2"},
                                          files={"file": ("d.png", users[0], "image/png")}).status_code == 200,
                        "version 2 loaded")
            stable, canary = (_accuracy(http, unseen, unseen_labels, v) for v in ("1", "2"))
            print(f"held-out slanted digits: stable (v1) {stable:.3f}, canary (v2) {canary:.3f}; "
                  f"v2 feedback_accuracy {metadata['feedback_accuracy']}, test_accuracy {metadata['test_accuracy']}")
            assert canary > stable + 0.1, (stable, canary)

            # Unpinned requests are shadowed by the canary; Prometheus has the agreement and live accuracy.
            for upload in unseen[:50]:
                assert http.post("/predict", files={"file": ("d.png", upload, "image/png")}).status_code == 200

            def query(expr: str) -> list:
                answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=30).json()
                return answer["data"]["result"]

            _eventually(lambda: query('sum(mnist_shadow_comparisons_total{canary="2",outcome=~"agree|disagree"}) > 0'),
                        "shadow comparisons of the canary in Prometheus")
            (live,) = _eventually(lambda: query('version:mnist_feedback_accuracy:ratio1h{version="1"}'),
                                  "live accuracy of version 1 in Prometheus")
            right = sum(c.prediction == c.label for c in CaptureStore(str(database)).labelled())
            assert float(live["value"][1]) == pytest.approx(right / len(users), abs=0.05)

            _cli("model_repository.py", "--repository", str(repo.root), "promote", "2")
            _eventually(lambda: http.post("/predict", files={"file": ("d.png", users[0], "image/png")}
                                          ).headers.get("x-model-version") == "2", "version 2 answering by default")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        assert prometheus.returncode is not None, prometheus_log.read_text()
