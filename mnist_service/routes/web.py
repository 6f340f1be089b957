"""The web page at GET /: draw or drop a digit and see what the model thinks."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["web"])
