"""Per-request state shared by the middleware, the pipeline and the log line.

One :class:`RequestInfo` is created by the request-context middleware for every
HTTP request and stored in the ASGI scope; the auth middleware sets the
principal, the pipeline fills in what it learns (model, provider, tokens,
cost, upstream wait), and the middleware reads it back for the
``X-Tollway-Overhead-Ms`` header and the one JSON log line.
"""

from __future__ import annotations

import itertools
import os
from contextvars import ContextVar
from typing import Any

from tollway.auth import Principal

SCOPE_KEY = "tollway.info"
CYCLE_KEY = "tollway.cycle"  # uvicorn's response cycle, set by tollway.protocol

# The request id of the request being served, for every log line it causes.
request_id_var: ContextVar[str] = ContextVar("tollway_request_id", default="")

_id_format = ""
_id_count = itertools.count()


def _new_id_prefix() -> None:
    global _id_format, _id_count
    _id_format = os.urandom(8).hex() + "%016x"
    _id_count = itertools.count()


def new_request_id() -> str:
    """A request id for a request that brings none: 32 hex digits, a random 64-bit prefix
    per process and a counter (unique, as the 128 random bits it replaces were; one
    ``getrandom`` per process, not per request). A forked child draws its own prefix."""
    return _id_format % next(_id_count)


_new_id_prefix()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_prefix)


class RequestInfo:
    __slots__ = (
        "client_cancelled",
        "completion_tokens",
        "cost_usd",
        "error",
        "model",
        "principal",
        "prompt_tokens",
        "provider",
        "reason",
        "request_id",
        "route",
        "status",
        "stream",
        "t0",
        "upstream_s",
    )

    def __init__(self, request_id: str, t0: float) -> None:
        self.request_id = request_id
        self.t0 = t0  # perf_counter at arrival
        self.upstream_s = 0.0  # time spent waiting on providers
        self.principal: Principal | None = None
        self.route = ""
        self.model = ""
        self.provider = ""
        self.status = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd: float | None = None
        self.reason = ""
        self.error = ""
        self.stream = False
        self.client_cancelled = False

    @property
    def tenant_id(self) -> str:
        return self.principal.tenant_id if self.principal is not None else ""


def info_of(scope: dict[str, Any]) -> RequestInfo:
    info: RequestInfo = scope[SCOPE_KEY]
    return info
