"""tollway: an OpenAI-compatible AI gateway.

The hot-path primitives (rate limiter, circuit breaker, token counter and
cost estimator) live in the Rust extension ``tollway._core``; the modules
re-exported here are their typed facades. ``create_app`` (the Starlette app)
is imported on first use, so ``import tollway`` for the primitives does not
load Starlette, the pipeline or the events layer.
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
else:
    # Hidden from the type checker, which would otherwise accept any attribute of the
    # package; it sees create_app through the import above.
    def __getattr__(name: str) -> Any:
        if name == "create_app":
            from tollway.app import create_app

            return create_app
        raise AttributeError(f"module 'tollway' has no attribute {name!r}")
