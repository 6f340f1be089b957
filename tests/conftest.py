"""Shared fixtures: a quickly trained model (session-wide) and app clients built by the factory."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mnist_service.api import create_app
from mnist_service.client import ServerNotReady, wait_until_ready
from mnist_service.data import load_split
from mnist_service.settings import Settings
from mnist_service.train import TrainParams, run

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "mnist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    """Poll /readyz of a server process until 200; fail with its log if it dies or never gets there."""
    try:
        wait_until_ready(url, lambda: proc.poll() is None, timeout)
    except ServerNotReady as exc:
        raise AssertionError(f"{exc}:\n{log.read_text()}") from None


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained for a few seconds: ~95% accurate, enough to tell digits apart."""
    out = tmp_path_factory.mktemp("model")
    run(TrainParams(data_dir=DATA_DIR, output=out, epochs=2, max_train=3000, seed=1))
    return out


@pytest.fixture(scope="session")
def model_path(model_dir: Path) -> Path:
    return model_dir / "mnist_cnn.pt"


@pytest.fixture(scope="session")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The official test set: (images uint8 N x 28 x 28, labels)."""
    split = load_split(DATA_DIR, "test")
    return split.images, split.labels


@pytest.fixture
def settings(model_path: Path) -> Settings:
    return Settings(model_path=model_path, max_batch_delay_ms=1.0, request_timeout_s=10.0)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of a fully started app (lifespan run: model loaded, verified and warmed)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
