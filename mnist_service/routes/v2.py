"""Open Inference Protocol (v2) endpoints: a thin front door to the same Predictor."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["v2"])
