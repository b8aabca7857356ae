"""Public endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway._version import __version__
from tollway.gateway import Gateway
from tollway.metrics import CONTENT_TYPE


class Health(msgspec.Struct):
    """The process answers."""

    status: Literal["ok"]
    version: str


class Readiness(msgspec.Struct, omit_defaults=True):
    """Whether this process can serve calls: NATS reachable, projections caught up."""

    status: Literal["ready", "not ready"]
    reasons: list[str] = []


_encode = msgspec.json.Encoder().encode


def _json(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(_encode(body), status, media_type="application/json")


def routes(gateway: Gateway) -> list[Route]:
    async def health(request: Request) -> Response:
        return _json(Health(status="ok", version=__version__))

    async def ready(request: Request) -> Response:
        reasons = await gateway.not_ready_reasons()
        if reasons:
            return _json(Readiness(status="not ready", reasons=reasons), 503)
        return _json(Readiness(status="ready"))

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), headers={"content-type": CONTENT_TYPE})

    return [
        Route("/api/ai/health", health, methods=["GET"]),
        Route("/api/ai/ready", ready, methods=["GET"]),
        Route("/api/ai/metrics", metrics, methods=["GET"]),
    ]
