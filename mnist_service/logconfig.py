"""Logging, configured once by each entry point: one line per event, key=value, to stderr."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(),
        # The pid tells the workers apart: which one logged an error, which one died.
        format="%(asctime)s %(levelname)s %(process)d %(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
