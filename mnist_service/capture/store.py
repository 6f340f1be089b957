"""The capture database: one table of captured predictions, in a SQLite file or in PostgreSQL.

CAPTURE_DATABASE names it: a path or `sqlite:///path` (WAL mode with a busy timeout, so every
worker process of a server can write the same file), or `postgresql://user:password@host/db` for
several pods. A CaptureStore is one connection, opened on first use and again after a failure;
every method blocks, so the server calls them from a thread, never on its event loop.

One row per image: the request id and the image's place in the request (`item`), when, the route,
the version that answered, its prediction and probabilities (10 little-endian float32), the 28x28
uint8 image the model saw (784 bytes, never the upload), and the label once someone gives one.

The serving workers' writer threads write a batch at a time: one statement per route and version in
the batch (usually one), `INSERT ... SELECT` over a JSON array of the request ids and byte strings
holding every image's other fields end to end, cut by row number in SQL: the item and the time in
microseconds as fixed-width ASCII digits, the prediction (1 digit), the probabilities (40 bytes) and
the image (784 bytes). The writer thread shares its process's GIL with the event loop, so the work
per image that holds the GIL is kept small (a few numpy calls per column), and the statement runs
its whole batch with the GIL released. Byte strings, not text, because SQLite's substr on text walks
the UTF-8 characters from the start (quadratic in the batch) and on a blob jumps to the offset.
Measured per image (docs/ground-truth.md#what-it-costs): executemany 6.8 µs, and it hands the GIL
back and forth around every row; one JSON array of every row's fields 7-8 µs, because its
json.dumps held the GIL for 1.5 µs and SQLite 3.40's `->>` re-parses the row's JSON text for each
field; this about 5 µs, 1 µs of it holding the GIL.

Single rows (a labelled example, a test's) go in with a plain INSERT per row.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# A row as inserted: request_id, item, captured_at (unix seconds), route, version, prediction,
# probabilities (bytes), image (bytes), label and labelled_at (None until labelled).
Row = tuple[str, int, float, str, str, int, bytes, bytes, int | None, float | None]
# One request's capture: request_id, route, version, digits (n, 28, 28), probabilities (n, 10), unix time.
Entry = tuple[str, str, str, np.ndarray, np.ndarray, float]

ITEM_WIDTH, TIME_WIDTH = 6, 16  # a Batch's item and time fields in ASCII digits: "000003", "1765012345123456"


@dataclass(frozen=True)
class Batch:
    """Captured images of one route and version on their way in, column-wise: the request id per
    image, and every image's other fields end to end in byte strings, fixed width each."""

    route: str
    version: str
    request_ids: list[str]
    items: bytes  # ITEM_WIDTH ASCII digits per image: its place in its request
    times: bytes  # TIME_WIDTH ASCII digits per image: unix time in microseconds
    predictions: bytes  # one ASCII digit per image
    probabilities: bytes  # 10 little-endian float32 per image
    images: bytes  # 784 bytes per image

    def __len__(self) -> int:
        return len(self.request_ids)


BUSY_TIMEOUT_S = 5.0  # SQLite: how long a writer waits for another process's write lock
CONNECT_TIMEOUT_S = 3  # PostgreSQL: a database that is down fails fast, and capture retries later
RETENTION_CHUNK = 5000  # rows deleted per transaction, so retention never holds the write lock long

_SELECT = "SELECT request_id, item, captured_at, route, version, prediction, probabilities, image, label FROM captures"
_INSERT = (
    "INSERT INTO captures (request_id, item, captured_at, route, version, prediction, probabilities, image, label, "
    "labelled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id, item) DO NOTHING"
)
# Image k (from 0) of a Batch: request id k of the JSON array, then the bytes from k times each field's
# width (ITEM_WIDTH 6, TIME_WIDTH 16, then 1, 40 and 784). Parameters in order: items, times, route,
# version, predictions, probabilities, images, request ids.
_INSERT_BATCH_SQLITE = (
    "INSERT INTO captures (request_id, item, captured_at, route, version, prediction, probabilities, image) "
    "SELECT value, CAST(substr(?, 6 * key + 1, 6) AS INTEGER), CAST(substr(?, 16 * key + 1, 16) AS INTEGER) / 1e6, "
    "?, ?, CAST(substr(?, key + 1, 1) AS INTEGER), substr(?, 40 * key + 1, 40), substr(?, 784 * key + 1, 784) "
    "FROM json_each(?) WHERE true ON CONFLICT (request_id, item) DO NOTHING"  # WHERE: SQLite's parser needs it
)
# The same in PostgreSQL, where image n counts from 1.
_INSERT_BATCH_POSTGRES = (
    "INSERT INTO captures (request_id, item, captured_at, route, version, prediction, probabilities, image) "
    "SELECT id, convert_from(substr(?::bytea, (6 * n - 5)::int, 6), 'SQL_ASCII')::int, "
    "convert_from(substr(?::bytea, (16 * n - 15)::int, 16), 'SQL_ASCII')::int8 / 1e6::float8, ?, ?, "
    "convert_from(substr(?::bytea, n::int, 1), 'SQL_ASCII')::int, substr(?::bytea, (40 * n - 39)::int, 40), "
    "substr(?::bytea, (784 * n - 783)::int, 784) FROM jsonb_array_elements_text(?::jsonb) WITH ORDINALITY AS t(id, n) "
    "ON CONFLICT (request_id, item) DO NOTHING"
)


class CaptureUnavailable(Exception):
    """The capture database can't be reached or written (down, full, read-only); the message says which."""


@dataclass(frozen=True)
class Captured:
    """One captured image, as read back."""

    request_id: str
    item: int
    captured_at: float
    route: str
    version: str
    prediction: int
    probabilities: np.ndarray  # (10,) float32
    image: np.ndarray  # (28, 28) uint8
    label: int | None


def redacted(url: str) -> str:
    """The database URL without its password, for logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL or a plain path; None for PostgreSQL."""
    if url.startswith(("postgresql://", "postgres://")):
        return None
    return Path(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)


def _schema(blob: str, real: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS captures (
            request_id TEXT NOT NULL,
            item INTEGER NOT NULL,
            captured_at {real} NOT NULL,
            route TEXT NOT NULL,
            version TEXT NOT NULL,
            prediction INTEGER NOT NULL,
            probabilities {blob} NOT NULL,
            image {blob} NOT NULL,
            label INTEGER,
            labelled_at {real},
            PRIMARY KEY (request_id, item)
        )""",
        "CREATE INDEX IF NOT EXISTS captures_by_time ON captures (captured_at)",
        "CREATE INDEX IF NOT EXISTS captures_labelled ON captures (label) WHERE label IS NOT NULL",
    ]


class CaptureStore:
    """A connection to the capture database, opened on first use and reopened after an error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = _sqlite_path(url)
        self._conn: Any = None

    @property
    def where(self) -> str:
        return f"sqlite:///{self.path}" if self.path is not None else redacted(self.url)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _connect(self) -> Any:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            _wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the file intact; a power cut may lose the last batch
            statements = _schema("BLOB", "REAL")
        else:
            import psycopg  # only PostgreSQL users need it loaded

            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            statements = _schema("BYTEA", "DOUBLE PRECISION")
        try:
            with self._transaction(conn) as cur:
                if self.path is None:  # pods starting together: one creates the table, the others wait
                    cur.execute("SELECT pg_advisory_xact_lock(2323)")
                for statement in statements:
                    cur.execute(statement)
        except Exception:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        if self.path is not None:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock upgrading a read
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
                raise
        else:
            with conn.transaction(), conn.cursor() as cur:
                yield cur

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor in one transaction; any database failure comes out as CaptureUnavailable."""
        try:
            if self._conn is None:
                self._conn = self._connect()
            with self._transaction(self._conn) as cur:
                yield _Cursor(cur, self.path is None)
        except (sqlite3.Error, OSError) as exc:
            self.close()
            hint = ""
            if self.path is not None and not os.access(self.path.parent, os.W_OK):
                hint = f" ({self.path.parent} is not writable)"
            raise CaptureUnavailable(f"{exc}{hint}") from exc
        except Exception as exc:
            if type(exc).__module__.split(".")[0] != "psycopg":
                raise
            self.close()
            raise CaptureUnavailable(str(exc).strip() or type(exc).__name__) from exc

    # ---- writing ------------------------------------------------------------------------------

    def insert(self, rows: Sequence[Row]) -> None:
        """Add single rows (labelled examples); an id stored already keeps its first row."""
        if rows:
            with self.transaction() as cur:
                cur.executemany(_INSERT, rows)

    def insert_batches(self, batches: Sequence[Batch]) -> None:
        """Add the writer's batches in one transaction, one statement each; an id stored already (a
        client reusing X-Request-ID) keeps its first row."""
        sql = _INSERT_BATCH_SQLITE if self.path is not None else _INSERT_BATCH_POSTGRES
        with self.transaction() as cur:
            for b in batches:
                ids = json.dumps(b.request_ids, ensure_ascii=False)
                cur.execute(sql, (b.items, b.times, b.route, b.version, b.predictions, b.probabilities, b.images, ids))

    def label(self, request_id: str, item: int, label: int) -> Captured | None:
        """Set the label of one captured image: the capture as it was before (its old label), or None if unknown."""
        with self.transaction() as cur:
            one = _SELECT + " WHERE request_id = ? AND item = ?"
            # SQLite's BEGIN IMMEDIATE holds the write lock already; PostgreSQL locks the row.
            found = cur.fetchall(one if self.path is not None else one + " FOR UPDATE", (request_id, item))
            if not found:
                return None
            cur.execute(
                "UPDATE captures SET label = ?, labelled_at = ? WHERE request_id = ? AND item = ?",
                (label, time.time(), request_id, item),
            )
        return _captured(found[0])

    def delete(self, request_id: str) -> int:
        """Erase every image of one request; how many rows went."""
        with self.transaction() as cur:
            return cur.execute("DELETE FROM captures WHERE request_id = ?", (request_id,))

    def enforce_retention(self, max_rows: int | None, max_age_s: float | None, now: float | None = None) -> int:
        """Delete captures older than max_age_s, then the oldest beyond max_rows (unlabelled ones
        first: labels are the scarce part), a chunk per transaction; how many rows went."""
        deleted = 0
        if max_age_s is not None:
            cutoff = (now or time.time()) - max_age_s
            while True:
                with self.transaction() as cur:
                    n = cur.execute(
                        "DELETE FROM captures WHERE (request_id, item) IN (SELECT request_id, item FROM captures "
                        "WHERE captured_at < ? LIMIT ?)", (cutoff, RETENTION_CHUNK),
                    )
                deleted += n
                if n < RETENTION_CHUNK:
                    break
        while max_rows is not None:
            # Counted and deleted in one transaction, one worker or pod at a time (SQLite's write lock,
            # an advisory lock in PostgreSQL), so that two of them never both delete the same excess.
            with self.transaction() as cur:
                if self.path is None:
                    cur.execute("SELECT pg_advisory_xact_lock(2324)")
                excess = cur.fetchall("SELECT count(*) FROM captures", ())[0][0] - max_rows
                n = 0
                if excess > 0:
                    n = cur.execute(
                        "DELETE FROM captures WHERE (request_id, item) IN (SELECT request_id, item FROM captures "
                        "ORDER BY (label IS NOT NULL), captured_at LIMIT ?)", (min(excess, RETENTION_CHUNK),),
                    )
            deleted += n
            if n == 0 or n >= excess:
                break
        return deleted

    # ---- reading ------------------------------------------------------------------------------

    def find(self, request_id: str) -> list[Captured]:
        """Every captured image of one request, in order."""
        with self.transaction() as cur:
            rows = cur.fetchall(_SELECT + " WHERE request_id = ? ORDER BY item", (request_id,))
        return [_captured(row) for row in rows]

    def label_counts(self) -> dict[int, int]:
        """Labelled captures per class."""
        with self.transaction() as cur:
            rows = cur.fetchall("SELECT label, count(*) FROM captures WHERE label IS NOT NULL GROUP BY label", ())
        return {int(label): int(count) for label, count in rows}

    def count(self) -> int:
        with self.transaction() as cur:
            return int(cur.fetchall("SELECT count(*) FROM captures", ())[0][0])

    def labelled(self) -> list[Captured]:
        """Every labelled capture, in a fixed order (request id, item): the same rows read the same way."""
        with self.transaction() as cur:
            rows = cur.fetchall(
                _SELECT + " WHERE label IS NOT NULL ORDER BY request_id, item", ()
            )
        return [_captured(row) for row in rows]


def _wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (readers never block the writer, nor it them), once: the mode stays with
    the file. Changing it needs the file to itself, and SQLite answers "database is locked" at once,
    without waiting its busy timeout, when another connection (a worker starting beside this one, the
    feedback routes' connection) holds it: retried for up to BUSY_TIMEOUT_S."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class _Cursor:
    """One cursor API for both drivers: `?` placeholders (psycopg wants `%s`), rowcounts returned."""

    def __init__(self, cur: Any, postgres: bool) -> None:
        self._cur = cur
        self._postgres = postgres

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(self._sql(sql), params)
        return self._cur.rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(self._sql(sql), rows)

    def fetchall(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self._cur.execute(self._sql(sql), params)
        return list(self._cur.fetchall())


def _captured(row: Sequence[Any]) -> Captured:
    request_id, item, captured_at, route, version, prediction, probabilities, image, label = row
    return Captured(
        request_id, int(item), float(captured_at), route, version, int(prediction),
        np.frombuffer(bytes(probabilities), dtype="<f4").copy(),
        np.frombuffer(bytes(image), dtype=np.uint8).reshape(28, 28).copy(),
        None if label is None else int(label),
    )


def _pixels(digits: np.ndarray) -> np.ndarray:
    """Digits as the uint8 images the model saw; float pixel units (the v2 door) rounded into 0-255."""
    return digits if digits.dtype == np.uint8 else np.clip(np.rint(digits), 0, 255).astype(np.uint8)


def as_batches(entries: Sequence[Entry]) -> list[Batch]:
    """Requests' captures as Batches, one per route and version, in their order."""
    groups: dict[tuple[str, str], list[Entry]] = {}
    for entry in entries:
        groups.setdefault((entry[1], entry[2]), []).append(entry)
    return [_batch(route, version, group) for (route, version), group in groups.items()]


def _batch(route: str, version: str, entries: list[Entry]) -> Batch:
    """Converted a batch at a time (each column in a few numpy calls): the writer thread holds the GIL,
    which the event loop needs, for as little work per image as can be."""
    # Joined as bytes, not concatenated as arrays: numpy's tobytes() of a fresh megabyte-sized array cost
    # four times as much again (a second large allocation, written page by page).
    images = b"".join([_pixels(entry[3]).tobytes() for entry in entries])
    probs = np.ascontiguousarray(np.concatenate([entry[4] for entry in entries]), dtype="<f4")
    sizes = np.fromiter((len(entry[3]) for entry in entries), np.int64, len(entries))
    if len(sizes) == len(probs):  # one image per request, the usual case
        request_ids = [entry[0] for entry in entries]
        items = np.zeros(len(probs), np.int64)
    else:
        request_ids = [entry[0] for entry in entries for _ in range(len(entry[3]))]
        items = np.arange(len(probs)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    micros = np.repeat(np.fromiter((entry[5] for entry in entries), np.float64, len(entries)) * 1e6, sizes)
    return Batch(route, version, request_ids, _digits(items, ITEM_WIDTH), _digits(np.rint(micros), TIME_WIDTH),
                 _digits(probs.argmax(1), 1), probs.tobytes(), images)


def _digits(values: np.ndarray, width: int) -> bytes:
    """Non-negative integers below 10**width as `width` ASCII digits each, end to end."""
    values = values.astype(np.int64)
    if len(values) and (values.min() < 0 or values.max() >= 10**width):  # would be cut, not stored wrong
        raise ValueError(f"a capture field outside 0 to {10**width - 1}: {values.min()} to {values.max()}")
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % 10 + ord("0")).astype(np.uint8).tobytes()


def as_row(request_id: str, item: int, at: float, route: str, version: str, digit: np.ndarray,
           probs: np.ndarray, label: int | None = None) -> Row:
    """One image and its answer as a row (a labelled example, or a test's), labelled now if `label` is given."""
    probs = np.asarray(probs, dtype="<f4")
    return (request_id, item, at, route, version, int(probs.argmax()), probs.tobytes(), _pixels(digit).tobytes(),
            label, time.time() if label is not None else None)
