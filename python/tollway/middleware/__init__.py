"""Pure ASGI middleware, one class per module, composed in ``tollway.app``."""

from tollway.middleware.auth import AuthMiddleware
from tollway.middleware.request_context import RequestContextMiddleware

__all__ = ["AuthMiddleware", "RequestContextMiddleware"]
