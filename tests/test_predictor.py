"""The batcher and its backpressure, driven with a fake slow model under asyncio.run.

The fake model answers each image with the digit (pixel value % 10) it was filled with, so every
test can check that each caller got its own rows back, and it records the batches it was given.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mnist_service.errors import ModelNotReady, Overloaded
from mnist_service.inference.predictor import InferenceFailed, Predictor
from mnist_service.metrics import Metrics

MEAN, STD = 0.1307, 0.3081
METADATA = {"version": "fake", "input": {"normalization": {"mean": MEAN, "std": STD}}}


class SlowModel:
    """A runtime that sleeps `delay_s` per forward pass; raises when an image is filled with `fail_on`."""

    name, version, platform = "fake", "0", "fake"

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.batches: list[list[int]] = []  # the fill value of every image, per forward pass
        self.started: list[float] = []
        self.entered = threading.Event()

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.started.append(time.perf_counter())
        pixels = np.rint((x[:, 0, 0, 0] * STD + MEAN) * 255).astype(np.int64)
        self.batches.append(pixels.tolist())
        self.entered.set()
        time.sleep(self.delay_s)
        if self.fail_on is not None and bool((pixels == self.fail_on).any()):
            raise RuntimeError("simulated model failure")
        return np.eye(10, dtype=np.float32)[pixels % 10]  # the digit, with certainty

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def _predictor(model: SlowModel, **kwargs: float) -> Predictor:
    options = {"max_batch_size": 32, "max_batch_delay_ms": 0.0, "max_queue": 64, "request_timeout_s": 10.0}
    options.update(kwargs)
    return Predictor(model, METADATA, Metrics(), **options)


def _digits(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 28, 28), value, dtype=np.uint8)


def _answers(probs: np.ndarray) -> list[int]:
    return probs.argmax(1).tolist()


async def _until_forward_starts(model: SlowModel) -> None:
    assert await asyncio.to_thread(model.entered.wait, 10), "the batcher never called the model"


def _assert_retry_later(exc: Overloaded | ModelNotReady) -> None:
    assert exc.status_code == 503
    assert exc.headers is not None and int(exc.headers["Retry-After"]) >= 1


def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    model = SlowModel(delay_s=1.0)

    async def scenario() -> None:
        p = _predictor(model, max_batch_size=1, max_queue=2)
        await p.start()
        running = asyncio.create_task(p.predict(_digits(1)))
        await _until_forward_starts(model)
        queued = [asyncio.create_task(p.predict(_digits(v))) for v in (2, 3)]
        await asyncio.sleep(0)  # both are on the queue now, which is full
        with pytest.raises(Overloaded) as refused:
            await p.predict(_digits(4))
        # Refused while the model is still busy with the first request: no waiting for room.
        assert not running.done()
        _assert_retry_later(refused.value)
        assert "queue is full" in refused.value.detail
        results = await asyncio.gather(running, *queued)
        assert [_answers(r) for r in results] == [[1], [2], [3]]
        await p.stop()

    asyncio.run(scenario())


def test_deadline_gives_overloaded_and_the_batcher_recovers() -> None:
    model = SlowModel(delay_s=1.0)

    async def scenario() -> None:
        p = _predictor(model, max_batch_size=1, request_timeout_s=0.3)
        await p.start()
        slow = asyncio.gather(p.predict(_digits(1)), p.predict(_digits(2)), return_exceptions=True)
        for outcome in await slow:
            assert isinstance(outcome, Overloaded), outcome
            _assert_retry_later(outcome)
            assert "deadline" in outcome.detail
        model.delay_s = 0.0
        await asyncio.sleep(1.0)  # the abandoned forward pass finishes meanwhile
        # Its late answer must not break the next batch.
        assert _answers(await p.predict(_digits(3))) == [3]
        await p.stop()

    asyncio.run(scenario())


def test_requests_are_batched_up_to_max_batch_size() -> None:
    model = SlowModel()

    async def scenario() -> list[list[int]]:
        p = _predictor(model, max_batch_size=4, max_batch_delay_ms=50)
        await p.start()
        results = await asyncio.gather(*(p.predict(_digits(v)) for v in range(10)))
        await p.stop()
        return [_answers(r)[0] for r in results]

    assert asyncio.run(scenario()) == list(range(10))
    assert model.sizes == [4, 4, 2]
    assert [v for batch in model.batches for v in batch] == list(range(10))


def test_batch_delay_counts_from_the_first_arrival() -> None:
    # Delay 600 ms, a second request at 300 ms: it joins the first one's batch, and the batch
    # runs ~600 ms after the FIRST arrival, not 600 ms after the last (~900 ms). Wide margins:
    # the machine is shared and noisy.
    model = SlowModel()
    delay_s, second_at_s = 0.6, 0.3

    async def scenario() -> float:
        p = _predictor(model, max_batch_size=32, max_batch_delay_ms=delay_s * 1000)
        await p.start()
        first_sent = time.perf_counter()
        first = asyncio.create_task(p.predict(_digits(1)))
        await asyncio.sleep(second_at_s)
        second = asyncio.create_task(p.predict(_digits(2)))
        assert [_answers(r) for r in await asyncio.gather(first, second)] == [[1], [2]]
        await p.stop()
        return model.started[0] - first_sent

    waited = asyncio.run(scenario())
    assert model.batches == [[1, 2]]
    assert delay_s - 0.05 <= waited < delay_s + second_at_s - 0.05, waited


def test_a_request_that_does_not_fit_starts_the_next_batch_whole() -> None:
    model = SlowModel()

    async def scenario() -> list[np.ndarray]:
        p = _predictor(model, max_batch_size=8, max_batch_delay_ms=50)
        await p.start()
        results = await asyncio.gather(
            p.predict(_digits(1, 5)), p.predict(_digits(2, 5)), p.predict(_digits(3, 3)), p.predict(_digits(4, 12))
        )
        await p.stop()
        return results

    a, b, c, big = asyncio.run(scenario())
    # 5 + 5 > 8: the second request waits for the next batch instead of being split 3 + 2;
    # then 5 + 3 fill it; a request larger than a whole batch runs alone, also unsplit.
    assert model.batches == [[1] * 5, [2] * 5 + [3] * 3, [4] * 12]
    assert (_answers(a), _answers(b), _answers(c), _answers(big)) == ([1] * 5, [2] * 5, [3] * 3, [4] * 12)


def test_a_failing_forward_fails_its_batch_only() -> None:
    model = SlowModel(fail_on=9)

    async def scenario() -> None:
        p = _predictor(model, max_batch_size=4, max_batch_delay_ms=50)
        await p.start()
        outcomes = await asyncio.gather(p.predict(_digits(9)), p.predict(_digits(1)), return_exceptions=True)
        assert all(isinstance(o, InferenceFailed) for o in outcomes), outcomes  # same batch, same fate
        assert _answers(await p.predict(_digits(5))) == [5]
        await p.stop()

    asyncio.run(scenario())
    assert model.batches == [[9, 1], [5]]


def test_stop_fails_waiting_and_running_requests_with_model_not_ready() -> None:
    model = SlowModel(delay_s=0.5)

    async def scenario() -> None:
        p = _predictor(model, max_batch_size=1, request_timeout_s=30.0)
        await p.start()
        running = asyncio.create_task(p.predict(_digits(1)))
        await _until_forward_starts(model)
        queued = [asyncio.create_task(p.predict(_digits(v))) for v in (2, 3)]
        await asyncio.sleep(0)
        await p.stop()
        # Nobody is left to wait out a 30 s deadline: each gets a 503 to retry elsewhere.
        outcomes = await asyncio.wait_for(asyncio.gather(running, *queued, return_exceptions=True), 5)
        for outcome in outcomes:
            assert isinstance(outcome, ModelNotReady), outcome
            _assert_retry_later(outcome)
        with pytest.raises(ModelNotReady):
            await p.predict(_digits(4))

    asyncio.run(scenario())
    assert model.batches == [[1]]  # the queued two never reached the model


class ThreadRecordingModel(SlowModel):
    """A SlowModel that also records the thread each forward pass ran on."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.threads: list[str] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return super().forward(x)


def test_a_lone_request_runs_inline_and_is_recorded_like_a_batch() -> None:
    model = ThreadRecordingModel()

    async def scenario() -> tuple[Predictor, list[int], str]:
        p = _predictor(model)
        p.warm_up(rounds=2)
        model.batches.clear(), model.threads.clear()
        await p.start()
        answers = [_answers(await p.predict(_digits(v), alone=True))[0] for v in (3, 4)]
        await p.stop()
        return p, answers, threading.current_thread().name

    p, answers, loop_thread = asyncio.run(scenario())
    assert p.inline and answers == [3, 4]
    assert model.threads == [loop_thread, loop_thread]  # on the event loop's thread, not the inference thread
    batches = {s.name: s.value for s in p.metrics.batch_size.collect()[0].samples}
    assert batches["mnist_batch_size_count"] == 2 and batches["mnist_batch_size_sum"] == 2
    samples = p.metrics.predictions.collect()[0].samples
    counted = {s.labels["digit"]: s.value for s in samples if s.name.endswith("_total") and s.value}
    assert counted == {"3": 1.0, "4": 1.0}


def test_a_request_is_not_inline_while_the_batcher_has_work_or_the_model_is_slow() -> None:
    model = ThreadRecordingModel(delay_s=0.3)

    async def busy() -> list[int]:
        p = _predictor(model)
        p.inline = True  # as if warm-up had timed a quick model
        await p.start()
        first = asyncio.create_task(p.predict(_digits(1)))  # queued: occupies the inference thread
        await _until_forward_starts(model)
        second = await p.predict(_digits(2), alone=True)  # claims to be alone, but the batcher is busy
        results = [_answers(await first)[0], _answers(second)[0]]
        await p.stop()
        return results

    assert asyncio.run(busy()) == [1, 2]
    assert len(model.threads) == 2 and all(t.startswith("inference") for t in model.threads)

    slow = ThreadRecordingModel(delay_s=0.003)  # over INLINE_MAX_S per forward pass

    async def lone() -> bool:
        p = _predictor(slow)
        p.warm_up(rounds=3)
        await p.start()
        await p.predict(_digits(5), alone=True)
        await p.stop()
        return p.inline

    assert asyncio.run(lone()) is False
    assert slow.threads[-1].startswith("inference")


def test_retry_after_tracks_the_queue_and_the_measured_service_rate() -> None:
    """503's Retry-After: the queue ahead over the rate the batcher has been answering at."""
    model = SlowModel(delay_s=0.05)  # one image a pass: about 20 requests a second

    async def scenario() -> dict[int, int]:
        p = _predictor(model, max_batch_size=1, max_queue=60)
        await p.start()
        try:
            await asyncio.gather(*(p.predict(_digits(1)) for _ in range(8)))  # busy all along: the rate is learned
            retry_after = {}
            futures = []
            for backlog in (5, 60):
                while p._queue.qsize() < backlog:
                    futures.append(p.submit(_digits(2)))
                retry_after[backlog] = p.retry_after()
            with pytest.raises(Overloaded) as refused:
                p.submit(_digits(3))
            assert refused.value.headers["Retry-After"] == str(retry_after[60])
            for future in futures:
                future.cancel()
            return retry_after
        finally:
            await p.stop()

    retry_after = asyncio.run(scenario())
    # 5 queued at ~20/s clear within a second; 60 take about 3 s (a wide band: the machine is shared).
    assert retry_after[5] == 1
    assert 2 <= retry_after[60] <= 6, retry_after
