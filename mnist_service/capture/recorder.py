"""Capture on the serving side: sampled predictions go to a bounded buffer on the event loop, and one
writer thread per worker moves them to the capture database in batches, enforces retention and
refreshes the labelled-capture counts. Requests never wait for the database: when it is slow, full
or down, the buffer fills, what does not fit is dropped and counted (mnist_capture_dropped_total),
and writing resumes by itself once the database is back.

What a captured request costs its worker, and why it is done this way (measured in
docs/ground-truth.md#what-it-costs):
- On the event loop, one append of references (the request's id, route, version, its digits and the
  future of its answer) under a lock held for a few instructions: no callback per request, no copy.
  The writer reads the answers from the futures once they are done (a future goes from pending to
  done once, on the loop's thread, and reading a finished one is a read under the GIL); one not yet
  answered waits for the next pass, a failed or cancelled one is not stored.
- The writer thread shares the worker's GIL with the event loop, so it does little Python per image
  (one concatenation and argmax per batch, a few list entries per image) and hands the database one
  statement per batch (store.py), which runs with the GIL released. Its old executemany took the GIL
  back for every row, and each of those handoffs made the event loop wait.
- A separate writer process would free the GIL entirely but send every image through a pipe and add
  a process per worker to supervise; with the GIL held for one short stretch per batch, the measured
  cost did not call for it.

The feedback routes use the same object for their few synchronous operations (find, label, erase,
store a labelled example), on a connection of their own, in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from mnist_service.capture.store import Batch, CaptureStore, CaptureUnavailable, Entry, as_batches
from mnist_service.metrics import Metrics
from mnist_service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Why a capture was not stored: the database keeps up but not fast enough (buffer_full), the database
# failed while the buffer filled (database_error), or the worker stopped with it still failing (shutdown).
DROP_REASONS = ("buffer_full", "database_error", "shutdown")
CLASSES = 10
# What the event loop buffers: an Entry whose probabilities may still be the future of the answer.
Waiting = tuple[str, str, str, np.ndarray, "np.ndarray | asyncio.Future[np.ndarray]", float]


class Recorder:
    """Sampled captures of one worker, on their way to the capture database, and the feedback routes' access to it."""

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        sample: float,
        capacity: int,
        max_rows: int | None,
        max_age_s: float | None,
        flush_s: float = 0.5,
        batch: int = 2048,
        retention_s: float = 60.0,
        retry_s: float = 1.0,
    ) -> None:
        self.writer_store = CaptureStore(url)  # the writer thread's connection
        self.request_store = CaptureStore(url)  # the feedback routes' connection, under a lock
        self.where = self.writer_store.where
        self.metrics = metrics
        self.sample = sample
        self.capacity = capacity  # images held in memory, the batch being written included
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self.flush_s, self.batch, self.retention_s, self.retry_s = flush_s, batch, retention_s, retry_s
        # The writer is woken before its interval once this many requests wait: a batch, or half the buffer.
        self._wake_at = max(1, min(batch, capacity // 2))
        self.failing: str | None = None  # the database's last error while writes fail
        self._buffer: list[Waiting] = []  # the event loop appends, the writer takes from the front
        self._unanswered: list[Waiting] = []  # taken by the writer before their answer came; the writer's own
        self._held = 0  # images in _buffer, in _unanswered and in the writer's pending batch: what capacity bounds
        self._lock = threading.Lock()  # _buffer and _held, shared by the event loop and the writer
        self._request_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped_while_failing = 0
        self._versions: set[str] = set()  # versions whose feedback series exist
        for reason in DROP_REASONS:  # at 0 from the start, so the first drop counts in rate()
            metrics.capture_dropped.labels(reason)

    # ---- the request path: called on the event loop --------------------------------------------

    def watch(self, future: asyncio.Future[np.ndarray], request_id: str, route: str, version: str,
              digits: np.ndarray) -> None:
        """Capture a request's digits and its answer (once the future has it), if the request is sampled."""
        if self.sample < 1 and random.random() >= self.sample:  # noqa: S311  # nosec B311  # sampling, not security
            return
        if version not in self._versions:
            self.expect_feedback(version)
        self.add((request_id, route, version, digits, future, time.time()))

    def expect_feedback(self, version: str) -> None:
        """Create a version's feedback series at 0, before its first label: increase() then counts that label."""
        self._versions.add(version)
        for outcome in ("correct", "wrong"):
            self.metrics.feedback.labels(version, outcome)

    def add(self, entry: Waiting) -> None:
        """Queue one request's capture for the writer; dropped and counted when the buffer is full."""
        images = len(entry[3])
        with self._lock:
            if self._held + images <= self.capacity:
                self._buffer.append(entry)
                self._held += images
                images = 0
            full_batch = len(self._buffer) >= self._wake_at
        if images:
            self._drop("database_error" if self.failing else "buffer_full", images)
        elif full_batch and not self._wake.is_set():
            self._wake.set()

    def _drop(self, reason: str, images: int) -> None:
        self.metrics.capture_dropped.labels(reason).inc(images)
        if self.failing:
            self._dropped_while_failing += images

    # ---- the writer thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()
        logger.info(
            "capturing %g%% of requests into %s (up to %d images buffered per worker)",
            100 * self.sample, self.where, self.capacity,
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered (for up to timeout_s), then close; what could not be written is counted."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            left, self._held = self._held, 0
            self._buffer.clear()
            self._unanswered = []
        if left:
            self.metrics.capture_dropped.labels("shutdown").inc(left)
            logger.warning("capture: %d images not written to %s at shutdown", left, self.where)
        self.writer_store.close()
        self.request_store.close()

    def _take(self) -> list[Batch]:
        """Up to a batch of answered captures, in order (none: an empty list); those still waiting for
        their answer are looked at again next pass, and failed or cancelled requests are let go."""
        with self._lock:  # a slice and a move of references: the event loop's next append waits no longer
            taken = self._buffer[:self.batch]
            del self._buffer[:self.batch]
        answered: list[Entry] = []
        unanswered: list[Waiting] = []
        let_go = 0
        for entry in self._unanswered + taken if self._unanswered else taken:
            answer = entry[4]
            if isinstance(answer, np.ndarray):
                answered.append(entry)  # type: ignore[arg-type]  # the answer itself (a test's)
            elif not answer.done():
                unanswered.append(entry)
            elif not answer.cancelled() and answer.exception() is None:
                answered.append((*entry[:4], answer.result(), entry[5]))
            else:
                let_go += len(entry[3])
        self._unanswered = unanswered
        self._release(let_go)
        try:
            return as_batches(answered)
        except Exception:  # a bug must not end capture for the life of the worker
            images = sum(len(entry[3]) for entry in answered)
            logger.exception("capture: packing a batch failed; %d images dropped", images)
            self._drop("database_error", images)
            self._release(images)
            return []

    def _release(self, images: int) -> None:
        """Images written or dropped: no longer held against the capacity."""
        with self._lock:
            self._held -= images

    def _run(self) -> None:
        pending: list[Batch] = []  # taken, not yet written: still held against the capacity
        next_retention = 0.0
        cpu_before = time.thread_time()
        while True:
            cpu = time.thread_time()
            self.metrics.capture_cpu.inc(cpu - cpu_before)  # the last pass's CPU; waiting costs none
            cpu_before = cpu
            stopping = self._stopping.is_set()
            pending = pending or self._take()
            images = sum(map(len, pending))
            try:
                if pending:
                    self.writer_store.insert_batches(pending)
                    self.metrics.captures.inc(images)
                    self._release(images)
                    pending = []
                    self._recovered()
                if time.monotonic() >= next_retention:
                    self._retention()
                    next_retention = time.monotonic() + self.retention_s
                    self._recovered()
            except CaptureUnavailable as exc:
                self._failed(str(exc))
                if stopping:
                    self._drop("shutdown", images)
                    self._release(images)
                    return
                self._stopping.wait(self.retry_s)
                continue
            except Exception:  # a bug must not end capture for the life of the worker
                logger.exception("capture: writing a batch failed; %d images dropped", images)
                self._drop("database_error", images)
                self._release(images)
                pending = []
            more = len(self._buffer)
            if stopping and not more:
                return
            if more < self._wake_at and not stopping:
                self._wake.wait(self.flush_s)
                self._wake.clear()

    def _retention(self) -> None:
        deleted = self.writer_store.enforce_retention(self.max_rows, self.max_age_s)
        if deleted:
            logger.info("capture: retention deleted %d captures from %s", deleted, self.where)
        self._export_counts(self.writer_store.label_counts())

    def _export_counts(self, counts: dict[int, int]) -> None:
        for label in range(CLASSES):
            self.metrics.labelled_captures.labels(str(label)).set(counts.get(label, 0))

    def _failed(self, error: str) -> None:
        if self.failing is None:
            logger.error(
                "capture: the database %s can't be written (%s); serving goes on, up to %d images wait in memory, "
                "beyond that captures are dropped (mnist_capture_dropped_total); retrying every %g s",
                self.where, error, self.capacity, self.retry_s,
            )
        self.failing = error

    def _recovered(self) -> None:
        if self.failing is not None:
            logger.info(
                "capture: the database %s is writable again; %d images were dropped meanwhile",
                self.where, self._dropped_while_failing,
            )
            self.failing = None
            self._dropped_while_failing = 0

    def flush_soon(self) -> None:
        """Ask the writer to write what is buffered now, not at its next interval."""
        self._wake.set()

    # ---- the feedback routes: run in a thread, on their own connection -----------------------------

    async def run(self, operation: Callable[[CaptureStore], T]) -> T:
        """One store operation off the event loop; CaptureUnavailable when the database fails."""

        def locked() -> T:
            with self._request_lock:
                return operation(self.request_store)

        return await asyncio.to_thread(locked)

    async def refresh_counts(self) -> None:
        """Export the labelled-capture counts now (after a label), not at the next retention pass."""
        try:
            self._export_counts(await self.run(lambda store: store.label_counts()))
        except CaptureUnavailable:
            pass  # the writer's next pass exports them


def capture_from_settings(settings: Settings, metrics: Metrics) -> Recorder | None:
    """The worker's Recorder when CAPTURE_SAMPLE > 0, else None (capture and feedback off)."""
    if settings.capture_sample <= 0:
        return None
    return Recorder(
        settings.capture_database,
        metrics,
        sample=settings.capture_sample,
        capacity=settings.capture_buffer,
        max_rows=settings.capture_max_rows,
        max_age_s=settings.capture_max_days * 86400 if settings.capture_max_days is not None else None,
    )
