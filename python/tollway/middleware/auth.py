"""Authentication: deny by default, with an explicit list of public paths.

Every path needs a key except those in :data:`tollway.auth.PUBLIC_PATHS`, so
a new route cannot be left open by accident. Admin paths need the admin key.
The presented key is never logged or echoed.
"""

from __future__ import annotations

import math
from typing import Any

from tollway.asgi import Receive, Scope, Send, route_path, send_error
from tollway.auth import (
    ADMIN_PREFIXES,
    PUBLIC_PATHS,
    ClientAddress,
    KeyIndex,
    Principal,
    SignInThrottle,
    bearer,
    key_in_query,
)
from tollway.context import SCOPE_KEY, RequestInfo
from tollway.errors import AuthenticationFailed, PermissionDenied, RateLimited, TollwayError
from tollway.metrics import Metrics
from tollway.pipeline.anthropic import send_anthropic_error

# Anthropic's API: its clients read its error shape, and send the key as x-api-key.
_ANTHROPIC_PATHS = frozenset({"/api/ai/v1/messages", "/api/ai/v1/messages/count_tokens"})

_CHALLENGE = [(b"www-authenticate", b'Bearer realm="tollway"')]


class AuthMiddleware:
    def __init__(self, app: Any, keys: KeyIndex, metrics: Metrics,
                 throttle: SignInThrottle | None = None,
                 client_address: ClientAddress | None = None) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.throttle = throttle or SignInThrottle()
        self.client_address = client_address or ClientAddress()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Before the public paths: a key in a URL has leaked wherever the URL goes.
        if scope["type"] == "http" and scope["query_string"]:
            param = key_in_query(scope["query_string"], self.keys)
            if param is not None:
                self.metrics.rejections.inc(("key_in_query",))
                await send_error(send, AuthenticationFailed(
                    f"API keys are not accepted in the URL (query parameter {param!r}): send "
                    "it as 'Authorization: Bearer <key>', and replace the key, since URLs "
                    "are logged", code="key_in_query", param=param), _CHALLENGE)
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Under a mount prefix the public and admin paths are those after it.
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        if path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        found: Principal | BaseException
        if path.startswith(ADMIN_PREFIXES):
            found = self._admin_sign_in(scope)
        else:
            found = self._sign_in(scope)
        if isinstance(found, Principal) and found.refusal is not None:
            # a directory key: revoked, expired, of a disabled tenant
            self.metrics.rejections.inc((getattr(found.refusal, "code", None)
                                         or "invalid_api_key",))
            found = found.refusal
        if not isinstance(found, Principal):
            refuse = (send_anthropic_error if path in _ANTHROPIC_PATHS
                      else send_error)
            await refuse(send, found, _CHALLENGE if isinstance(
                found, AuthenticationFailed) else None)
            return
        info: RequestInfo = scope[SCOPE_KEY]
        info.principal = found
        await self.app(scope, receive, send)

    def _sign_in(self, scope: Scope) -> Principal | TollwayError:
        """The caller's principal, or the refusal to send."""
        auth = None
        api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
                break
            if name == b"x-api-key":  # Anthropic's clients send the key so
                api_key = value
        key = bearer(auth) if auth is not None else _plain(api_key)
        if key is None:
            self.metrics.rejections.inc(("missing_api_key",))
            return AuthenticationFailed(
                "missing API key: send it as 'Authorization: Bearer <key>' (or x-api-key)",
                code="missing_api_key")
        principal = self.keys.resolve(key)
        if principal is None:
            self.metrics.rejections.inc(("invalid_api_key",))
            return AuthenticationFailed("invalid API key")
        return principal

    def _admin_sign_in(self, scope: Scope) -> Principal | TollwayError:
        """:meth:`_sign_in` for the admin paths: only the admin key passes, and an address
        that keeps failing is refused for a while (:class:`SignInThrottle`)."""
        host = self.client_address(scope.get("client"), scope["headers"])
        wait = self.throttle.retry_after(host)
        if wait > 0:
            self.metrics.rejections.inc(("too_many_failed_sign_ins",))
            return RateLimited(
                "too many failed sign-ins from this address: wait before trying again",
                code="too_many_failed_sign_ins",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        found = self._sign_in(scope)
        if not isinstance(found, Principal):
            self.throttle.failed(host)
            return found
        if not found.admin:  # a valid tenant key: not a guess at the admin key
            self.metrics.rejections.inc(("admin_required",))
            return PermissionDenied("this endpoint needs the admin key", code="admin_required")
        return found


def _plain(value: bytes | None) -> str | None:
    """The key of an ``x-api-key`` header value (the key alone), else None."""
    return bearer(b"Bearer " + value) if value else None
