"""GET /api/ai/openapi.json: tollway's own OpenAPI document (public, like health)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.openapi.document import encoded
from tollway.openapi.operations import OPENAPI_PATH


def routes() -> list[Route]:
    body = encoded()  # the same for every config and request: built once

    async def document(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return [Route(OPENAPI_PATH, document, methods=["GET"])]
