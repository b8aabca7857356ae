"""Outermost middleware: request id, timing headers, the access log line, last-resort errors.

For every HTTP request it creates the :class:`RequestInfo` the rest of the
stack fills in, accepts a sane ``X-Request-ID`` or makes one, and adds
``X-Request-ID`` and ``X-Tollway-Overhead-Ms`` (time in the gateway minus
time waiting on providers, up to the response headers) to every response.
An exception that escapes the app becomes a 500 in OpenAI's envelope, and
is logged with its traceback; its text never reaches the caller.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from tollway.asgi import Message, Receive, Scope, Send, route_path, send_error
from tollway.context import SCOPE_KEY, RequestInfo, new_request_id, request_id_var
from tollway.errors import InternalError
from tollway.logs import log_request
from tollway.metrics import Metrics

log = logging.getLogger("tollway.http")

_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _VALID_ID.fullmatch(value):
                return bytes(value).decode("ascii")
            break
    return new_request_id()


class RequestContextMiddleware:
    def __init__(self, app: Any, metrics: Metrics, known_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = _request_id(scope)
        info = RequestInfo(rid, t0)
        scope[SCOPE_KEY] = info
        token = request_id_var.set(rid)
        rid_header = (b"x-request-id", rid.encode())
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                info.status = message["status"]
                overhead = (time.perf_counter() - t0 - info.upstream_s) * 1000.0
                message["headers"] = [
                    *message.get("headers", ()), rid_header,
                    (b"x-tollway-overhead-ms", b"%.3f" % max(overhead, 0.0)),
                ]
            await send(message)

        metrics = self.metrics
        metrics.in_flight.value += 1
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log.error("unhandled error", exc_info=exc)
            info.error = "internal_error"
            if not started:
                await send_error(send_with_headers, InternalError("internal error"))
        finally:
            metrics.in_flight.value -= 1
            path = scope["path"]
            if info.status == 0:
                info.status = 500 if not started else info.status
            routed = route_path(scope) if scope.get("root_path") else path
            metrics.http_requests.inc(
                (routed if routed in self.known_paths else "other", str(info.status)))
            log_request(info, scope["method"], path, time.perf_counter())
            request_id_var.reset(token)
