"""Every error a caller can see, and the one table that gives each its status.

Errors are raised as :class:`TollwayError` subclasses anywhere in the request
path and turned into OpenAI's envelope ``{"error": {"message", "type",
"param", "code"}}`` in exactly one place (:func:`error_body` and
:func:`spec_for`). A subclass inherits its parent's row unless it has its own,
so adding a new refusal is one class and at most one table line.

Messages must never hold a secret: they go to the caller, the log and the
event stream.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec


class TollwayError(Exception):
    """Base of every error that maps to an HTTP reply."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code  # overrides the table's code when given
        self.headers = headers
        self.status = status  # overrides the table's status (upstream passthrough)


# ---- caller errors (4xx) -----------------------------------------------------
class InvalidRequest(TollwayError):
    """Malformed JSON, wrong types, a missing field, a bad hint header."""


class CostLimitExceeded(InvalidRequest):
    """One call would cost more than the tier's per-call cap."""


class UpstreamRejectedRequest(InvalidRequest):
    """The provider said 4xx about the request itself; its message is passed back."""


class AuthenticationFailed(TollwayError):
    """Missing or unknown API key."""


class PermissionDenied(TollwayError):
    """A valid key that may not do this (admin endpoint, model not allowed)."""


class PolicyForbids(PermissionDenied):
    """Policy refuses the call, e.g. confidential data to a remote provider."""


class NotFound(TollwayError):
    """Unknown route or resource."""


class ModelNotFound(NotFound):
    """`model` is neither a configured model nor a route alias."""


class Conflict(TollwayError):
    """The change conflicts with what exists (an admin change: the tenant exists already)."""


class MethodNotAllowed(TollwayError):
    pass


class BodyTooLarge(TollwayError):
    pass


class RequestTimeout(TollwayError):
    """The client sent the request headers or body too slowly ([server] *_timeout_s)."""


class UrlTooLong(TollwayError):
    """The request target is over [server] max_url_bytes."""


class HeadersTooLarge(TollwayError):
    """The request head is over [server] max_header_bytes or max_headers."""


class RateLimited(TollwayError):
    """The tenant's own rate limit (never a provider's 429)."""


class QuotaExceeded(TollwayError):
    """The tenant's daily budget is spent."""


# ---- upstream and gateway errors (5xx) ---------------------------------------
class UpstreamError(TollwayError):
    """The provider failed: bad status, broken stream, unreadable reply."""

    # The provider's HTTP status when it sent one: decides whether a retry can help.
    upstream_status: int | None = None


class UpstreamConnectFailed(UpstreamError):
    """No connection (refused, DNS, reset before any reply)."""


class UpstreamRateLimited(UpstreamError):
    """A provider's 429: the gateway's quota there, not the caller's."""


class UpstreamUnavailable(UpstreamError):
    """Nothing could serve the call right now (every breaker open, 503s)."""


class UpstreamTimeout(UpstreamError):
    pass


class NotReady(TollwayError):
    pass


class TooManyConnections(TollwayError):
    """More client connections are open than [server] max_connections."""


class InternalError(TollwayError):
    pass


class ErrorSpec(NamedTuple):
    status: int
    type: str
    code: str | None


# The one table: exception class -> (HTTP status, envelope type, default code).
ERROR_TABLE: dict[type[BaseException], ErrorSpec] = {
    InvalidRequest: ErrorSpec(400, "invalid_request_error", None),
    CostLimitExceeded: ErrorSpec(400, "invalid_request_error", "cost_limit_exceeded"),
    UpstreamRejectedRequest: ErrorSpec(400, "invalid_request_error", None),
    AuthenticationFailed: ErrorSpec(401, "authentication_error", "invalid_api_key"),
    PermissionDenied: ErrorSpec(403, "permission_error", "permission_denied"),
    PolicyForbids: ErrorSpec(403, "permission_error", "policy_forbids"),
    NotFound: ErrorSpec(404, "invalid_request_error", "not_found"),
    ModelNotFound: ErrorSpec(404, "invalid_request_error", "model_not_found"),
    MethodNotAllowed: ErrorSpec(405, "invalid_request_error", "method_not_allowed"),
    Conflict: ErrorSpec(409, "invalid_request_error", "conflict"),
    RequestTimeout: ErrorSpec(408, "invalid_request_error", "request_timeout"),
    BodyTooLarge: ErrorSpec(413, "invalid_request_error", "request_too_large"),
    UrlTooLong: ErrorSpec(414, "invalid_request_error", "url_too_long"),
    HeadersTooLarge: ErrorSpec(431, "invalid_request_error", "headers_too_large"),
    RateLimited: ErrorSpec(429, "rate_limit_error", "rate_limit_exceeded"),
    QuotaExceeded: ErrorSpec(429, "insufficient_quota", "insufficient_quota"),
    UpstreamError: ErrorSpec(502, "upstream_error", "upstream_error"),
    UpstreamConnectFailed: ErrorSpec(502, "upstream_error", "upstream_connect_failed"),
    UpstreamRateLimited: ErrorSpec(503, "upstream_error", "upstream_rate_limited"),
    UpstreamUnavailable: ErrorSpec(503, "upstream_error", "upstream_unavailable"),
    UpstreamTimeout: ErrorSpec(504, "upstream_error", "upstream_timeout"),
    NotReady: ErrorSpec(503, "api_error", "not_ready"),
    TooManyConnections: ErrorSpec(503, "api_error", "too_many_connections"),
    InternalError: ErrorSpec(500, "api_error", "internal_error"),
    msgspec.ValidationError: ErrorSpec(400, "invalid_request_error", None),
    msgspec.DecodeError: ErrorSpec(400, "invalid_request_error", "invalid_json"),
}

_INTERNAL = ERROR_TABLE[InternalError]


def spec_for(exc: BaseException) -> ErrorSpec:
    """The table row for ``exc`` (nearest class in its MRO); 500 when unknown."""
    for cls in type(exc).__mro__:
        spec = ERROR_TABLE.get(cls)
        if spec is not None:
            if isinstance(exc, TollwayError) and (exc.status is not None or exc.code):
                return ErrorSpec(exc.status or spec.status, spec.type, exc.code or spec.code)
            return spec
    return _INTERNAL


class ErrorDetail(msgspec.Struct, omit_defaults=False):
    """Why the call was refused; `code` is stable, `message` is for people."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(msgspec.Struct):
    """OpenAI's error envelope: every error tollway answers has this body."""

    error: ErrorDetail


_encode = msgspec.json.Encoder().encode


def public_message(exc: BaseException) -> str:
    """What the caller may read: our own messages, never a stray exception's text."""
    if isinstance(exc, TollwayError):
        return exc.message
    if isinstance(exc, msgspec.MsgspecError):
        return str(exc)
    return "internal error"


def error_body(exc: BaseException) -> tuple[int, bytes]:
    """(status, envelope JSON) for any exception."""
    spec = spec_for(exc)
    param = exc.param if isinstance(exc, TollwayError) else None
    detail = ErrorDetail(message=public_message(exc), type=spec.type, param=param, code=spec.code)
    return spec.status, _encode(ErrorEnvelope(error=detail))


def envelope(status: int, message: str, type_: str, code: str | None = None) -> bytes:
    """An envelope for errors that are not exceptions (e.g. Starlette's 404/405)."""
    detail = ErrorDetail(message=message, type=type_, param=None, code=code)
    return _encode(ErrorEnvelope(error=detail))
