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
# ==== END limiter + breaker exports ====
# ==== BEGIN service exports ====
# ==== END service exports ====
