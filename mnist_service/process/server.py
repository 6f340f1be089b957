"""Running the app under uvicorn with a Kubernetes-friendly shutdown.

SIGTERM (what Kubernetes sends on every rollout) first flips /readyz to 503 and keeps serving
for SHUTDOWN_DRAIN_SECONDS, so endpoints stop routing to us while nothing is dropped; then
uvicorn stops accepting connections and gives in-flight requests SHUTDOWN_TIMEOUT_SECONDS.
A second SIGTERM or SIGINT exits at once. The process exits 0 after a graceful stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.context
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from mnist_service.inference.integrity import ModelLoadError
from mnist_service.logconfig import configure_logging
from mnist_service.process.handoff import LATE_AFTER_S, Dispatcher, Receiver, WorkerLink
from mnist_service.registry.repository import RepositoryError, check_servable
from mnist_service.settings import Settings

if TYPE_CHECKING:
    from mnist_service.serving.grpc.server import GrpcServer
    from mnist_service.serving.hotpath import HotPath

logger = logging.getLogger(__name__)


class StopRequests:
    """The supervisor's record of forwarded signals, shared with its workers.

    A worker starts with SIGINT and SIGTERM ignored (inherited), because a signal that lands
    while it imports torch would kill it with a traceback. Once its handlers are installed it
    reads this record, so a stop requested meanwhile is not lost; the count makes each
    forwarded signal count once, whether it arrives as a signal or is read here.
    """

    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self.count = context.Value("i", 0)
        self.last_signal = context.Value("i", 0)

    def record(self, sig: int) -> None:
        with self.count.get_lock():
            self.last_signal.value = sig
            self.count.value += 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain window, and optionally fed connections by a supervisor."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: Any,
        drain_seconds: float,
        stops: StopRequests | None = None,
        receiver: Receiver | None = None,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.drain_seconds = drain_seconds
        self.stops = stops
        self.receiver = receiver
        self._stops_seen = 0
        self._drain_until: float | None = None
        self.grpc: GrpcServer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.receiver is None:
            await super().startup(sockets)
            await self._start_grpc()
            return
        await super().startup(sockets=[])  # no listener of our own: the supervisor accepts
        config = self.config
        protocol_class = self.receiver.counted(config.http_protocol_class)

        def protocol_factory() -> asyncio.Protocol:
            # What uvicorn's startup builds for its own listeners, with the close counter added.
            return protocol_class(config=config, server_state=self.server_state, app_state=self.lifespan.state)

        self.receiver.start(asyncio.get_running_loop(), protocol_factory, self._orphaned, self._stuck)
        await self._start_grpc()

    async def _start_grpc(self) -> None:
        """Serve the Open Inference Protocol over gRPC beside HTTP, on this event loop (GRPC_PORT; 0 = off).

        Each worker binds GRPC_PORT itself, with SO_REUSEPORT, and the kernel spreads new connections
        over the workers, instead of the supervisor handing them over as it does HTTP's: grpc's C core
        accepts and owns its connections and has no way to take over one accepted by another process.
        What that loses (docs/grpc.md): the hand-off's choice of the least-loaded worker, its
        MAX_CONNECTIONS refusal, and its skip of a worker without a heartbeat; a hung worker's gRPC
        connections wait until WORKER_TIMEOUT_S kills it.
        """
        settings: Settings = self.app.state.settings
        if settings.grpc_port == 0:
            return
        # Imported here, and only here: the generated modules must stay out of every process that does not
        # serve gRPC (the supervisor, a test process that imports tritonclient.grpc's copy of them).
        from mnist_service.serving.grpc.server import GrpcServer, address

        self.grpc = GrpcServer(self.app)
        try:
            await self.grpc.start()
        except RuntimeError as exc:
            logger.error("cannot serve gRPC on %s (GRPC_PORT): %s; free the port, or set GRPC_PORT=0 to "
                         "turn gRPC off", address(settings), exc)
            sys.exit(1)

    def _stuck(self) -> tuple[float, str]:
        """How long the longest-stuck batcher of this worker has been in one forward pass, and whose."""
        now = time.perf_counter()
        worst = (0.0, "")
        for version in self.app.state.registry.held():
            stuck_for = version.predictor.stalled_for(now) if version.predictor is not None else 0.0
            if stuck_for > worst[0]:
                worst = stuck_for, (
                    f"in a stuck forward pass: model version {version.name}'s batcher busy for {stuck_for:.1f}s "
                    "(a forward pass that does not return, or queued work it does not take up)"
                )
        return worst

    def _orphaned(self) -> None:
        logger.error("the supervisor process is gone: finishing in-flight requests and exiting")
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.grpc is not None:
            # gRPC calls in flight finish first (HTTP requests in flight go on meanwhile), within the same
            # SHUTDOWN_TIMEOUT_SECONDS window as HTTP's: uvicorn's shutdown then gets what is left of it,
            # and stops the app's batchers only after both.
            started = time.monotonic()
            window = self.config.timeout_graceful_shutdown or 0.0
            await self.grpc.stop(0.0 if self.force_exit else window)
            self.config.timeout_graceful_shutdown = max(window - (time.monotonic() - started), 0.1)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            if self.stops is not None and self.stops.count.value > self._stops_seen:
                self.handle_exit(self.stops.last_signal.value, None)
            yield

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stops is None:
            self._act(sig)
            return
        # Act once per forwarded signal: two may have been recorded before the first arrived.
        while self._stops_seen < self.stops.count.value:
            self._stops_seen += 1
            self._act(sig)

    def _act(self, sig: int) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and
        # the default SIGTERM action would turn a clean stop into exit code 143.
        if self._drain_until is not None or self.should_exit:
            logger.warning("second signal %s: exiting now", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
        elif sig == signal.SIGTERM and self.drain_seconds > 0:
            self.app.state.draining = True  # gRPC health follows within HEALTH_POLL_S
            self._drain_until = time.monotonic() + self.drain_seconds
            logger.info("SIGTERM: /readyz now 503; serving %.1fs more before closing", self.drain_seconds)
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until and not self.should_exit:
            logger.info("drain window over: closing listeners, finishing in-flight requests")
            self.should_exit = True
        return await super().on_tick(counter)


def worker_pids(supervisor: int) -> list[int]:
    """The worker processes of a running supervisor, read from Linux's /proc: for tools and tests
    that attach to a worker. Spawn's resource tracker, also a child, is left out."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(p) for p in children if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]


def _ensure_fd_limit(settings: Settings) -> None:
    """Raise the soft open-files limit so that each worker can hold MAX_CONNECTIONS connections."""
    needed = settings.max_connections + 256  # the model, logs, metrics files, pools, the channel
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        logger.warning(
            "the open-files limit (%d) is below MAX_CONNECTIONS=%d + 256: lower MAX_CONNECTIONS or raise "
            "the limit (ulimit -n), or connections may fail with 'too many open files'",
            target, settings.max_connections,
        )


def serve(settings: Settings) -> int:
    """Check the model, then serve until signalled; returns the process exit code."""
    _ensure_fd_limit(settings)
    try:
        # Fail in one clear line before uvicorn starts, instead of a lifespan traceback.
        check_servable(settings)
    except (ModelLoadError, RepositoryError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
    if settings.workers <= 1:
        return _run_worker(settings)
    return _supervise(settings)


def _uvicorn_config(settings: Settings, app: Any = None) -> uvicorn.Config:
    """uvicorn's configuration for `app` (built by create_app), or, in the supervisor, just for binding
    the socket: there the protocol is never used, and its serving layer (torch, prometheus_client) is
    not imported, which keeps the supervisor small and its metrics in the multiprocess folder."""
    http: Any = "httptools"
    if app is not None:
        from mnist_service.serving.protocol import guarded_protocol

        metrics = app.state.metrics
        http = guarded_protocol(
            settings.header_timeout_s,
            metrics.header_timeouts.inc,
            app.state.in_flight,
            hot_path=_hot_path(settings, app),
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            on_head_refused=metrics.heads_refused.inc,
        )
    return uvicorn.Config(
        app or "mnist_service.serving.api:create_app",
        host=settings.host,
        port=settings.port,
        http=http,
        timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]  # a float works
        # Alone, a worker bounds its own connections; behind the supervisor, the supervisor does.
        limit_concurrency=settings.max_connections if settings.workers <= 1 else None,
        log_level=settings.log_level,
        access_log=False,  # the middleware logs one line per request with its id
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,  # type: ignore[arg-type]  # a float works
        log_config=None,  # keep the logging configured by the entry point
        server_header=False,
        # uvicorn trusts X-Forwarded-* only from 127.0.0.1 by default, and nothing here reads the
        # client's address or scheme: its middleware showed in a worker's profile under load.
        proxy_headers=False,
    )


def _hot_path(settings: Settings, app: Any) -> HotPath | None:
    """The hot path for `app` when HOT_PATH is on and the installed uvicorn is the one it was built on."""
    if app is None or not settings.hot_path:
        return None
    from mnist_service.serving.hotpath import HotPath
    from mnist_service.serving.protocol import uvicorn_drift

    drift = uvicorn_drift()
    if drift:
        logger.warning(
            "HOT_PATH is on, but this uvicorn differs from the pinned one (%s): FastAPI answers every request",
            ", ".join(drift),
        )
        return None
    return HotPath(app)


def _run_worker(settings: Settings, stops: StopRequests | None = None, link: WorkerLink | None = None) -> int:
    # Imported here: only workers need torch, and the supervisor stays a few MB.
    from mnist_service.serving.api import create_app

    app = create_app(settings)
    receiver = Receiver(link, settings.worker_timeout_s) if link is not None else None
    config = _uvicorn_config(settings, app)
    server = DrainingServer(config, app, settings.shutdown_drain_seconds, stops, receiver)
    server.run()
    return 0 if server.started else 1


def _worker_main(settings: Settings, link: WorkerLink, stops: StopRequests) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(_run_worker(settings, stops, link))


def _death_cause(exitcode: int) -> str:
    """'SIGKILL' for a process killed by a signal, 'exit 1' for one that exited: a metric label."""
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
        return f"signal {-exitcode}"
    return f"exit {exitcode}"


_PROCESS_STATES = {
    "R": "running", "S": "sleeping", "D": "waiting on I/O", "T": "stopped by a signal", "t": "stopped by a debugger",
}


def _process_state(pid: int) -> str:
    """What Linux says a process is doing ('stopped by a signal' after SIGSTOP), from /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "unknown"
    return _PROCESS_STATES.get(state, state)


def _supervise(settings: Settings) -> int:
    """Run `settings.workers` server processes behind one listening socket.

    Several processes, each with one event loop and one inference thread, are what keeps two
    cores busy: in one process the GIL serialises HTTP parsing and image decoding. This process
    accepts every connection and hands it to the least-loaded worker (see handoff.py). Signals
    are forwarded, so each worker drains on its own, and the listener closes when the drain
    window ends.

    A worker that dies (an OOM kill, a crash in a native library) is replaced: the others keep
    serving while its successor loads, verifies and warms the model, and only then takes
    connections. A ready worker that stops beating (handoff.py) gets no new connections; silent for
    WORKER_TIMEOUT_S it is hung: killed, and replaced the same way (cause "hung"). More than
    WORKER_RESTART_LIMIT deaths within WORKER_RESTART_WINDOW_S is a crash loop: the server stops and
    exits 3, so the orchestrator sees a broken container rather than one that flaps.
    """
    runtime_dir = Path(tempfile.mkdtemp(prefix="mnist-run-"))  # what the workers share
    metrics_dir = runtime_dir / "metrics"
    metrics_dir.mkdir()
    # prometheus_client's multiprocess mode is chosen from this variable when a process imports it.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from prometheus_client import multiprocess

    from mnist_service.metrics import SupervisorMetrics

    metrics = SupervisorMetrics()
    worker_settings = settings.model_copy(update={"prometheus_multiproc_dir": metrics_dir, "runtime_dir": runtime_dir})
    context = multiprocessing.get_context("spawn")
    config = _uvicorn_config(settings)
    dispatcher = Dispatcher(
        config.bind_socket(), settings.workers, context, config.backlog,
        max_connections=settings.max_connections, on_refused=metrics.connections_refused.inc,
    )
    stops = StopRequests(context)

    def spawn(slot: int, link: WorkerLink) -> multiprocessing.process.BaseProcess:
        worker = context.Process(target=_worker_main, args=(worker_settings, link, stops), name=f"worker-{slot}")
        worker.start()
        return worker

    workers: list[multiprocessing.process.BaseProcess] = []
    deaths: collections.deque[float] = collections.deque()  # when workers died, within the window
    late: set[int] = set()  # slots whose worker is skipped for a late beat, as last logged
    hung: set[int] = set()  # pids killed for hanging: their deaths count as cause "hung"
    stopping = False
    crash_loop = False
    close_listener_at: float | None = None  # set by signals, acted on by the loop below

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping, close_listener_at
        draining = sig == signal.SIGTERM and not stopping and settings.shutdown_drain_seconds > 0
        close_listener_at = time.monotonic() + (settings.shutdown_drain_seconds if draining else 0.0)
        stopping = True
        stops.record(sig)
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, sig)

    def kill_hung() -> None:
        now = time.monotonic()
        for slot, worker in enumerate(workers):
            link = dispatcher.links[slot]
            if not link.ready.value or worker.pid is None or worker.exitcode is not None:
                continue
            silent = link.silent_for(now)
            if silent > LATE_AFTER_S and slot not in late:
                late.add(slot)
                logger.warning("worker %s (pid %d) is late: no heartbeat for %.1fs; new connections go to "
                               "the other workers", worker.name, worker.pid, silent)
            elif silent <= LATE_AFTER_S and slot in late:
                late.discard(slot)
                logger.info("worker %s (pid %d) beats again: back in rotation", worker.name, worker.pid)
            if silent > settings.worker_timeout_s:
                doing = link.doing.value.decode(errors="replace") or "silent: its event loop stopped turning"
                logger.error(
                    "worker %s (pid %d) hung: no heartbeat for %.1fs (WORKER_TIMEOUT_S=%g); it was %s; its "
                    "process is %s. Killing it (SIGKILL)", worker.name, worker.pid, silent,
                    settings.worker_timeout_s, doing, _process_state(worker.pid),
                )
                link.ready.value = 0
                hung.add(worker.pid)
                late.discard(slot)
                os.kill(worker.pid, signal.SIGKILL)  # reaped and replaced by replace_dead()

    def replace_dead() -> None:
        nonlocal crash_loop
        now = time.monotonic()
        for slot, worker in enumerate(workers):
            if worker.exitcode is None or worker.pid is None:
                continue
            cause = "hung" if worker.pid in hung else _death_cause(worker.exitcode)
            hung.discard(worker.pid)
            late.discard(slot)
            metrics.worker_deaths.labels(cause).inc()
            multiprocess.mark_process_dead(worker.pid)  # its live gauges (queue depth) no longer count
            deaths.append(now)
            while deaths and deaths[0] < now - settings.worker_restart_window_s:
                deaths.popleft()
            if len(deaths) > settings.worker_restart_limit:
                logger.error(
                    "worker %s (pid %d) died (%s): %d deaths within %gs is over WORKER_RESTART_LIMIT=%d; "
                    "stopping the server", worker.name, worker.pid, cause, len(deaths),
                    settings.worker_restart_window_s, settings.worker_restart_limit,
                )
                crash_loop = True
                forward(signal.SIGTERM, None)
                return
            logger.error(
                "worker %s (pid %d) died (%s): starting a replacement; the other workers keep serving "
                "(%d of %d deaths allowed within %gs)", worker.name, worker.pid, cause, len(deaths),
                settings.worker_restart_limit, settings.worker_restart_window_s,
            )
            link = dispatcher.replace(slot)
            workers[slot] = spawn(slot, link)
            link.channel.close()  # the new worker holds its own duplicate now

    handled = (signal.SIGTERM, signal.SIGINT)
    # Ignored dispositions survive exec: the workers start deaf and read `stops` when ready.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in handled}
    try:
        for slot, link in enumerate(dispatcher.links):
            workers.append(spawn(slot, link))
        for sig in handled:
            signal.signal(sig, forward)
        dispatcher.forget_worker_ends()  # each worker holds its own duplicate now
        logger.info("supervising %d workers on %s:%d", len(workers), settings.host, settings.port)
        while any(w.is_alive() for w in workers):
            if close_listener_at is not None and time.monotonic() >= close_listener_at:
                dispatcher.stop_accepting()
            dispatcher.poll(timeout=0.1)
            if not stopping:
                kill_hung()
                replace_dead()
                dispatcher.rebalance()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        dispatcher.close()
        for worker in workers:
            worker.join(timeout=5)
        shutil.rmtree(runtime_dir, ignore_errors=True)
    if crash_loop:
        return 3
    return 0 if all(w.exitcode == 0 for w in workers) else 1
