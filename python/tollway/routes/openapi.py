"""GET /api/ai/openapi.json: tollway's own OpenAPI document (public, like health)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.openapi.document import build, encoded
from tollway.openapi.operations import OPENAPI_PATH


def routes() -> list[Route]:
    body = encoded()  # the same for every config and request: built once
    # Mounted under a prefix (root_path), the document names it as its server, so clients
    # and tools built from it call the paths under the prefix. One body per prefix seen.
    mounted: dict[str, bytes] = {}

    async def document(request: Request) -> Response:
        root = request.scope.get("root_path") or ""
        if not root or root == "/":
            return Response(body, media_type="application/json")
        served = mounted.get(root)
        if served is None:
            doc = build()
            doc["servers"] = [{"url": root, "description": "where this gateway is mounted"}]
            served = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
            if len(mounted) < 16:  # a host has a few mounts; never grow without bound
                mounted[root] = served
        return Response(served, media_type="application/json")

    return [Route(OPENAPI_PATH, document, methods=["GET"])]
