"""The Starlette app factory.

``create_app(config)`` builds one :class:`Gateway` (validating everything it
can before the first request), composes the pure ASGI middleware in one
list, and hands the gateway's start and stop to the app's lifespan. Nothing
lives in module globals, so several apps can run in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tollway.clock import Clock
from tollway.config import Config, default_config
from tollway.errors import envelope
from tollway.gateway import Gateway
from tollway.middleware import AuthMiddleware, RequestContextMiddleware
from tollway.record import Recorder
from tollway.routes import admin, health, openai


# ==== BEGIN events wiring ====
@asynccontextmanager
async def events_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    """Start NATS, the publisher and the projections, set ``gateway.recorder``; stop after."""
    from tollway.events.wiring import events_lifespan as run_events

    async with run_events(gateway):
        yield
# ==== END events wiring ====


# ==== BEGIN events routes ====
def events_routes(gateway: Gateway) -> list[BaseRoute]:
    """GET /api/ai/usage and GET /api/ai/budget."""
    from tollway.events.wiring import routes as usage_and_budget

    return usage_and_budget(gateway)
# ==== END events routes ====


# ==== BEGIN shadow wiring ====
@asynccontextmanager
async def shadow_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    """Shadow calls and the A/B split on the pipeline (inside events: they publish events)."""
    from tollway.shadow.wiring import shadow_lifespan as run_shadow

    async with run_shadow(gateway):
        yield


def shadow_routes(gateway: Gateway) -> list[BaseRoute]:
    """GET /api/ai/shadow (admin)."""
    from tollway.shadow.wiring import routes as shadow_report

    return shadow_report(gateway)
# ==== END shadow wiring ====


_HTTP_ERRORS = {
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "method not allowed on this route"),
}


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_ERRORS.get(exc.status_code, ("http_error", str(exc.detail)))
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    body = envelope(exc.status_code, message, "invalid_request_error", code)
    return Response(body, exc.status_code, headers=exc.headers, media_type="application/json")


def create_app(
    config: Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
    recorder: Recorder | None = None,
    clock: Clock | None = None,
) -> Starlette:
    """The gateway as an ASGI app. Raises ConfigError when it cannot be fully configured."""
    gateway = Gateway(config or default_config(env=env), env=env, recorder=recorder,
                      clock=clock)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await gateway.start()
        try:
            async with events_lifespan(gateway), shadow_lifespan(gateway):
                yield {"gateway": gateway}
        finally:
            await gateway.stop()

    routes: list[BaseRoute] = [
        *openai.routes(gateway),  # first: the router tries routes in order
        *health.routes(gateway),
        *admin.routes(gateway),
        *events_routes(gateway),
        *shadow_routes(gateway),
    ]
    known = frozenset(r.path for r in routes if isinstance(r, Route) and "{" not in r.path)
    middleware = [
        Middleware(RequestContextMiddleware, metrics=gateway.metrics, known_paths=known),
        Middleware(AuthMiddleware, keys=gateway.keys, metrics=gateway.metrics),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
