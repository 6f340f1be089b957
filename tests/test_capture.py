"""The capture database and the recorder: real SQLite files and a real PostgreSQL (Debian's package,
started by benchmarks/postgres.py with initdb and pg_ctl in a temporary folder, as a non-root user,
on a free loopback port).

Also the faults: a database that stops mid-stream (PostgreSQL stopped, then started again), a SQLite
file on a full filesystem and on a read-only one (small tmpfs mounts: these tests need root, as CI has).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.postgres import PG_BIN, Postgres, temporary_postgres
from mnist_service.capture.recorder import Recorder
from mnist_service.capture.store import CaptureStore, CaptureUnavailable, as_batches, as_row, redacted
from mnist_service.metrics import Metrics

from .conftest import ROOT, free_port


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    if not PG_BIN:
        pytest.fail("PostgreSQL is not installed: run scripts/install_postgresql.sh (make test does)")
    with temporary_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh capture database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'captures.sqlite3'}"
        return
    server: Postgres = request.getfixturevalue("postgres")
    yield server.url
    with contextlib.suppress(CaptureUnavailable), CaptureStore(server.url).transaction() as cur:
        cur.execute("DROP TABLE IF EXISTS captures")


def _digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _probs(n: int, seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, 10)).astype(np.float32)
    return p / p.sum(1, keepdims=True)


def _rows(n: int, prefix: str = "r", at: float = 1_000_000.0, label: int | None = None) -> list:
    digits, probs = _digits(n), _probs(n)
    return [as_row(f"{prefix}{i}", 0, at + i, "/predict", "1", digits[i], probs[i], label) for i in range(n)]


# --- the store ---------------------------------------------------------------------------------------


def test_a_capture_reads_back_as_written(database_url: str) -> None:
    store = CaptureStore(database_url)
    digits, probs = _digits(3), _probs(3)
    store.insert([as_row("req-1", i, 1700000000.5, "/predict/batch", "2", digits[i], probs[i]) for i in range(3)])
    found = store.find("req-1")
    assert [c.item for c in found] == [0, 1, 2]
    for capture, digit, prob in zip(found, digits, probs, strict=True):
        assert capture.route == "/predict/batch" and capture.version == "2" and capture.label is None
        assert capture.captured_at == 1700000000.5
        np.testing.assert_array_equal(capture.image, digit)
        np.testing.assert_array_equal(capture.probabilities, prob)
        assert capture.prediction == int(prob.argmax())
    assert store.find("req-2") == []
    # An id stored already (a client reusing X-Request-ID) keeps its first capture.
    store.insert([as_row("req-1", 0, 1.0, "/predict", "9", digits[1], probs[1])])
    assert store.find("req-1")[0].version == "2" and store.count() == 3


def test_a_writers_batch_goes_in_whole_with_any_request_id(database_url: str) -> None:
    # The writer's batches, as the recorder makes them: ids with quotes, backslashes and non-ASCII,
    # two routes and two versions mixed, requests of several images, times to the microsecond, and
    # more images than a writer's batch.
    store = CaptureStore(database_url)
    ids = ['q"uote', "back\\slash", "ünï-☃", "semi;colon", "", *(f"n{i}" for i in range(3000))]
    rng = np.random.default_rng(1)
    times = 1700000000.0 + rng.random(len(ids)) * 1e6
    sizes = [3 if i % 7 == 0 else 1 for i in range(len(ids))]
    digits, probs = _digits(sum(sizes)), _probs(sum(sizes))
    entries, first = [], 0
    for i, (request_id, at, n) in enumerate(zip(ids, times, sizes, strict=True)):
        route, version = ("/predict/batch", "2") if i % 5 == 0 else ("/v2", "3")
        entries.append((request_id, route, version, digits[first:first + n], probs[first:first + n], float(at)))
        first += n
    batches = as_batches(entries)
    assert sorted((b.route, b.version) for b in batches) == [("/predict/batch", "2"), ("/v2", "3")]
    store.insert_batches(batches)
    assert store.count() == sum(sizes)
    for i in (0, 1, 2, 3, 4, 5, 7, len(ids) - 1):
        request_id, route, version, want_digits, want_probs, at = entries[i]
        found = store.find(request_id)
        assert [c.item for c in found] == list(range(len(want_digits)))
        for capture, digit, prob in zip(found, want_digits, want_probs, strict=True):
            assert (capture.route, capture.version, capture.label) == (route, version, None)
            assert capture.captured_at == pytest.approx(at, abs=1e-6)
            np.testing.assert_array_equal(capture.image, digit)
            np.testing.assert_array_equal(capture.probabilities, prob)
            assert capture.prediction == int(prob.argmax())
    # An id stored already (a client reusing X-Request-ID) keeps its first capture; the rest go in.
    store.insert_batches(as_batches([("n1", "/predict", "9", digits[:1], probs[:1], 1.0),
                                     ("fresh", "/predict", "9", digits[:1], probs[:1], 1.0)]))
    assert store.find("n1")[0].version == "3" and store.find("fresh")[0].version == "9"
    assert store.count() == sum(sizes) + 1


def test_float_digits_are_stored_as_the_uint8_image() -> None:
    digit = np.full((28, 28), 127.6, dtype=np.float32)
    digit[0, 0], digit[0, 1] = -3.0, 300.0
    row = as_row("x", 0, 0.0, "/v2", "1", digit, _probs(1)[0])
    image = np.frombuffer(row[7], dtype=np.uint8).reshape(28, 28)
    assert image[0, 0] == 0 and image[0, 1] == 255 and image[5, 5] == 128


def test_labels_replace_and_say_what_they_replaced(database_url: str) -> None:
    store = CaptureStore(database_url)
    store.insert(_rows(2))
    first = store.label("r0", 0, 7)
    assert first is not None and first.label is None
    second = store.label("r0", 0, 4)
    assert second is not None and second.label == 7
    assert store.find("r0")[0].label == 4
    assert store.label("r0", 1, 4) is None  # no such image
    assert store.label("unknown", 0, 4) is None
    assert store.label_counts() == {4: 1}
    assert [c.request_id for c in store.labelled()] == ["r0"]


def test_erasure_deletes_every_image_of_a_request(database_url: str) -> None:
    store = CaptureStore(database_url)
    digits, probs = _digits(2), _probs(2)
    store.insert([as_row("many", i, 1.0, "/predict/batch", "1", digits[i], probs[i], 3) for i in range(2)])
    store.insert(_rows(1))
    assert store.delete("many") == 2
    assert store.find("many") == [] and store.count() == 1
    assert store.delete("many") == 0
    assert store.label_counts() == {}


def test_retention_by_age_and_by_rows_keeps_labels_longest(database_url: str) -> None:
    store = CaptureStore(database_url)
    store.insert(_rows(10, prefix="old", at=1000.0))  # captured at 1000-1009
    store.insert(_rows(10, prefix="new", at=5000.0))
    store.label("old8", 0, 1)
    assert store.enforce_retention(None, max_age_s=100, now=1108.5) == 9  # old0-old8 are over 100 s, labelled or not
    assert {c.request_id for c in store.labelled()} == set()
    assert store.count() == 11
    store.label("new0", 0, 2)  # the oldest row, but labelled
    store.label("new1", 0, 3)
    assert store.enforce_retention(max_rows=5, max_age_s=None) == 6
    kept = sorted(c.request_id for c in [*store.find("new0"), *store.find("new1")])
    assert kept == ["new0", "new1"]  # the unlabelled went first
    assert store.count() == 5


def test_the_password_never_reaches_the_logs() -> None:
    assert redacted("postgresql://capture:s3cret@db:5432/mnist") == "postgresql://capture:***@db:5432/mnist"
    assert "s3cret" not in CaptureStore("postgresql://capture:s3cret@db/mnist").where


def test_an_unreachable_postgres_is_unavailable_not_a_crash() -> None:
    store = CaptureStore(f"postgresql://nobody:pw@127.0.0.1:{free_port()}/none")
    with pytest.raises(CaptureUnavailable, match="refused"):
        store.count()


# --- the recorder ------------------------------------------------------------------------------------


def _samples(metrics: Metrics, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name == name
    }


def _eventually(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def _recorder(url: str, **options: object) -> Iterator[tuple[Recorder, Metrics]]:
    metrics = Metrics()
    settings = {"sample": 1.0, "capacity": 1000, "max_rows": None, "max_age_s": None, "flush_s": 0.05,
                "retry_s": 0.2, **options}
    recorder = Recorder(url, metrics, **settings)  # type: ignore[arg-type]
    recorder.start()
    try:
        yield recorder, metrics
    finally:
        recorder.stop()


def _entry(request_id: str, n: int = 1) -> tuple:
    return (request_id, "/predict", "1", _digits(n), _probs(n), time.time())


def test_the_recorder_writes_batches_and_counts_labels(database_url: str) -> None:
    started = time.monotonic()
    with _recorder(database_url) as (recorder, metrics):
        for i in range(50):
            recorder.add(_entry(f"a{i}"))
        recorder.add(_entry("batch", 5))
        _eventually(lambda: _samples(metrics, "mnist_captures_total").get("") == 55, "55 images written")
        store = CaptureStore(database_url)
        assert store.count() == 55 and len(store.find("batch")) == 5
        store.label("a3", 0, 6)
        import asyncio

        asyncio.run(recorder.refresh_counts())
        assert _samples(metrics, "mnist_labelled_captures")["label=6"] == 1
        assert _samples(metrics, "mnist_labelled_captures")["label=0"] == 0
        assert set(_samples(metrics, "mnist_capture_dropped_total").values()) == {0.0}
        # The writer's CPU is counted: more than nothing, less than the wall time it has run.
        assert 0 < _samples(metrics, "mnist_capture_writer_cpu_seconds_total")[""] < time.monotonic() - started


def test_the_recorder_takes_each_answer_from_its_future(tmp_path: Path) -> None:
    # The event loop only appends the future; the writer reads the answer once it is there, stores
    # nothing for a failed or cancelled request, and a slow answer holds back no other capture.
    import asyncio

    url = str(tmp_path / "c.sqlite3")

    async def scenario(recorder: Recorder) -> None:
        loop = asyncio.get_running_loop()
        inline, slow, failed, cancelled, later = (loop.create_future() for _ in range(5))
        inline.set_result(_probs(1, seed=1))  # answered before it was watched, as an inline forward pass is
        for name, future in (("inline", inline), ("slow", slow), ("failed", failed), ("cancelled", cancelled),
                             ("later", later)):
            recorder.watch(future, name, "/predict", "1", _digits(1))
        failed.set_exception(RuntimeError("forward pass failed"))
        cancelled.cancel()
        later.set_result(_probs(1, seed=2))
        store = CaptureStore(url)
        while not store.find("later"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a few more writer passes
        assert store.find("slow") == [] and store.find("failed") == [] and store.find("cancelled") == []
        slow.set_result(_probs(1, seed=3))
        while not store.find("slow"):
            await asyncio.sleep(0.05)
        np.testing.assert_array_equal(store.find("slow")[0].probabilities, _probs(1, seed=3)[0])
        np.testing.assert_array_equal(store.find("inline")[0].probabilities, _probs(1, seed=1)[0])
        assert store.count() == 3

    with _recorder(url) as (recorder, _):
        asyncio.run(asyncio.wait_for(scenario(recorder), 30))


def test_captures_waiting_for_their_answer_count_against_the_buffer(tmp_path: Path) -> None:
    import asyncio

    url = str(tmp_path / "c.sqlite3")

    async def scenario(recorder: Recorder, metrics: Metrics) -> None:
        loop = asyncio.get_running_loop()
        first, second, third = (loop.create_future() for _ in range(3))
        recorder.watch(first, "first", "/predict", "1", _digits(1))
        recorder.watch(second, "second", "/predict", "1", _digits(1))
        await asyncio.sleep(0.3)  # the writer has taken both and holds them, unanswered
        recorder.watch(third, "third", "/predict", "1", _digits(1))
        assert _samples(metrics, "mnist_capture_dropped_total")["reason=buffer_full"] == 1
        first.set_result(_probs(1))
        second.set_result(_probs(1))
        store = CaptureStore(url)
        while store.count() < 2:
            await asyncio.sleep(0.05)
        assert store.find("third") == []

    with _recorder(url, capacity=2) as (recorder, metrics):
        asyncio.run(asyncio.wait_for(scenario(recorder, metrics), 30))


def test_a_batch_the_writer_cannot_write_yet_still_counts_against_the_buffer(tmp_path: Path) -> None:
    # CAPTURE_BUFFER bounds every image a worker holds, the batch waiting for the database included.
    url = str(tmp_path / "c.sqlite3")
    blocker = CaptureStore(url)
    blocker.count()
    with _recorder(url, capacity=10) as (recorder, metrics):
        recorder.add(_entry("first"))  # written: the writer's first pass (and retention) is behind it
        _eventually(lambda: CaptureStore(url).find("first"), "the first capture written")
        with blocker.transaction():  # another process holding the write lock
            for i in range(10):
                recorder.add(_entry(f"a{i}"))
            time.sleep(0.3)  # the writer has taken them and waits for the lock
            for i in range(10):
                recorder.add(_entry(f"b{i}"))
            assert sum(_samples(metrics, "mnist_capture_dropped_total").values()) == 10
        _eventually(lambda: CaptureStore(url).count() == 11, "the ten written once the lock is free")
        assert CaptureStore(url).find("b0") == []


def test_a_capture_that_cannot_be_packed_is_dropped_and_the_writer_goes_on(tmp_path: Path) -> None:
    url = str(tmp_path / "c.sqlite3")
    with _recorder(url) as (recorder, metrics):
        recorder.add(("bad", "/predict", "1", _digits(1), _probs(1), -1.0))  # a time its column can't hold
        _eventually(lambda: _samples(metrics, "mnist_capture_dropped_total")["reason=database_error"] == 1,
                    "the bad capture dropped and counted")
        recorder.add(_entry("good"))
        _eventually(lambda: CaptureStore(url).find("good"), "a later capture written")


def test_new_request_ids_sort_in_time_order() -> None:
    # Server-made ids start with the time, so the capture table's index of ids grows at its end.
    from mnist_service.serving.middleware import request_id_for

    first = request_id_for(None)
    time.sleep(0.002)
    second = request_id_for(None)
    assert len(first) == len(second) == 32 and int(first, 16) < int(second, 16)
    assert abs(int(first[:12], 16) / 1000 - time.time()) < 5
    assert request_id_for("client-chosen-1") == "client-chosen-1"


def test_retention_runs_while_captures_keep_coming(tmp_path: Path) -> None:
    url = str(tmp_path / "c.sqlite3")
    with _recorder(url, max_rows=100, retention_s=0.1) as (recorder, metrics):
        for i in range(600):
            recorder.add(_entry(f"r{i}"))
            if i % 100 == 0:
                time.sleep(0.1)
        _eventually(lambda: _samples(metrics, "mnist_captures_total").get("") == 600, "every capture written")
        _eventually(lambda: CaptureStore(url).count() <= 100, "retention down to 100 rows")
        assert CaptureStore(url).find("r599"), "retention deleted the newest"


def test_a_full_buffer_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    url = str(tmp_path / "c.sqlite3")
    blocker = CaptureStore(url)
    blocker.count()  # creates the file and table
    # Another process holding SQLite's write lock is a database that is slower than the traffic.
    with blocker.transaction():
        with _recorder(url, capacity=10) as (recorder, metrics):
            started = time.perf_counter()
            for i in range(40):
                recorder.add(_entry(f"x{i}"))
            assert time.perf_counter() - started < 1.0  # never waited for the lock (BUSY_TIMEOUT_S is 5 s)
            dropped = _samples(metrics, "mnist_capture_dropped_total")
            assert dropped["reason=buffer_full"] + dropped["reason=database_error"] >= 20


def test_postgres_stopped_mid_stream_drops_then_resumes(postgres: Postgres, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mnist_service.capture.recorder")
    with _recorder(postgres.url, capacity=200) as (recorder, metrics):
        recorder.add(_entry("before"))
        _eventually(lambda: _samples(metrics, "mnist_captures_total").get("") == 1, "the first capture written")
        postgres.stop()
        try:
            for i in range(300):
                recorder.add(_entry(f"during{i}"))
                time.sleep(0.002)
            _eventually(lambda: recorder.failing is not None, "the failure noticed")
            dropped = _samples(metrics, "mnist_capture_dropped_total")["reason=database_error"]
            assert dropped >= 50  # 300 offered while it was down: 200 held, a batch taken, the rest dropped
        finally:
            postgres.start()
        _eventually(lambda: recorder.failing is None, "writing again")
        # What was held while it was down is written: nothing offered is lost without being counted.
        _eventually(lambda: _samples(metrics, "mnist_captures_total")[""] + dropped == 301, "the buffer written")
        recorder.add(_entry("after"))
        _eventually(lambda: CaptureStore(postgres.url).find("after"), "a capture after the restart")
        assert CaptureStore(postgres.url).count() == 302 - dropped
    messages = [r.getMessage() for r in caplog.records]
    assert any("can't be written" in m and "mnist_capture_dropped_total" in m for m in messages), messages
    assert any("writable again" in m for m in messages), messages
    assert sum("can't be written" in m for m in messages) == 1  # said once, not per retry
    with contextlib.suppress(CaptureUnavailable), CaptureStore(postgres.url).transaction() as cur:
        cur.execute("DROP TABLE IF EXISTS captures")


@contextlib.contextmanager
def _mounted(folder: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at `folder` (root only): a filesystem that is full or read-only for real."""
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here ({result.stderr.strip()}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("options", ["size=64k", "ro"], ids=["full", "read-only"])
def test_sqlite_on_a_full_or_read_only_filesystem(
    tmp_path: Path, options: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mnist_service.capture.recorder")
    with _mounted(tmp_path / "mnt", options) as folder, _recorder(str(folder / "c.sqlite3"), capacity=100) as (
        recorder, metrics,
    ):
        for i in range(400):
            recorder.add(_entry(f"f{i}"))
            if i % 50 == 0:
                time.sleep(0.05)
        _eventually(lambda: recorder.failing is not None, "the failure noticed")
        dropped = _samples(metrics, "mnist_capture_dropped_total")
        assert dropped["reason=database_error"] + dropped["reason=buffer_full"] > 0
    (line,) = [r.getMessage() for r in caplog.records if "can't be written" in r.getMessage()]
    assert str(folder / "c.sqlite3") in line
    assert ("is full" in line) if options.startswith("size") else ("not writable" in line), line


# --- back into training ------------------------------------------------------------------------------


def test_labelled_captures_export_as_mnist_idx_with_their_lineage(tmp_path: Path) -> None:
    from mnist_service.capture.dataset import HOLDOUT_FRACTION, export_idx, held_out, read_labelled
    from mnist_service.data import load_split

    url = str(tmp_path / "c.sqlite3")
    store = CaptureStore(url)
    digits, probs = _digits(300), _probs(300)
    store.insert([as_row(f"id{i}", 0, 1000.0 + i, "/predict", "1", digits[i], probs[i], i % 10) for i in range(300)])
    store.insert(_rows(5, prefix="unlabelled"))
    lineage = export_idx(url, tmp_path / "idx")
    train, test = load_split(tmp_path / "idx", "train"), load_split(tmp_path / "idx", "test")
    assert len(train.images) + len(test.images) == 300  # the unlabelled are not exported
    assert abs(len(test.images) / 300 - HOLDOUT_FRACTION) < 0.08
    assert lineage["held_out"]["rows"] == len(test.images) and lineage["train"]["first_captured_at"]
    # The held-out share is decided by the request id alone: the same in every run and every database.
    by_id = {f"id{i}": (digits[i], i % 10) for i in range(300)}
    held = [request_id for request_id in by_id if held_out(request_id)]
    assert len(held) == len(test.images)
    np.testing.assert_array_equal(test.images, np.stack([by_id[r][0] for r in sorted(held)]))
    assert test.labels.tolist() == [by_id[r][1] for r in sorted(held)]
    # The same rows give the same hash; one label changed gives another.
    assert export_idx(url, tmp_path / "again")["train"]["sha256"] == lineage["train"]["sha256"]
    first_trained = read_labelled(url).split()[0].request_ids[0]
    store.label(first_trained, 0, 9 if by_id[first_trained][1] != 9 else 8)
    assert read_labelled(url).split()[0].sha256() != lineage["train"]["sha256"]


def test_the_held_out_share_is_an_option(tmp_path: Path) -> None:
    from mnist_service.capture.dataset import export_idx, held_out

    url = str(tmp_path / "c.sqlite3")
    digits, probs = _digits(400), _probs(400)
    CaptureStore(url).insert([as_row(f"id{i}", 0, 1000.0 + i, "/predict", "1", digits[i], probs[i], i % 10)
                              for i in range(400)])
    lineage = export_idx(url, tmp_path / "half", holdout=0.5)
    assert lineage["holdout_fraction"] == 0.5 and abs(lineage["held_out"]["rows"] / 400 - 0.5) < 0.08
    assert export_idx(url, tmp_path / "none", holdout=0)["held_out"]["rows"] == 0
    # A larger share holds out the same requests and more: runs with different shares stay comparable.
    ids = [f"id{i}" for i in range(400)]
    assert {r for r in ids if held_out(r, 0.2)} < {r for r in ids if held_out(r, 0.5)}
    for wrong in ("1", "-0.1", "nan", "a fifth"):
        result = subprocess.run([sys.executable, "model_train.py", "--feedback", url, "--export", str(tmp_path / "x"),
                                 "--feedback-holdout", wrong], cwd=ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 2 and "--feedback-holdout" in result.stderr, result.stderr
        assert ("at least 0 and below 1" in result.stderr) or ("not a number" in result.stderr), result.stderr
    assert not (tmp_path / "x").exists()


def test_training_refuses_a_missing_or_unlabelled_database(tmp_path: Path) -> None:
    from mnist_service.capture.dataset import read_labelled

    with pytest.raises(CaptureUnavailable, match="does not exist"):
        read_labelled(str(tmp_path / "typo.sqlite3"))
    CaptureStore(str(tmp_path / "empty.sqlite3")).insert(_rows(3))
    with pytest.raises(CaptureUnavailable, match="no labelled capture"):
        read_labelled(str(tmp_path / "empty.sqlite3"))


def test_a_field_too_wide_for_its_column_is_refused_not_cut() -> None:
    # A time before 1970 (or after 2286) does not fit the batch's 16 digits of microseconds.
    for at in (-1.0, 1e10):
        with pytest.raises(ValueError, match="capture field outside"):
            as_batches([("r", "/predict", "1", _digits(1), _probs(1), at)])
    assert len(as_batches([("r", "/predict", "1", _digits(1), _probs(1), 9_999_999_999.0)])[0]) == 1


def test_connections_opening_a_new_sqlite_file_together_all_get_in(tmp_path: Path) -> None:
    # Workers starting together (and the feedback routes' connection) open one new file at once: one
    # of them puts it in WAL mode while the others hold it. Without a retry, about 1 in 10 of these
    # rounds failed with "database is locked".
    import threading

    for attempt in range(100):
        url = str(tmp_path / f"c{attempt}.sqlite3")
        errors: list[str] = []

        def connect(url: str = url, errors: list[str] = errors) -> None:
            try:
                CaptureStore(url).count()
            except CaptureUnavailable as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=connect) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"round {attempt}: {errors}"
        with sqlite3.connect(url) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
