"""tollway: an OpenAI-compatible AI gateway.

The hot-path primitives (rate limiter, circuit breaker, token counter and
cost estimator) live in the Rust extension ``tollway._core``; the modules
re-exported here are their typed facades.
"""

from __future__ import annotations

__version__ = "0.1.0"

# ==== BEGIN tokenizer + cost exports ====
# ==== END tokenizer + cost exports ====
# ==== BEGIN limiter + breaker exports ====
from tollway._core import BreakerSnapshot as BreakerSnapshot
from tollway._core import Limits as Limits
from tollway._core import RateDecision as RateDecision
from tollway._core import RateLimiter as RateLimiter
from tollway._core import TierStatus as TierStatus
from tollway.breaker import BreakerTransition as BreakerTransition
from tollway.breaker import CircuitBreaker as CircuitBreaker
from tollway.ratelimit import rate_limit_headers as rate_limit_headers
from tollway.tokens import CostEstimator as CostEstimator
from tollway.tokens import Estimate as Estimate
from tollway.tokens import UnknownModelError as UnknownModelError
from tollway.tokens import count_tokens as count_tokens

# ==== END limiter + breaker exports ====
# ==== BEGIN service exports ====
# isort: split
from tollway.app import create_app as create_app
# ==== END service exports ====
