"""The capture database: one table of captured predictions, in a SQLite file or in PostgreSQL.

CAPTURE_DATABASE names it: a path or `sqlite:///path` (WAL mode with a busy timeout, so every
worker process of a server can write the same file), or `postgresql://user:password@host/db` for
several pods. A CaptureStore is one connection, opened on first use and again after a failure;
every method blocks, so the server calls them from a thread, never on its event loop.

One row per image: the request id and the image's place in the request (`item`), when, the route,
the version that answered, its prediction and probabilities (10 little-endian float32), the 28x28
uint8 image the model saw (784 bytes, never the upload), and the label once someone gives one.

Rows go in a batch at a time as one statement, `INSERT ... SELECT` over a JSON array of the small
fields and two byte strings (every row's probabilities, every row's image) cut by row number in SQL.
The serving workers' writer threads share their process's GIL with the event loop: executemany
binds each row in Python and hands the GIL back and forth around every row's step (two handoffs per
image, each a wait for the event loop), while one statement runs its whole batch with the GIL
released. Measured in docs/ground-truth.md#what-it-costs.
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
# A row's small fields: request_id, item, captured_at, route, version, prediction, label, labelled_at.
Fields = tuple[str, int, float, str, str, int, int | None, float | None]


@dataclass(frozen=True)
class Batch:
    """Rows on their way in, column-wise: the small fields per row, and every row's probabilities
    (10 little-endian float32 each) and image (784 bytes each) end to end."""

    fields: list[Fields]
    probabilities: bytes
    images: bytes

    @classmethod
    def of(cls, rows: Sequence[Row]) -> Batch:
        return cls([(r[0], r[1], r[2], r[3], r[4], r[5], r[8], r[9]) for r in rows],
                   b"".join(r[6] for r in rows), b"".join(r[7] for r in rows))

BUSY_TIMEOUT_S = 5.0  # SQLite: how long a writer waits for another process's write lock
CONNECT_TIMEOUT_S = 3  # PostgreSQL: a database that is down fails fast, and capture retries later
RETENTION_CHUNK = 5000  # rows deleted per transaction, so retention never holds the write lock long

_SELECT = "SELECT request_id, item, captured_at, route, version, prediction, probabilities, image, label FROM captures"
# Row k of a Batch: fields[k] from the JSON array, bytes 40k.. of the probabilities and 784k.. of the images.
_INSERT_SQLITE = (
    "INSERT INTO captures (request_id, item, captured_at, route, version, prediction, label, labelled_at, "
    "probabilities, image) "
    "SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, "
    "value->>6, value->>7, substr(?, 40 * key + 1, 40), substr(?, 784 * key + 1, 784) FROM json_each(?) "
    "WHERE true ON CONFLICT (request_id, item) DO NOTHING"  # WHERE: SQLite's parser needs it before ON CONFLICT
)
_INSERT_POSTGRES = (
    "INSERT INTO captures (request_id, item, captured_at, route, version, prediction, label, labelled_at, "
    "probabilities, image) "
    "SELECT f->>0, (f->>1)::int, (f->>2)::float8, f->>3, f->>4, (f->>5)::int, "
    "(f->>6)::int, (f->>7)::float8, substr(?::bytea, (40 * n - 39)::int, 40), substr(?::bytea, (784 * n - 783)::int, "
    "784) FROM jsonb_array_elements(?::jsonb) WITH ORDINALITY AS t(f, n) ON CONFLICT (request_id, item) DO NOTHING"
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
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
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

    def insert(self, rows: Batch | Sequence[Row]) -> None:
        """Add captures in one statement; an id stored already (a client reusing X-Request-ID) keeps its first row."""
        batch = rows if isinstance(rows, Batch) else Batch.of(rows)
        if not batch.fields:
            return
        fields = json.dumps(batch.fields, ensure_ascii=False, allow_nan=False)
        with self.transaction() as cur:
            cur.execute(_INSERT_SQLITE if self.path is not None else _INSERT_POSTGRES,
                        (batch.probabilities, batch.images, fields))

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


def as_rows(entries: Sequence[Entry]) -> Batch:
    """Requests' captures as one Batch, converted a batch at a time (one concatenation, one argmax):
    the writer thread holds the GIL, which the event loop needs, for as little work per image as can be."""
    images = _pixels(np.concatenate([entry[3] for entry in entries])).tobytes()
    probs = np.ascontiguousarray(np.concatenate([entry[4] for entry in entries]), dtype="<f4")
    predictions = probs.argmax(1).tolist()
    fields: list[Fields] = []
    for request_id, route, version, digits, _, at in entries:
        for item in range(len(digits)):
            fields.append((request_id, item, at, route, version, predictions[len(fields)], None, None))
    return Batch(fields, probs.tobytes(), images)


def as_row(request_id: str, item: int, at: float, route: str, version: str, digit: np.ndarray,
           probs: np.ndarray, label: int | None = None) -> Row:
    """One image and its answer as a row (a labelled example, or a test's), labelled now if `label` is given."""
    probs = np.asarray(probs, dtype="<f4")
    return (request_id, item, at, route, version, int(probs.argmax()), probs.tobytes(), _pixels(digit).tobytes(),
            label, time.time() if label is not None else None)
