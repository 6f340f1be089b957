"""The data plane: the one path from decoded digits to probabilities that every front door calls.

Each front door (the upload and pixel routes, v2 over REST, the HTTP hot path in protocol.py, the
gRPC servicer) decodes its request into digits (n, 28, 28), asks `target()` which version answers,
calls `submit()` or `infer()`, and encodes the probabilities, as KServe's and MLServer's endpoints
call their DataPlane. Version resolution, the shadow rule, batching and the per-batch metrics happen
here (and in the Predictor and Registry it calls) once, so two doors cannot disagree on them; so do
the model repository extension's load and unload, which REST and gRPC both offer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_service.capture.recorder import Recorder
from mnist_service.errors import BadRequest
from mnist_service.registry.registry import Registry, Version


@dataclass(frozen=True, slots=True)
class Target:
    """The version that answers a request, and whether the client named it."""

    version: Version
    # A named version (a number, stable, canary) is the client's own comparison: never shadowed.
    # An empty name (`?version=`) names nothing, on every door alike.
    pinned: bool


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Which request a submission belongs to: its id (X-Request-ID) and the front door's route."""

    request_id: str
    route: str


class InFlight:
    """The requests a worker is answering: uvicorn's set of request tasks, which every HTTP connection
    of a server shares, plus the hot path's requests (which have no task) and the gRPC calls (grpc's
    own, on the same event loop). An HTTP request counts from the moment its headers are read, before
    anything has started on it, so requests that arrived together are counted together; a gRPC call
    from its handler's start to its status. Empty when the app runs under something else, such as a
    TestClient.
    """

    __slots__ = ("grpc", "hot", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.hot = 0
        self.grpc = 0

    def alone(self) -> bool:
        """Exactly one request is in flight: the caller's own. A gRPC call in flight means not alone: an
        inline forward pass would hold the event loop its stream is served on."""
        return len(self.tasks) + self.hot + self.grpc == 1


class DataPlane:
    """Resolve, batch, predict, shadow: what every front door shares."""

    def __init__(self, registry: Registry, in_flight: InFlight, capture: Recorder | None = None) -> None:
        self.registry = registry
        self.in_flight = in_flight
        self.capture = capture  # CAPTURE_SAMPLE > 0: sampled requests' digits and answers are kept

    def target(self, requested: str | None) -> Target:
        """The ready version for a request that named `requested` (None or "" for the default).

        Raises NotFound (listing what is loaded) or ModelNotReady / VersionBusy (503 + Retry-After).
        """
        return Target(self.registry.resolve(requested or None), bool(requested))

    def submit(
        self, target: Target, digits: np.ndarray, *, alone: bool | None = None, request: RequestInfo | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue digits on the target's batcher: a future of probabilities (n, 10).

        Raises Overloaded (queue full) or VersionBusy at once; a deadline or a failed forward pass
        comes as the future's exception. `alone` defaults to what InFlight says. `request` says which
        request and front door the digits came from, for what is recorded per request.
        """
        version = target.version
        future = version.serving().submit(digits, alone=self.in_flight.alone() if alone is None else alone)
        if not target.pinned and self.registry.canary is not None:  # shadowing needs a canary
            registry = self.registry

            def shadow(done: asyncio.Future[np.ndarray]) -> None:
                if not done.cancelled() and done.exception() is None:
                    registry.shadow(version, digits, done.result())

            # Counted before the answer goes out, as the answer's own callbacks come after this one.
            if future.done():  # answered inline
                shadow(future)
            else:
                future.add_done_callback(shadow)
        if self.capture is not None and request is not None:
            self.capture.watch(future, request.request_id, request.route, version.name, digits)
        return future

    async def infer(
        self, target: Target, digits: np.ndarray, *, alone: bool | None = None, request: RequestInfo | None = None
    ) -> np.ndarray:
        """`submit`, awaited."""
        return await self.submit(target, digits, alone=alone, request=request)

    async def load(self, parameters: Collection[str] = ()) -> None:
        """The repository extension's load: read the repository now and load what it selects (undoing an
        unload), returning once this worker has a ready default; the other workers follow within
        REPOSITORY_POLL_S. A 400 for a load that carries `parameters` (a config, files, paths: this server
        loads only from its own repository), or when nothing can serve, with the reasons."""
        if parameters:
            raise BadRequest(
                "this server loads models only from its own repository: a load request can't carry a config, "
                f"files or paths (got parameters {sorted(parameters)[:5]}); publish a version with model_train.py"
            )
        await self.registry.set_unloaded(False)
        if self.registry.default is None:
            reasons = self.registry.failures() or "no version in the repository"
            raise BadRequest(f"failed to load '{self.registry.model_name}': {reasons}")

    async def unload(self) -> None:
        """The repository extension's unload: every version of the model stops taking requests, finishes
        its queue and is freed, in every worker of this server, until the next load."""
        await self.registry.set_unloaded(True)

    async def compare(self, digits: np.ndarray) -> list[tuple[Version, np.ndarray]]:
        """Every ready version's probabilities for the same digits, in version order; none is shadowed."""
        versions = self.registry.ready()
        if not versions:
            self.registry.resolve(None)  # raises the right 503
        alone = self.in_flight.alone()
        # Not captured (request=None): several versions answer one request, and the page that asks
        # for a comparison has just had the same picture predicted (and maybe captured).
        answers = await asyncio.gather(
            *(self.submit(Target(v, pinned=True), digits, alone=alone) for v in versions)
        )
        return list(zip(versions, answers, strict=True))
