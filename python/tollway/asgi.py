"""Small ASGI helpers shared by the routes and the pipeline (no framework objects)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tollway.errors import BodyTooLarge, TollwayError, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")


def route_path(scope: Scope) -> str:
    """The path the gateway routes on: ``path`` without the ``root_path`` an app mounted
    under a prefix (Starlette's ``Mount``, a FastAPI ``app.mount``) is called with.

    Starlette (0.33 on) keeps the whole path in ``path`` and the prefix in ``root_path``;
    a path that does not start with the prefix is taken as it is (older servers and
    frameworks strip the prefix themselves). The same answer as Starlette's router
    (``starlette._utils.get_route_path``) for every scope, so that auth decides on the
    path that routing serves."""
    path: str = scope["path"]
    root = scope.get("root_path")
    if root and path.startswith(root):
        rest = path[len(root):]
        if not rest or rest[0] == "/":
            return rest
    return path


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


async def read_body(receive: Receive, limit: int, content_length: bytes | None) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes as it arrives."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            declared = 0
        if declared > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        return body
    parts = [body]
    size = len(body)
    while True:
        if size > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    if size > limit:
        raise BodyTooLarge(f"request body is larger than {limit} bytes")
    return b"".join(parts)


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Headers, content_type: tuple[bytes, bytes] = JSON
) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [content_type, (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: BaseException, headers: Headers | None = None) -> int:
    """The OpenAI error envelope for ``exc``; returns the status sent."""
    status, body = error_body(exc)
    extra = list(headers or ())
    if isinstance(exc, TollwayError) and exc.headers:
        extra.extend((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
    await send_bytes(send, status, body, extra)
    return status
