"""The upload routes' direct path answers exactly as FastAPI's own routing would, and is really taken."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from mnist_service.serving.api import create_app
from mnist_service.serving.direct import ServiceApp
from mnist_service.serving.routes import predict
from mnist_service.settings import Settings
from mnist_service.tools.images import noise_image, png_bytes, user_digit
from mnist_service.tools.images import test_digit as mnist_digit
from tests.conftest import metric_samples, same_answer

PNG = png_bytes(user_digit(mnist_digit(0)[0]))
SMALL_PNG = png_bytes(noise_image(28))

# (method, path, request keyword arguments) of good and bad requests to the three direct routes.
# (path, request keyword arguments, the status it gets with the right API key): good and bad
# requests to the three direct routes.
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("/predict", {"files": {"file": ("d.png", PNG, "image/png")}}, 200),
    ("/predict?debug=true", {"files": {"file": ("d.png", PNG, "image/png")}}, 200),
    ("/predict?debug=maybe", {"files": {"file": ("d.png", PNG, "image/png")}}, 422),
    ("/predict?version=1", {"content": PNG, "headers": {"content-type": "image/png"}}, 200),
    ("/predict?version=7", {"content": PNG, "headers": {"content-type": "image/png"}}, 404),
    ("/predict", {"content": b"not an image", "headers": {"content-type": "image/png"}}, 422),
    ("/predict", {"content": b"{}", "headers": {"content-type": "application/json"}}, 415),
    ("/predict", {"files": {"image": ("d.png", PNG, "image/png")}}, 400),
    ("/predict", {"files": {"file": ("d.png", b"", "image/png")}}, 422),
    ("/predict", {"content": b"x" * 64, "headers": {"content-type": "image/png", "content-length": "999999999"}}, 413),
    ("/predict", {"files": [("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]}, 400),
    (
        "/predict/batch",
        {"files": [("files", ("a.png", PNG, "image/png")), ("files", ("b.png", SMALL_PNG, "image/png"))]},
        200,
    ),
    (
        "/predict/batch",
        {"files": [("files", ("a.png", PNG, "image/png")), ("files", ("b.txt", b"text", "text/plain"))]},
        422,
    ),
    ("/predict/compare", {"files": {"file": ("d.png", PNG, "image/png")}}, 200),
    ("/predict/compare", {"content": b"", "headers": {"content-type": "image/png"}}, 422),
]


class Both:
    """The app as served, or (with the header `x-via: router`) reached the way FastAPI itself dispatches,
    router and all: one app on one event loop, so both ways share the loaded model."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"x-via", b"router") in scope["headers"]:
            await FastAPI.__call__(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)


class ViaRouter:
    """A TestClient's post(), with the header that sends it FastAPI's way."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.client.post(path, **{**kwargs, "headers": {**kwargs.get("headers", {}), "x-via": "router"}})


@pytest.fixture
def keyed_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_key": SecretStr("s3cret")})


@pytest.fixture
def both(keyed_settings: Settings) -> Iterator[tuple[FastAPI, TestClient, ViaRouter]]:
    app = create_app(keyed_settings)
    with TestClient(Both(app)) as direct:
        yield app, direct, ViaRouter(direct)


def _answer(response: Any) -> tuple[int, Any, str, str | None, str | None]:
    body = response.json()
    if isinstance(body, dict):
        body.pop("request_id", None)
    return (
        response.status_code, body, response.headers["content-type"], response.headers.get("x-model-version"),
        response.headers.get("connection"),
    )


@pytest.mark.parametrize(("path", "kwargs", "status"), CASES, ids=[f"{p} #{i}" for i, (p, *_) in enumerate(CASES)])
def test_direct_path_answers_like_the_router(
    both: tuple[FastAPI, TestClient, ViaRouter], path: str, kwargs: dict[str, Any], status: int
) -> None:
    _, direct, via_router = both
    for key_headers, expected in (({"x-api-key": "s3cret"}, status), ({}, 401), ({"authorization": "Bearer no"}, 401)):
        request = {**kwargs, "headers": {**kwargs.get("headers", {}), **key_headers}}
        a, b = direct.post(path, **request), via_router.post(path, **request)
        # An oversized declared body is refused before the key is looked at, on either path.
        assert a.status_code == (413 if status == 413 else expected), (path, key_headers, a.text)
        assert same_answer(_answer(a), _answer(b)), (path, key_headers, _answer(a), _answer(b))
        assert a.headers["x-request-id"] and a.headers["x-request-id"] != b.headers["x-request-id"]


def test_direct_path_counts_requests_under_the_route(both: tuple[FastAPI, TestClient, ViaRouter]) -> None:
    app, direct, via_router = both
    headers = {"x-api-key": "s3cret", "content-type": "image/png"}
    for client in (direct, via_router):
        assert client.post("/predict", content=PNG, headers=headers).status_code == 200
        assert client.post("/predict", content=b"bad", headers=headers).status_code == 422
    samples = metric_samples(app, "mnist_requests_total")
    counted = {dict(k)["status"]: v for k, v in samples.items() if dict(k)["endpoint"] == "/predict" and v}
    assert counted == {"200": 2.0, "422": 2.0}


def test_only_the_upload_posts_skip_the_router(both: tuple[FastAPI, TestClient, ViaRouter]) -> None:
    app, direct, _ = both
    headers = {"x-api-key": "s3cret", "content-type": "image/png"}

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError(f"{scope['method']} {scope['path']} went through FastAPI's stack")

    stack, app.middleware_stack = app.middleware_stack, refuse
    try:
        for path in ("/predict", "/predict/batch", "/predict/compare"):
            content = PNG if path != "/predict/batch" else None
            files = [("files", ("a.png", PNG, "image/png"))] if content is None else None
            sent = {"headers": {"x-api-key": "s3cret"}, "files": files} if files else {"headers": headers}
            assert direct.post(path, content=content, **sent).status_code == 200
        with pytest.raises(AssertionError, match="GET /predict went through"):
            direct.get("/predict", headers=headers)
        with pytest.raises(AssertionError, match="POST /predict/ went through"):
            direct.post("/predict/", content=PNG, headers=headers)
    finally:
        app.middleware_stack = stack


def test_only_plain_request_endpoints_can_be_served_directly() -> None:
    router = APIRouter()

    @router.post("/plain")
    async def plain(request: Request) -> Response:
        return Response(b"ok")

    @router.post("/typed")
    async def typed(request: Request, n: int = 1) -> Response:
        return Response(b"ok")

    @router.post("/sync")
    def sync(request: Request) -> Response:
        return Response(b"ok")

    app = ServiceApp()
    app.include_router(router)
    app.serve_directly(router, "/plain")
    for path, problem in (("/typed", "taking just the Request"), ("/sync", "taking just the Request"),
                          ("/absent", "no POST route")):
        with pytest.raises(ValueError, match=problem):
            app.serve_directly(router, path)
    assert asyncio.iscoroutinefunction(app.__call__)
    # The service's own routes qualify; the pixels route (a typed body) does not.
    with pytest.raises(ValueError, match="taking just the Request"):
        ServiceApp().serve_directly(predict.router, "/predict/pixels")
