"""Route dependencies, as Annotated aliases that tests can override with app.dependency_overrides.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker
thread, and four thread hops per request were a measurable share of the server's CPU.
The upload routes, the hot path, skip dependency injection (it cost them ~80 us a request)
and call the plain functions here directly: `serving_predictor` and `check_api_key`.
"""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from mnist_service.errors import ModelNotReady, Unauthorized
from mnist_service.inference.predictor import Predictor
from mnist_service.metrics import Metrics
from mnist_service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def serving_predictor(request: Request) -> Predictor:
    """The app's predictor, or a 503 while it loads or after it stopped."""
    predictor: Predictor | None = getattr(request.app.state, "predictor", None)
    if predictor is None or not predictor.ready:
        raise ModelNotReady()
    return predictor


async def get_predictor(request: Request) -> Predictor:
    return serving_predictor(request)


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_decode_pool(request: Request) -> ThreadPoolExecutor:
    return request.app.state.decode_pool


_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token (when API_KEY is set).")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key (when API_KEY is set).")


def _verify_api_key(settings: Settings, offered: tuple[str | None, ...]) -> None:
    """Enforce API_KEY when it is set; compare in constant time so timing leaks nothing."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if not any(hmac.compare_digest(k.encode(), expected) for k in offered if k):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    _verify_api_key(settings, (bearer.credentials if bearer else None, header_key))


def check_api_key(request: Request, settings: Settings) -> None:
    """require_api_key without dependency injection, reading the same two headers."""
    if settings.api_key is None:
        return
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    bearer = token if scheme.lower() == "bearer" else None
    _verify_api_key(settings, (bearer, request.headers.get(_api_key_header.model.name)))


# What the routes that call check_api_key declare in OpenAPI, as require_api_key would.
API_KEY_SECURITY = [{_bearer.scheme_name: []}, {_api_key_header.scheme_name: []}]


SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DecodePoolDep = Annotated[ThreadPoolExecutor, Depends(get_decode_pool)]
