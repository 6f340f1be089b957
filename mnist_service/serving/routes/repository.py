"""The Open Inference Protocol's model repository extension: index, load, unload (Triton's API).

Off unless ADMIN_API_KEY is set, and then only with that key (a separate key from API_KEY: who
may classify digits is not who may take the model away). The server loads models only from its
own repository: a load request never carries a model file, a config or a path.

- index: every version this worker holds, plus those on disk the policy leaves out, with state.
- load: read the repository now and load what it selects (and undo an unload), answering once
  this worker has a ready default; the other workers follow within REPOSITORY_POLL_S.
- unload: every version of the model stops taking requests, finishes its queue and is freed, in
  every worker of this server, until the next load.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from mnist_service.errors import BadRequest, Forbidden, NotFound
from mnist_service.registry.registry import State
from mnist_service.serving.deps import DataPlaneDep, RegistryDep, SettingsDep, offered_keys, verify_key
from mnist_service.serving.routes.v2 import ProtocolRoute
from mnist_service.serving.schemas import error_responses
from mnist_service.serving.v2_schemas import RepositoryIndexEntry, V2Error

router = APIRouter(tags=["v2 model repository"], route_class=ProtocolRoute)

_ERRORS = error_responses(
    V2Error,
    {
        400: "A malformed request, one that carries model files or a config, or a load that failed.",
        401: "Missing or wrong admin key.",
        403: "The repository API is off: ADMIN_API_KEY is not set.",
        404: "Unknown model name.",
    },
)


async def require_admin_key(request: Request, settings: SettingsDep) -> None:
    """The admin key, as a bearer token or X-API-Key; 403 while the API is off."""
    if settings.admin_api_key is None:
        raise Forbidden("the model repository API is off: start the server with ADMIN_API_KEY set to use it")
    verify_key(settings.admin_api_key, offered_keys(request), "admin key (ADMIN_API_KEY)")


def _known(model_name: Annotated[str, Path(description="The served model's name (MODEL_NAME).")],
           settings: SettingsDep) -> None:
    if model_name != settings.model_name:
        raise NotFound(f"unknown model '{model_name[:64]}': this server serves '{settings.model_name}'")


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the request body must be JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


@router.post(
    "/v2/repository/index",
    summary="v2 repository index",
    dependencies=[Depends(require_admin_key)],
    responses=_ERRORS,
)
async def repository_index(request: Request, registry: RegistryDep) -> list[RepositoryIndexEntry]:
    """Every version: held ones with their state, the others on disk as UNAVAILABLE with the reason."""
    ready_only = bool((await _json_body(request)).get("ready", False))
    entries = registry.index()
    return [RepositoryIndexEntry(**e) for e in entries if not ready_only or e["state"] == State.READY.value]


@router.post(
    "/v2/repository/models/{model_name}/load",
    summary="v2 load a model",
    dependencies=[Depends(require_admin_key), Depends(_known)],
    responses=_ERRORS,
)
async def load_model(request: Request, dataplane: DataPlaneDep) -> dict:
    """Load what the repository selects now (undoing an unload); 400 with the reasons if nothing can serve."""
    await dataplane.load((await _json_body(request)).get("parameters") or {})
    return {}


@router.post(
    "/v2/repository/models/{model_name}/unload",
    summary="v2 unload a model",
    dependencies=[Depends(require_admin_key), Depends(_known)],
    responses=_ERRORS,
)
async def unload_model(request: Request, dataplane: DataPlaneDep) -> dict:
    """Stop serving every version of the model, in every worker of this server, until the next load."""
    await _json_body(request)  # unload_dependents is accepted and has nothing to act on
    await dataplane.unload()
    return {}
