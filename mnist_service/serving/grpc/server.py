"""One worker's gRPC server: the inference service and grpc.health.v1 on GRPC_PORT, on the worker's event loop.

Started by the worker once the app's lifespan has loaded the model (process/server.py), stopped in its
drain: health says NOT_SERVING from the moment the drain starts (as /readyz says 503), new calls are
refused when the drain window ends, and calls in flight get SHUTDOWN_TIMEOUT_SECONDS, as HTTP requests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from mnist_service.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from mnist_service.serving.grpc.service import SERVICE, InferenceService, is_ready
from mnist_service.settings import Settings

logger = logging.getLogger(__name__)

# How often health follows readiness (loading, an unload through the repository API, the drain).
HEALTH_POLL_S = 0.25
# Keepalive, enforced: the server pings a connection with calls in flight every 30 s and drops it when a
# ping goes unanswered for 10 s (a peer gone without a FIN would otherwise hold its calls until the
# connection's age runs out); a client may ping at most every 10 s, and only with a call in flight:
# the third ping too many is answered with GOAWAY (too_many_pings) and the connection closed.
_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC core's channel arguments for the server: message size, streams, connection lifetimes, keepalive."""
    return [
        # Every worker binds GRPC_PORT; the kernel spreads new connections over them (process/server.py says why).
        ("grpc.so_reuseport", 1),
        # A larger message is refused with RESOURCE_EXHAUSTED before it is read, as HTTP's 413.
        ("grpc.max_receive_message_length", settings.max_upload_bytes),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", round(settings.grpc_max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", round(settings.grpc_max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(settings.shutdown_timeout_seconds * 1000)),
        *_KEEPALIVE,
    ]


def address(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.grpc_port}"


class GrpcServer:
    """The gRPC server of one worker's app (after its lifespan started: the data plane exists)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.settings: Settings = app.state.settings
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(options=server_options(self.settings))
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._serving: bool | None = None
        self._follow: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind GRPC_PORT and serve; a RuntimeError if the port can't be bound."""
        where = address(self.settings)
        self.server.add_insecure_port(where)  # raises RuntimeError when it can't bind
        await self.server.start()
        await self._update_health()
        self._follow = asyncio.create_task(self._follow_readiness())
        logger.info("serving the Open Inference Protocol over gRPC on %s", where)

    async def _update_health(self) -> None:
        serving = is_ready(self.app)
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):  # the server as a whole, and the inference service by name
            await self.health.set(service, status)

    async def _follow_readiness(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._update_health()

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new calls, give those in flight `grace` seconds, then cancel them."""
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
