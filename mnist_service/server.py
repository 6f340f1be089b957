"""Running the app under uvicorn with a Kubernetes-friendly shutdown.

SIGTERM (what Kubernetes sends on every rollout) first flips /readyz to 503 and keeps serving
for SHUTDOWN_DRAIN_SECONDS, so endpoints stop routing to us while nothing is dropped; then
uvicorn stops accepting connections and gives in-flight requests SHUTDOWN_TIMEOUT_SECONDS.
A second SIGTERM or SIGINT exits at once. The process exits 0 after a graceful stop.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mnist_service.api import create_app
from mnist_service.model import ModelLoadError, read_verified_metadata
from mnist_service.settings import Settings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and
        # the default SIGTERM action would turn a clean stop into exit code 143.
        if self._drain_until is not None or self.should_exit:
            logger.warning("second signal %s: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
        elif sig == signal.SIGTERM and self.drain_seconds > 0:
            self.app.state.draining = True
            self._drain_until = time.monotonic() + self.drain_seconds
            logger.info("SIGTERM: /readyz now 503; serving %.1fs more before closing", self.drain_seconds)
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until and not self.should_exit:
            logger.info("drain window over: closing listeners, finishing in-flight requests")
            self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings) -> int:
    """Check the model, then serve until signalled; returns the process exit code."""
    try:
        # Fail in one clear line before uvicorn starts, instead of a lifespan traceback.
        read_verified_metadata(settings.model_path, settings.resolved_metadata_path)
    except ModelLoadError as exc:
        logger.error("cannot start: %s", exc)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the middleware logs one line per request with its id
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,  # type: ignore[arg-type]  # a float works
        log_config=None,  # keep the logging configured by the entry point
        server_header=False,
    )
    server = DrainingServer(config, app, settings.shutdown_drain_seconds)
    server.run()
    return 0 if server.started else 1
