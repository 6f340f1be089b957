"""Route dependencies, as Annotated aliases that tests can override with app.dependency_overrides.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker
thread, and four thread hops per request were a measurable share of the server's CPU.
The upload routes skip dependency injection (a measurable share of their CPU: docs/performance.md)
and call the plain functions here directly: `resolve_target` and `check_api_key`.
"""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import SecretStr

from mnist_service.errors import ModelNotReady, Unauthorized
from mnist_service.metrics import Metrics
from mnist_service.registry.registry import Registry, Version
from mnist_service.serving.dataplane import DataPlane, RequestInfo, Target
from mnist_service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


VERSION_DOC = (
    "The model version to answer with: a number, `stable` or `canary`; leave it out for the default "
    "(stable). 404 lists what is loaded."
)


def get_registry(request: Request) -> Registry:
    """The app's registry of model versions, or a 503 while the app starts."""
    return get_dataplane(request).registry


def get_dataplane(request: Request) -> DataPlane:
    """The app's data plane, or a 503 while the app starts (the lifespan builds it with the registry)."""
    dataplane: DataPlane | None = getattr(request.app.state, "dataplane", None)
    if dataplane is None:
        raise ModelNotReady()
    return dataplane


def request_info(request: Request) -> RequestInfo:
    """The request's id and route, for the data plane's per-request records."""
    route = request.scope.get("route")
    return RequestInfo(getattr(request.state, "request_id", ""), getattr(route, "path", request.url.path))


def record_version(request: Request, version: Version) -> None:
    """Note the version that answers, for the X-Model-Version header and the metrics."""
    request.state.model_version = version.name


def resolve_target(request: Request, requested: str | None) -> Target:
    """The data plane's target for a request that named `requested`, recorded for the answer."""
    target = get_dataplane(request).target(requested)
    record_version(request, target.version)
    return target


async def get_target(
    request: Request, version: Annotated[str | None, Query(description=VERSION_DOC, max_length=64)] = None
) -> Target:
    return resolve_target(request, version)


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_decode_pool(request: Request) -> ThreadPoolExecutor:
    return request.app.state.decode_pool


_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token (when API_KEY is set).")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key (when API_KEY is set).")


def verify_key(expected: SecretStr, offered: tuple[str | None, ...], name: str = "API key") -> None:
    """401 unless one of the offered keys is `expected`; compared in constant time so timing leaks nothing."""
    secret = expected.get_secret_value().encode()
    if not any(hmac.compare_digest(k.encode(), secret) for k in offered if k):
        raise Unauthorized(
            f"missing or wrong {name}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def offered_keys(request: Request) -> tuple[str | None, str | None]:
    """The keys a request offers: a bearer token and an X-API-Key header."""
    return keys_from(request.headers.get("authorization"), request.headers.get(_api_key_header.model.name))


def keys_from(authorization: str | None, api_key: str | None) -> tuple[str | None, str | None]:
    """(bearer token, X-API-Key) from those two headers' values: what a request offers as its key."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" else None, api_key


def _verify_api_key(settings: Settings, offered: tuple[str | None, ...]) -> None:
    """Enforce API_KEY when it is set."""
    if settings.api_key is not None:
        verify_key(settings.api_key, offered)


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
    _verify_api_key(settings, offered_keys(request))


# What the routes that call check_api_key declare in OpenAPI, as require_api_key would.
API_KEY_SECURITY = [{_bearer.scheme_name: []}, {_api_key_header.scheme_name: []}]


SettingsDep = Annotated[Settings, Depends(get_settings)]
TargetDep = Annotated[Target, Depends(get_target)]
DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
DecodePoolDep = Annotated[ThreadPoolExecutor, Depends(get_decode_pool)]
