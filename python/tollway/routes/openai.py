"""The OpenAI-compatible API under /api/ai/v1."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.asgi import Receive, Scope, Send
from tollway.context import SCOPE_KEY, RequestInfo
from tollway.errors import PermissionDenied, TollwayError, error_body
from tollway.gateway import Gateway
from tollway.pipeline import anthropic

PREFIX = "/api/ai/v1"
log = logging.getLogger(__name__)


class _Asgi:
    """Wraps a handler so Starlette routes to it as a plain ASGI app (no Request object)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class Model(msgspec.Struct):
    id: str
    owned_by: str
    object: str = "model"
    created: int = 0


class ModelList(msgspec.Struct):
    """The models and route aliases this tenant may call."""

    data: list[Model]
    object: str = "list"


class AnthropicModel(msgspec.Struct):
    id: str
    display_name: str
    created_at: str  # RFC 3339
    type: str = "model"


class AnthropicModelList(msgspec.Struct):
    """The same list in Anthropic's shape, for a caller that sends ``anthropic-version``
    (Anthropic's SDKs and Claude Code)."""

    data: list[AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


_encode = msgspec.json.Encoder().encode


def direct(gateway: Gateway) -> dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]]:
    """The POST routes the app serves past Starlette's router (:class:`GatewayApp`)."""
    pipeline = gateway.pipeline
    return {f"{PREFIX}/chat/completions": pipeline.chat,
            f"{PREFIX}/completions": pipeline.completions,
            f"{PREFIX}/messages": pipeline.messages,
            f"{PREFIX}/responses": pipeline.responses,
            f"{PREFIX}/embeddings": pipeline.embeddings,
            f"{PREFIX}/rerank": pipeline.rerank}


def routes(gateway: Gateway) -> list[Route]:
    created = int(gateway.started_at)

    async def models(request: Request) -> Response:
        info: RequestInfo = request.scope[SCOPE_KEY]
        principal = info.principal
        if principal is None or principal.tenant is None:
            status, body = error_body(PermissionDenied("this endpoint needs a tenant key"))
            return Response(body, status, media_type="application/json")
        listing = gateway.catalog.listing(principal.tenant)
        if "anthropic-version" in request.headers:
            ids = [mid for mid, _ in listing]
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
            anthropic = AnthropicModelList(
                data=[AnthropicModel(id=mid, display_name=mid, created_at=stamp) for mid in ids],
                has_more=False, first_id=ids[0] if ids else None,
                last_id=ids[-1] if ids else None)
            return Response(_encode(anthropic), media_type="application/json")
        data = [Model(id=mid, owned_by=owner, created=created) for mid, owner in listing]
        return Response(_encode(ModelList(data=data)), media_type="application/json")

    async def count_tokens(request: Request) -> Response:
        """Anthropic's ``POST /v1/messages/count_tokens`` (Claude Code calls it), counted
        here: see :func:`tollway.pipeline.anthropic.count_tokens`."""
        info: RequestInfo = request.scope[SCOPE_KEY]
        principal = info.principal
        try:
            if principal is None or principal.tenant is None:
                raise PermissionDenied("this endpoint needs a tenant key")
            body = anthropic.count_tokens(await request.body(), principal.tenant,
                                          gateway.catalog)
        except Exception as exc:
            if not isinstance(exc, TollwayError):
                log.exception("count_tokens failed")
            else:
                log.info("count_tokens refused: %s", exc.message)
            status, err = anthropic.error_shape(exc)
            return Response(err, status, media_type="application/json")
        return Response(body, media_type="application/json")

    return [
        *(Route(path, _Asgi(handler), methods=["POST"])
          for path, handler in direct(gateway).items()),
        Route(f"{PREFIX}/messages/count_tokens", count_tokens, methods=["POST"]),
        Route(f"{PREFIX}/models", models, methods=["GET"]),
    ]
