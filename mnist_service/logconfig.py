"""Logging, configured once by each entry point: one line per event, to stderr.

LOG_FORMAT=text (the default) writes `time LEVEL pid logger message` for people; LOG_FORMAT=json
writes one JSON object per line for a log pipeline, with the request's id and its W3C trace
context (trace_id, span_id from an incoming `traceparent` header) on every line logged while a
request is handled, so the lines join the traces the cluster collects. Image bytes are never
logged, in either format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# What the request being handled is known by; set by the middleware, read by the JSON formatter.
REQUEST_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "request_context", default=None
)
# version-traceid-parentid-flags; all-zero ids are invalid (W3C Trace Context, section 3.2).
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
# LogRecord's own attributes: anything else on a record came in through `extra=` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def trace_context(traceparent: str | None) -> dict[str, str]:
    """trace_id and span_id from a valid traceparent header, else nothing."""
    if not traceparent:
        return {}
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        return {}
    return {"trace_id": match[1], "span_id": match[2]}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, pid, logger, message, the request context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(REQUEST_CONTEXT.get() or {})
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # The pid tells the workers apart: which one logged an error, which one died.
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
