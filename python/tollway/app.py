"""The Starlette app factory.

``create_app(config)`` builds one :class:`Gateway` (validating everything it
can before the first request), composes the pure ASGI middleware in one
list and the optional layers in another (:data:`LAYERS`), and hands the
gateway's start and stop to the app's lifespan. Nothing lives in module
globals, so several apps can run in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tollway.asgi import route_path
from tollway.auth import ClientAddress, SignInThrottle
from tollway.cache import wiring as cache
from tollway.clock import Clock
from tollway.config import Config, default_config
from tollway.errors import envelope
from tollway.events import wiring as events
from tollway.gateway import Gateway
from tollway.middleware import AuthMiddleware, RequestContextMiddleware
from tollway.record import Recorder
from tollway.routes import admin, dashboard, directory, health, openai, tools
from tollway.routes import openapi as openapi_document
from tollway.shadow import wiring as shadow
from tollway.tracing import tracing_lifespan


@dataclass(frozen=True, slots=True)
class Layer:
    """An optional part of the app: a lifespan that attaches it to the gateway (and does
    nothing when the config leaves it off), and its routes."""

    name: str
    lifespan: Callable[[Gateway], AbstractAsyncContextManager[None]]
    routes: Callable[[Gateway], list[BaseRoute]]


# Started in this order inside the gateway's lifespan, stopped in reverse: shadow mode
# publishes through the events layer, so events are up first and stop last; tracing is
# up before any of them and stops after them, so its last flush holds every call's span.
LAYERS: tuple[Layer, ...] = (
    Layer("tracing", tracing_lifespan, lambda gateway: []),  # OpenTelemetry ([tracing])
    Layer("events", events.events_lifespan, events.routes),  # NATS, usage, budget
    Layer("shadow", shadow.shadow_lifespan, shadow.routes),  # shadow calls, A/B split
    Layer("cache", cache.cache_lifespan, lambda gateway: []),  # the response cache
)


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


class GatewayApp(Starlette):
    """Starlette, with the calls a gateway serves most taken straight to their handler.

    A POST to one of ``direct`` (path -> handler) goes through the gateway's own two
    middleware (request context, auth) to its handler, past Starlette's error layers and
    router: the request-context middleware already turns any exception into the 500
    envelope, the handlers raise no ``HTTPException``, and the path was matched by one
    dict lookup (the path after the mount prefix, when the app is mounted in another).
    Everything else (other methods, other paths) takes the full stack.

    Mounted in a host app (Starlette's ``Mount``, FastAPI's ``app.mount``), the app's own
    lifespan does not run: the host runs :meth:`lifespan`, e.g.
    ``Starlette(routes=[Mount("/svc", app=gateway_app)], lifespan=gateway_app.lifespan)``,
    or enters it inside its own lifespan."""

    def __init__(self, *args: Any, gateway: Gateway, direct: Mapping[str, ASGIApp],
                 **kwargs: Any) -> None:
        self.gateway = gateway
        self.direct = dict(direct)
        kwargs["lifespan"] = self.lifespan
        super().__init__(*args, **kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return _Direct(super().build_middleware_stack(), self.direct)

    def lifespan(self, app: object = None) -> AbstractAsyncContextManager[dict[str, Any]]:
        """Start the gateway (providers, NATS, publisher, projections, shadow mode) and stop
        it on exit; a host app passes this as its own ``lifespan`` or enters it in its own.
        ``app`` (the app whose lifespan it is) is not used. The state it yields holds the
        gateway as ``"tollway"``."""
        return _state(running(self.gateway))


@asynccontextmanager
async def _state(run: AbstractAsyncContextManager[Gateway]) -> AsyncIterator[dict[str, Any]]:
    async with run as gateway:
        yield {"tollway": gateway}


@asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[Gateway]:
    """The gateway started with its optional layers (:data:`LAYERS`), stopped on exit.

    Entered again while it runs (an app mounted in a host whose lifespan runs it, and the
    in-process API over the same gateway), it yields the running gateway and leaves its
    stop to the first entry."""
    if gateway.running:
        yield gateway
        return
    gateway.running = True
    try:
        await gateway.start()
        try:
            async with AsyncExitStack() as layers:
                for layer in LAYERS:
                    await layers.enter_async_context(layer.lifespan(gateway))
                yield gateway
        finally:
            await gateway.stop()
    finally:
        gateway.running = False


class _Direct:
    __slots__ = ("app", "paths")

    def __init__(self, app: ASGIApp, paths: dict[str, ASGIApp]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.paths.get(route_path(scope) if scope.get("root_path")
                                     else scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    config: Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
    recorder: Recorder | None = None,
    clock: Clock | None = None,
) -> GatewayApp:
    """The gateway as an ASGI app. Raises ConfigError when it cannot be fully configured.

    It serves at the root or mounted under any prefix; mounted, the host app runs its
    :meth:`GatewayApp.lifespan` (see the class)."""
    gateway = Gateway(config or default_config(env=env), env=env, recorder=recorder,
                      clock=clock)
    return app_of(gateway)


def app_of(gateway: Gateway) -> GatewayApp:
    """The HTTP API over an existing gateway (``tollway.Gateway.app`` serves its own)."""
    routes: list[BaseRoute] = [
        *openai.routes(gateway),  # first: the router tries routes in order
        *health.routes(gateway),
        *openapi_document.routes(),
        *admin.routes(gateway),
        *directory.routes(gateway),
        *tools.routes(gateway),
        *dashboard.routes(gateway),
        *(route for layer in LAYERS for route in layer.routes(gateway)),
    ]
    known = frozenset(r.path for r in routes if isinstance(r, Route) and "{" not in r.path)
    middleware = [
        Middleware(RequestContextMiddleware, metrics=gateway.metrics, known_paths=known),
        Middleware(AuthMiddleware, keys=gateway.keys, metrics=gateway.metrics,
                   throttle=SignInThrottle(
                       gateway.config.server.admin_sign_in_failures_per_minute),
                   client_address=ClientAddress(gateway.config.server.trusted_proxies)),
    ]

    def wrapped(handler: ASGIApp) -> ASGIApp:  # the list above, without Starlette's layers
        for m in reversed(middleware):
            handler = m.cls(handler, *m.args, **m.kwargs)
        return handler

    app = GatewayApp(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception},
        gateway=gateway,
        direct={path: wrapped(handler) for path, handler in openai.direct(gateway).items()},
    )
    app.state.gateway = gateway
    return app
