"""Operator endpoints (admin key; enforced by the auth middleware)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tollway.errors import NotFound, error_body
from tollway.gateway import Gateway


def routes(gateway: Gateway) -> list[Route]:
    async def providers(request: Request) -> Response:
        out = []
        for provider in gateway.providers.values():
            item = provider.describe()
            item["models"] = [d.model for d in gateway.catalog.models.values()
                              if d.provider == provider.name]
            item["breaker"] = gateway.breakers.info(provider.name)
            item.update(gateway.latency.describe(provider.name))
            item["deployments"] = gateway.latency.describe_keys(
                {d.model: d for d in gateway.catalog.models.values()
                 if d.provider == provider.name})
            out.append(item)
        return JSONResponse({"object": "list", "data": out})

    async def test_provider(request: Request) -> Response:
        name = request.path_params["name"]
        provider = gateway.providers.get(name)
        if provider is None:
            status, body = error_body(NotFound(f"no provider named {name!r}"))
            return Response(body, status, media_type="application/json")
        result = await provider.test_connection()
        return JSONResponse(result)

    return [
        Route("/api/ai/providers", providers, methods=["GET"]),
        Route("/api/ai/providers/{name}/test", test_provider, methods=["POST"]),
    ]
