"""The web page at GET /: draw or drop a digit and see what the model thinks.

The page and its assets ship inside the package (mnist_service/serving/static/), so the Docker image and
an installed wheel serve them without a build step or a CDN. They stay out of the OpenAPI schema:
/docs documents the API, and the page is not part of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# 'self' only: the page loads nothing from elsewhere and must work offline. data: is for the
# 28x28 image the model saw, which /predict?debug=1 returns as a base64 PNG.
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new deployment must show its new page, not the one a browser kept from the last model.
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    """StaticFiles that sends the page's security headers with every asset too."""

    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(PAGE_HEADERS)
        return response


router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The drawing page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


router.mount("/static", _Assets(directory=STATIC_DIR), name="static")
