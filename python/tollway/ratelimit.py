"""Multi-tier rate limiting: the Rust limiter and the headers it feeds.

The classes are the Rust ones (``tollway._core``), re-exported unchanged: a
Python wrapper would add more to a check than the check itself costs.
``now`` defaults to the monotonic clock inside Rust (the same clock as
:func:`time.monotonic`).

>>> limiter = RateLimiter(Limits(per_minute=2, per_hour=None, per_day=None))
>>> limiter.check("acme", now=0.0).allowed, limiter.check("acme", now=0.0).allowed
(True, True)
>>> denied = limiter.check("acme", now=0.0)
>>> denied.allowed, denied.retry_after, denied.denied_by
(False, 30.0, ('per_minute',))
>>> rate_limit_headers(denied)["x-ratelimit-reset-requests"]
'1m0s'
"""

from __future__ import annotations

import math
from typing import Final

from tollway._core import Limits, RateDecision, RateLimiter, TierStatus

__all__ = [
    "REQUEST_TIERS",
    "TIERS",
    "Limits",
    "RateDecision",
    "RateLimiter",
    "TierStatus",
    "format_reset",
    "rate_limit_headers",
]

TIERS: Final = ("per_minute", "per_hour", "per_day", "expensive_per_hour", "tokens_per_minute")
REQUEST_TIERS: Final = ("per_minute", "per_hour", "per_day")


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: ``20ms``, ``1s``, ``6m0s``, ``1h2m3.5s``.

    Rounded up to the millisecond, so a client that waits that long is
    never early.
    """
    ms = math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _binding(tiers: dict[str, TierStatus]) -> TierStatus | None:
    # The request tier a client hits first: fewest remaining; on a tie the
    # shorter period (earlier in REQUEST_TIERS), which also resets soonest.
    candidates = [tiers[name] for name in REQUEST_TIERS if name in tiers]
    return min(candidates, key=lambda s: s.remaining, default=None)


def rate_limit_headers(decision: RateDecision) -> dict[str, str]:
    """OpenAI-style ``x-ratelimit-*`` headers for a check's answer.

    ``requests`` reports the most constraining request tier; ``tokens`` the
    tokens-per-minute tier when it is enabled. A denial with a finite wait
    also gets ``retry-after`` in whole seconds (rounded up).
    """
    tiers = decision.tiers
    headers: dict[str, str] = {}
    for suffix, status in (("requests", _binding(tiers)),
                           ("tokens", tiers.get("tokens_per_minute"))):
        if status is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(status.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(status.remaining)
            headers[f"x-ratelimit-reset-{suffix}"] = format_reset(status.reset)
    if not decision.allowed and math.isfinite(decision.retry_after):
        headers["retry-after"] = str(max(1, math.ceil(decision.retry_after)))
    return headers
