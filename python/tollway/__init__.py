"""tollway: an OpenAI-compatible AI gateway.

The hot-path primitives (rate limiter, circuit breaker, token counter and
cost estimator) live in the Rust extension ``tollway._core``; the modules
re-exported here are their typed facades. The three ways in are imported on
first use, so ``import tollway`` for the primitives does not load Starlette,
the pipeline or the events layer: ``create_app`` (the HTTP API, served alone
or mounted in a host app), ``Gateway`` (the in-process API) and
``GuardMiddleware`` (the guards in front of a host app's own routes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tollway._core import BreakerSnapshot as BreakerSnapshot
from tollway._core import Limits as Limits
from tollway._core import RateDecision as RateDecision
from tollway._core import RateLimiter as RateLimiter
from tollway._core import TierStatus as TierStatus
from tollway._version import __version__ as __version__
from tollway.breaker import BreakerTransition as BreakerTransition
from tollway.breaker import CircuitBreaker as CircuitBreaker
from tollway.ratelimit import rate_limit_headers as rate_limit_headers
from tollway.tokens import CoreError as CoreError
from tollway.tokens import CostEstimator as CostEstimator
from tollway.tokens import Estimate as Estimate
from tollway.tokens import UnknownModelError as UnknownModelError
from tollway.tokens import count_tokens as count_tokens

if TYPE_CHECKING:
    from tollway.app import create_app as create_app
    from tollway.inprocess import APIError as APIError
    from tollway.inprocess import Gateway as Gateway
    from tollway.middleware.guard import GuardMiddleware as GuardMiddleware
else:
    # Hidden from the type checker, which would otherwise accept any attribute of the
    # package; it sees these through the imports above. Imported on first use, so that
    # `import tollway` for the primitives does not load Starlette or the pipeline.
    _LAZY = {"create_app": "tollway.app", "Gateway": "tollway.inprocess",
             "APIError": "tollway.inprocess", "GuardMiddleware": "tollway.middleware.guard"}

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'tollway' has no attribute {name!r}")
        import importlib

        return getattr(importlib.import_module(module), name)
