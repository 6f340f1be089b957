"""A small HTTP client for the service, importable by code and used by client.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:8000"


class ServiceClientError(RuntimeError):
    """The server answered with an error; carries its status and `detail`."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class MnistClient:
    """Calls /predict and friends with timeouts; raises ServiceClientError on 4xx/5xx."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 10.0,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=headers, transport=transport)

    def __enter__(self) -> MnistClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def predict(self, image: bytes | str | Path, *, debug: bool = False) -> dict[str, Any]:
        """Classify one image, given as bytes or a file path."""
        files = {"file": (_name(image, "image"), _read(image))}
        return self._check(self._http.post("/predict", files=files, params={"debug": int(debug)}))

    def predict_batch(self, images: Sequence[bytes | str | Path]) -> list[dict[str, Any]]:
        files = [("files", (_name(i, f"image{n}"), _read(i))) for n, i in enumerate(images)]
        return self._check(self._http.post("/predict/batch", files=files))

    def predict_pixels(self, pixels: Sequence[int] | Sequence[Sequence[int]]) -> dict[str, Any]:
        return self._check(self._http.post("/predict/pixels", json={"pixels": list(pixels)}))

    def model_info(self) -> dict[str, Any]:
        return self._check(self._http.get("/model"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        if response.is_success:
            return response.json()
        try:
            detail = str(response.json().get("detail", response.text))
        except ValueError:
            detail = response.text
        raise ServiceClientError(response.status_code, detail)


class ServerNotReady(RuntimeError):
    """The server's process died, or /readyz never answered 200 in time."""


def wait_until_ready(url: str, alive: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
    """Poll /readyz until it answers 200; raise ServerNotReady if `alive()` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    with MnistClient(url, timeout=1) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise ServerNotReady("the server process exited before it was ready")
            if client.ready():
                return
            time.sleep(interval)
    raise ServerNotReady(f"the server was not ready after {timeout:g}s")


def _read(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _name(image: bytes | str | Path, fallback: str) -> str:
    return fallback if isinstance(image, bytes) else Path(image).name
