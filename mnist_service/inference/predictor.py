"""The loaded model behind a dynamic micro-batcher: the one data plane every endpoint calls.

Requests put 28x28 arrays on a bounded queue. One batcher task collects them until it has
`max_batch_size` images or `max_batch_delay_ms` has passed since the *first* request of the
batch arrived, then runs one forward pass on a dedicated thread, so the event loop keeps
parsing HTTP on the other core while the runtime (TorchScript or ONNX Runtime) computes.

A request that is alone (the caller says nothing else is in flight, and the batcher has nothing
queued or computing) runs inline instead: with one client at a time, the queue, the batcher task
and the two thread hops cost more than the forward pass itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mnist_service.errors import ModelNotReady, Overloaded
from mnist_service.inference.runtime import Runtime, normalize
from mnist_service.metrics import Metrics, observe_many
from mnist_service.monitoring import drift

logger = logging.getLogger(__name__)

# Retry-After bounds, and the service rate assumed before any batch was measured (requests/s).
_MAX_RETRY_AFTER_S = 30
_INITIAL_RATE = 100.0
_RATE_WEIGHT = 0.2  # of each new measurement in the moving average

# The longest forward pass of one image (the median, timed at warm-up) that may run inline, on the event loop.
INLINE_MAX_S = 0.002


class InferenceFailed(RuntimeError):
    """The model raised during a forward pass; details are logged, never sent to the client."""


@dataclass(eq=False)  # identity, not field equality: items hold numpy arrays
class _Item:
    digits: np.ndarray  # (n, 28, 28), pixel units 0-255, uint8 or float32
    arrival: float
    deadline: float
    future: asyncio.Future[np.ndarray] = field(repr=False)


class Predictor:
    """Owns a version's runtime (the loaded model), its metadata and the batching loop."""

    def __init__(
        self,
        runtime: Runtime,
        metadata: dict[str, Any],
        metrics: Metrics,
        *,
        version: str = "1",
        max_batch_size: int = 32,
        max_batch_delay_ms: float = 0.0,
        max_queue: int = 512,
        request_timeout_s: float = 5.0,
    ) -> None:
        self.runtime = runtime
        self.metadata = metadata
        self.metrics = metrics
        self.version = version  # the repository's version number, as a string
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay_ms / 1000.0
        self.request_timeout = request_timeout_s
        norm = metadata["input"]["normalization"]
        self._mean, self._std = float(norm["mean"]), float(norm["std"])
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        # One thread: the runtime parallelises inside a forward pass if asked, never across batches.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._held: _Item | None = None  # an item that did not fit the last batch
        # The batch being collected or computed: stop() must answer these too, or their callers
        # would wait out their whole deadline after the batcher is gone.
        self._current: list[_Item] = []
        self._computing = False  # a forward pass is running on the inference thread
        self._forward_started = 0.0  # when the running forward pass began (perf_counter)
        # Every queued request not yet answered, oldest first (answered ones leave lazily): a lone
        # request may run inline only when this is empty, and its head's deadline is the next to check.
        self._pending: collections.deque[_Item] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Requests answered per second while busy (a moving average): what Retry-After is computed from.
        self._service_rate = _INITIAL_RATE
        self._last_done = 0.0
        self._last_arrival = 0.0
        self.ready = False
        self.inline = False  # whether a lone request may run inline: set by warm_up(), which times it
        # Label children resolved once: .labels() costs a dict lookup and a lock on every call.
        self._predictions = [metrics.predictions.labels(str(d), version) for d in range(10)]
        self._confidence = metrics.confidence.labels(version)
        self._inputs = {name: histogram.labels(version) for name, histogram in metrics.inputs.items()}
        self._export_reference()

    @property
    def sha256(self) -> str:
        """The model file's sha256, as its metadata records it."""
        return str(self.metadata.get("version", "unknown"))

    def forward(self, digits: np.ndarray) -> np.ndarray:
        """Probabilities (n, 10) for digits (n, 28, 28) in pixel units 0-255 (uint8 or float).

        Synchronous: runs on the inference thread.
        """
        return self.runtime.forward(normalize(digits, self._mean, self._std))

    def warm_up(self, rounds: int = 20) -> None:
        """Run the shapes we serve a few times (TorchScript's JIT specialises on its first calls, ORT allocates its
        buffers), and time a lone image."""
        lone = []
        for batch in (1, 2, self.max_batch_size):
            for _ in range(rounds):
                started = time.perf_counter()
                self.forward(np.zeros((batch, 28, 28), dtype=np.uint8))
                if batch == 1:
                    lone.append(time.perf_counter() - started)
        # A lone request's forward pass runs on the event loop only if it is quick: a slow model
        # there would hold up every other connection of the worker, health probes included.
        self.inline = sorted(lone)[len(lone) // 2] <= INLINE_MAX_S

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="batcher")
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leftovers = [*self._current, *([self._held] if self._held else [])]
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(ModelNotReady("the server is shutting down; retry"))
        self._executor.shutdown(wait=True)

    def stalled_for(self, now: float) -> float:
        """Seconds the batcher has been stuck: in one forward pass, or not taking up queued work; 0 when idle.

        For the worker's heartbeat: a forward pass that never returns leaves the event loop turning,
        so only this tells a hung model from a healthy worker. `now` is a time.perf_counter() reading.
        """
        if self._computing:
            return now - self._forward_started
        if self._queue.empty() or self._task is None:
            return 0.0
        # Work is queued but no pass runs: the batcher takes it within a loop turn, unless it is dead.
        return now - self._last_arrival if self._task.done() else 0.0

    def busy(self) -> bool:
        """Requests are waiting for a forward pass: optional work (shadow runs) should stand aside."""
        return not self._queue.empty()

    async def drain(self, idle_s: float = 0.5) -> None:
        """Stop once every queued request is answered and none arrived for `idle_s`; bounded by the deadline.

        A request that picked this version just before it was unloaded reaches predict() a moment
        later; the idle wait lets it in instead of failing it.
        """
        give_up = time.perf_counter() + self.request_timeout + idle_s
        while time.perf_counter() < give_up:
            pending = not self._queue.empty() or self._held is not None
            pending = pending or any(not it.future.done() for it in self._current)
            if not pending and time.perf_counter() - self._last_arrival >= idle_s:
                break
            await asyncio.sleep(0.05)
        await self.stop()

    def submit(self, digits: np.ndarray, *, alone: bool = False) -> asyncio.Future[np.ndarray]:
        """Queue digits (n, 28, 28), white on black in pixel units 0-255: a future of probabilities (n, 10).

        Callers that can't await (the HTTP hot path) add a done-callback; cancelling the future drops
        the queued work. `alone`: the caller knows no other request is in flight in this process. If
        the batcher is idle too, the forward pass runs right here on the event loop, which then has
        nothing else to do, and the future comes back already done.
        """
        if not self.ready:
            raise ModelNotReady()
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        now = self._last_arrival = time.perf_counter()
        pending = self._pending
        while pending and pending[0].future.done():
            pending.popleft()
        if alone and self.inline and not pending and not self._computing:
            future.set_result(self._forward_inline(digits, now))
            return future
        item = _Item(digits, now, now + self.request_timeout, future)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(
                f"the inference queue is full ({self._queue.maxsize} requests waiting); retry in "
                f"{self.retry_after()}s", self.retry_after(),
            ) from None
        # Deadlines: one timer for the oldest unanswered request, not one per request.
        pending.append(item)
        if self._sweeper is None:
            self._sweeper = loop.call_at(loop.time() + self.request_timeout, self._sweep)
        return future

    async def predict(self, digits: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """`submit`, awaited: the probabilities (n, 10)."""
        return await self.submit(digits, alone=alone)

    def retry_after(self) -> int:
        """Whole seconds until the queue ahead of a new request has likely cleared, from the measured rate."""
        backlog = self._queue.qsize() + len(self._current)
        return max(1, min(_MAX_RETRY_AFTER_S, math.ceil(backlog / self._service_rate)))

    def _sweep(self) -> None:
        """Answer 503 to every request past its deadline, then sleep until the next one's."""
        self._sweeper = None
        pending, now = self._pending, time.perf_counter()
        while pending and (pending[0].future.done() or pending[0].deadline <= now):
            item = pending.popleft()
            if not item.future.done():  # the batcher skips finished items
                self.metrics.rejected.labels("deadline").inc()
                item.future.set_exception(
                    Overloaded(
                        f"no answer within the {self.request_timeout:g}s deadline; the server is overloaded, "
                        f"retry in {self.retry_after()}s", self.retry_after(),
                    )
                )
        if pending and self._loop is not None:
            delay = pending[0].deadline - now
            self._sweeper = self._loop.call_at(self._loop.time() + delay, self._sweep)

    def _forward_inline(self, digits: np.ndarray, arrival: float) -> np.ndarray:
        """One request's forward pass on the calling thread, recorded like a batch of its own."""
        started = time.perf_counter()
        try:
            probs = self.forward(digits)
        except Exception:
            logger.exception("forward pass failed for a lone request of %d", len(digits))
            raise InferenceFailed("forward pass failed") from None
        self._record([started - arrival], started, probs, digits)
        return probs

    def _export_reference(self) -> None:
        """The drift reference in this version's metadata, as gauges; a model trained before it has none."""
        reference = self.metadata.get("drift_reference")
        if not reference:
            logger.info("model version %s has no drift reference: drift is not measured for it", self.version)
            return
        m, version = self.metrics, self.version
        for digit, share in enumerate(reference["digit_share"]):
            m.drift_share.labels(version, str(digit)).set(share)
        for statistic, edges in reference["buckets"].items():
            for edge, share in zip(edges, reference["cdf"][statistic], strict=True):
                m.drift_cdf.labels(version, statistic, drift.le_label(edge)).set(share)
        for score, threshold in reference["thresholds"].items():
            m.drift_threshold.labels(version, score).set(threshold)

    def _record(self, waits: list[float], started: float, probs: np.ndarray, digits: np.ndarray) -> None:
        """The metrics of one forward pass that began at `started`: a few writes per pass, not per image."""
        self.metrics.inference_time.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(digits))
        observe_many(self.metrics.queue_wait, np.asarray(waits))
        for digit, count in enumerate(np.bincount(probs.argmax(1), minlength=10).tolist()):
            if count:
                self._predictions[digit].inc(count)
        observe_many(self._confidence, probs.max(1))
        for name, values in drift.input_statistics(digits).items():
            observe_many(self._inputs[name], values)

    def _measure_rate(self, answered: int, started: float, first_arrival: float) -> None:
        """Fold one batch into the service rate: over the time since the previous batch ended if the
        batcher was busy all along (queue, loop and model together), else over the pass alone."""
        done = time.perf_counter()
        busy_since = self._last_done if self._last_done >= first_arrival else started
        self._last_done = done
        sample = answered / max(done - busy_since, 1e-6)
        self._service_rate += _RATE_WEIGHT * (sample - self._service_rate)

    async def _get_within(self, timeout: float) -> _Item | None:
        # Not asyncio.wait_for(queue.get()): on Python 3.11 a timeout racing a put can drop
        # the item. A cancelled getter task either took the item (and returns it) or did not.
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if getter not in done:
            getter.cancel()
        try:
            return await getter
        except asyncio.CancelledError:
            if getter.cancelled():
                return None
            raise

    async def _collect(self) -> list[_Item]:
        if self._held is not None:
            first, self._held = self._held, None
        else:
            first = await self._queue.get()
        self._current = batch = [first]
        images = len(first.digits)
        close_at = first.arrival + self.max_batch_delay
        while images < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = close_at - time.perf_counter()
                if remaining <= 0:
                    break
                got = await self._get_within(remaining)
                if got is None:
                    break
                item = got
            if images + len(item.digits) > self.max_batch_size:
                # Too big to join: it starts the next batch instead of being split.
                self._held = item
                break
            batch.append(item)
            images += len(item.digits)
        return batch

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A dead batcher would silently turn every request into a 503: log and go on.
                logger.exception("batcher error; continuing")

    async def _step(self) -> None:
        """Collect one batch, run it on the inference thread, hand each request its rows."""
        batch = await self._collect()
        self.metrics.queue_depth.set(self._queue.qsize())
        now = time.perf_counter()
        live = []
        for it in batch:
            if it.future.done():  # the caller gave up (deadline) while it queued
                continue
            if it.deadline <= now:
                self.metrics.rejected.labels("deadline").inc()
                it.future.set_exception(
                    Overloaded(f"the request expired in the queue; retry in {self.retry_after()}s", self.retry_after())
                )
                continue
            live.append(it)
        if not live:
            return
        digits = np.concatenate([it.digits for it in live])
        started = self._forward_started = time.perf_counter()
        self._computing = True
        try:
            probs = await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, digits)
        except Exception:
            logger.exception("forward pass failed for a batch of %d", len(digits))
            for it in live:
                if not it.future.done():
                    it.future.set_exception(InferenceFailed("forward pass failed"))
            return
        finally:
            self._computing = False
        self._record([now - it.arrival for it in live], started, probs, digits)
        self._measure_rate(len(live), started, live[0].arrival)
        offset = 0
        for it in live:
            n = len(it.digits)
            if not it.future.done():
                it.future.set_result(probs[offset : offset + n])
            offset += n
