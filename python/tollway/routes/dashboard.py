"""The operators' dashboard (``GET /api/ai/dashboard``) and the live tail it reads.

The page and its two assets ship in the package (``tollway/dashboard/``): no build
step, nothing from another origin. They are public, like health: they hold no data;
the page asks for the admin key and reads everything through the admin API with it.
A strict Content-Security-Policy keeps the page to its own scripts and this origin.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.errors import InvalidRequest, NotReady, error_body
from tollway.events.projections import recent
from tollway.gateway import Gateway

PAGE = "/api/ai/dashboard"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


class Tail(msgspec.Struct):
    """The newest events after ``after`` (stream sequence), oldest first: each its
    ``seq``, ``type``, ``occurred_at``, ``tenant`` and a few fields (never a key or a
    key's hash)."""

    object: Literal["list"]
    data: list[dict[str, Any]]
    last_seq: int


def _asset(name: str) -> bytes:
    return resources.files("tollway").joinpath(f"dashboard/{name}").read_bytes()


def routes(gateway: Gateway) -> list[Route]:
    files = {name: _asset(name) for name in ("index.html", *ASSETS)}

    async def page(request: Request) -> Response:
        return Response(files["index.html"], media_type="text/html; charset=utf-8",
                        headers=_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.url.path.rsplit("/", 1)[-1]
        return Response(files[name], media_type=ASSETS[name], headers=_HEADERS)

    async def tail(request: Request) -> Response:
        try:
            q = request.query_params
            try:
                after = int(q.get("after", "0"))
                limit = int(q.get("limit", "100"))
            except ValueError:
                raise InvalidRequest("after and limit are integers", param="after") from None
            if after < 0 or not 1 <= limit <= recent.KEEP:
                raise InvalidRequest(f"after >= 0 and 1 <= limit <= {recent.KEEP}",
                                     param="limit")
            svc = gateway.events
            if svc is None:
                raise NotReady("the event stream is off ([nats] enabled = false)",
                               code="events_disabled")
            view: recent.RecentView = svc.projection("recent").view
            body = {"object": "list", "data": recent.query(view, after, limit),
                    "last_seq": view.last_seq}
            return Response(msgspec.json.encode(body), media_type="application/json")
        except Exception as exc:
            status, err = error_body(exc)
            return Response(err, status, media_type="application/json")

    return [
        Route(PAGE, page, methods=["GET"]),
        *(Route(f"{PAGE}/{name}", asset, methods=["GET"]) for name in ASSETS),
        Route("/api/ai/admin/events", tail, methods=["GET"]),
    ]
