"""The importable client, against the real app in-process and a mock transport for errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mnist_service.tools.client import MnistClient, ServerNotReady, ServiceClientError, wait_until_ready
from mnist_service.tools.images import png_bytes, user_digit

from .conftest import free_port


def _app_transport(client: TestClient) -> httpx.BaseTransport:
    """TestClient is an httpx.Client over the ASGI app; borrow its transport."""
    return client._transport


def test_client_predicts_through_the_app(
    client: TestClient, test_digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = test_digits
    path = tmp_path / "d.png"
    path.write_bytes(png_bytes(user_digit(images[0])))
    with MnistClient("http://testserver", transport=_app_transport(client)) as mc:
        assert mc.ready()
        assert mc.predict(path)["prediction"] == labels[0]
        assert mc.predict(path.read_bytes(), debug=True)["image_png_base64"]
        batch = mc.predict_batch([path, path.read_bytes()])
        assert [b["prediction"] for b in batch] == [labels[0]] * 2
        assert mc.predict_pixels(images[1].tolist())["prediction"] in range(10)
        assert mc.model_info()["version"] == client.app.state.registry.default.predictor.sha256


def test_client_raises_with_the_servers_detail() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"detail": "the image is blank", "request_id": "r1"})

    with MnistClient(transport=httpx.MockTransport(handler)) as mc, pytest.raises(ServiceClientError) as info:
        mc.predict(b"x")
    assert info.value.status_code == 422 and info.value.detail == "the image is blank"


def test_client_sends_the_api_key() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("authorization")
        return httpx.Response(200, json={"prediction": 1})

    with MnistClient(api_key="k", transport=httpx.MockTransport(handler)) as mc:
        mc.predict(b"x")
    assert seen["auth"] == "Bearer k"


def test_ready_is_false_when_the_server_is_down() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with MnistClient(transport=httpx.MockTransport(handler)) as mc:
        assert mc.ready() is False


def test_wait_until_ready_gives_up_on_a_dead_process_or_a_silent_port() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ServerNotReady, match="exited before it was ready"):
        wait_until_ready(url, lambda: False, timeout=5)
    with pytest.raises(ServerNotReady, match=r"not ready after 0\.3s"):
        wait_until_ready(url, lambda: True, timeout=0.3)
