"""FastAPI with a direct path to the upload routes, past the framework's per-request layers.

A POST to /predict crosses, in FastAPI: its app and Starlette's, ServerErrorMiddleware, our
middleware, ExceptionMiddleware, the router (which matches the path against route after route),
the route's request handler (dependency solving, an AsyncExitStack) and then the endpoint. The
upload endpoints take only the Request and do by hand what dependency injection would, so all
they need of that is our middleware and the mapping of their errors to answers. A py-spy profile
of a worker at 128 concurrent uploads put the layers in between at about a third of its samples;
skipping them cut the server's CPU per upload by about a fifth (benchmarks/profile.md).

`ServiceApp.serve_directly(router, path, ...)` sends POSTs to those routes through the app's own
user middleware (the same classes, options and order as every other request) and Starlette's
ExceptionMiddleware with the app's own exception handlers, straight to the endpoint. Everything
else (other routes and methods, trailing slashes, a root path, lifespan) takes FastAPI's way
unchanged, and the routes stay registered, so OpenAPI describes them as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


class ServiceApp(FastAPI):
    """FastAPI, plus direct dispatch of POSTs to the routes named with `serve_directly`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct_routes: dict[str, APIRoute] = {}
        self._direct_stack: ASGIApp | None = None  # built on first use, once every middleware is added

    def serve_directly(self, router: APIRouter, *paths: str) -> None:
        """Dispatch POSTs to these routes of `router` (included without a prefix) directly.

        Each endpoint must be `async def endpoint(request: Request) -> Response` with no dependencies.
        """
        for path in paths:
            route = next(
                (r for r in router.routes if isinstance(r, APIRoute) and r.path == path and "POST" in r.methods), None
            )
            if route is None:
                raise ValueError(f"no POST route {path!r} to serve directly")
            parameters = list(inspect.signature(route.endpoint).parameters.values())
            takes_request = len(parameters) == 1 and parameters[0].annotation in (Request, "Request")
            if not takes_request or route.dependencies or not inspect.iscoroutinefunction(route.endpoint):
                raise ValueError(f"{path}: only an async endpoint taking just the Request can skip the router")
            self._direct_routes[path] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._direct_routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST" or scope.get("root_path") or self.root_path:
            await super().__call__(scope, receive, send)
            return
        # What Starlette and the router would have put in the scope on the way.
        scope["app"] = self
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        if self._direct_stack is None:
            self._direct_stack = self._build_direct_stack()
        await self._direct_stack(scope, receive, send)

    def _build_direct_stack(self) -> ASGIApp:
        # As Starlette's build_middleware_stack, less the router: the user middleware around
        # ExceptionMiddleware with the app's handlers. Those for 500 and Exception belong to
        # ServerErrorMiddleware, which the direct path leaves to our own middleware.
        handlers = {k: v for k, v in self.exception_handlers.items() if k not in (500, Exception)}

        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            call: Callable[[Request], Awaitable[Response]] = scope["route"].endpoint
            response = await call(Request(scope, receive, send))
            await response(scope, receive, send)

        app: ASGIApp = ExceptionMiddleware(endpoint, handlers=handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app
