"""Public endpoints: liveness, readiness, metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tollway._version import __version__
from tollway.gateway import Gateway
from tollway.metrics import CONTENT_TYPE


def routes(gateway: Gateway) -> list[Route]:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def ready(request: Request) -> Response:
        reasons = await gateway.not_ready_reasons()
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.render(), headers={"content-type": CONTENT_TYPE})

    return [
        Route("/api/ai/health", health, methods=["GET"]),
        Route("/api/ai/ready", ready, methods=["GET"]),
        Route("/api/ai/metrics", metrics, methods=["GET"]),
    ]
