"""The data plane: the one path from decoded digits to probabilities that every front door calls.

Each front door (the upload and pixel routes, v2 over REST, the HTTP hot path in protocol.py)
decodes its request into digits (n, 28, 28), asks `target()` which version answers, calls
`submit()` or `infer()`, and encodes the probabilities, as KServe's and MLServer's endpoints call
their DataPlane. Version resolution, the shadow rule, batching and the per-batch metrics happen
here (and in the Predictor and Registry it calls) once, so two doors cannot disagree on them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_service.capture.recorder import Recorder
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
    """The requests a worker is answering, as its HTTP protocol knows them: uvicorn's set of request
    tasks, which every connection of a server shares, plus the hot path's requests (which have no
    task). Each counts from the moment its headers are read, before anything has started on it, so
    requests that arrived together are counted together. Empty when the app runs under something
    else, such as a TestClient.
    """

    __slots__ = ("hot", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.hot = 0

    def alone(self) -> bool:
        """Exactly one request is in flight: the caller's own."""
        return len(self.tasks) + self.hot == 1


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
