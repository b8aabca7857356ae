"""Resilience: which upstream errors to retry, how long to wait, breakers and latency.

- :func:`classify` sorts an upstream error into *retry* (connect error,
  timeout, 429, 5xx: the same provider may answer next time), *next* (a
  provider that cannot serve this call at all, e.g. it refused the gateway's
  credentials: fail over without retrying) or *stop* (a 4xx about the
  request itself: no other provider would accept it either).
- :class:`RetryPolicy`: exponential backoff with full jitter, and an upstream
  ``Retry-After`` honoured up to a cap (a longer one fails over at once: no
  caller should wait minutes for one provider when another may answer now).
- :class:`Breakers`: one circuit breaker per provider (the Rust core's),
  their transitions to the metrics, the log and an events hook, and the
  ``tollway_breaker_state`` gauge.
- :class:`LatencyTracker`: per deployment, an EWMA of latency and a p95 of
  the recent samples (what the interactive latency class and the latency
  objectives read); per provider, EWMAs of latency and error rate.

Nothing here sleeps or reads the time by itself: the gateway's
:class:`~tollway.clock.Clock` is passed in, so tests move time by hand.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tollway.breaker import BreakerOptions, BreakerTransition, CircuitBreaker
from tollway.clock import Clock
from tollway.errors import (
    TollwayError,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejectedRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "BREAKER_STATE_VALUE",
    "Breakers",
    "LatencyTracker",
    "RetryPolicy",
    "Verdict",
    "classify",
    "parse_retry_after",
]

log = logging.getLogger("tollway.resilience")

Verdict = Literal["retry", "next", "stop"]

# Provider statuses after which another try at the same provider is pointless
# (its answer will not change) but another provider may well serve the call.
_NOT_RETRYABLE_STATUSES = frozenset({401, 402, 403, 404, 405, 409, 410, 501})


def classify(exc: BaseException, upstream_status: int | None = None) -> Verdict:
    """What to do after a failed attempt; ``upstream_status`` is the provider's HTTP
    status when it sent one."""
    if isinstance(exc, UpstreamRejectedRequest):
        return "stop"
    if isinstance(exc, UpstreamConnectFailed | UpstreamTimeout | UpstreamRateLimited
                  | UpstreamUnavailable):
        return "retry"
    if isinstance(exc, UpstreamError):
        if upstream_status is not None and upstream_status in _NOT_RETRYABLE_STATUSES:
            return "next"
        return "retry"  # 5xx, a broken reply, a stream that failed before its first byte
    return "stop"


def counts_against_provider(exc: BaseException) -> bool:
    """Whether an attempt's error is a failure of the provider (for its breaker).

    A 4xx about the request proves the provider is up and answering.
    """
    return isinstance(exc, UpstreamError)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date).

    ``now`` is wall time (unix seconds), for the date form. None when absent
    or unreadable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def retry_after_of(exc: BaseException) -> str | None:
    """The provider's ``Retry-After`` as the dispatcher attached it to the error."""
    if isinstance(exc, TollwayError) and exc.headers:
        return exc.headers.get("Retry-After") or exc.headers.get("retry-after")
    return None


class RetryPolicy:
    """How many times to try one candidate, and how long to wait in between.

    ``attempts`` counts the first try: 3 means up to two retries per candidate.
    The n-th retry waits ``uniform(0, min(max_backoff_s, initial_backoff_s * 2**(n-1)))``
    (full jitter, so callers that failed together do not retry together), or
    the provider's ``Retry-After`` if that is longer and at most
    ``max_retry_after_s``.
    """

    __slots__ = ("attempts", "initial_backoff_s", "max_backoff_s", "max_retry_after_s", "rng")

    def __init__(self, attempts: int = 3, initial_backoff_s: float = 0.25,
                 max_backoff_s: float = 8.0, max_retry_after_s: float = 10.0,
                 rng: random.Random | None = None) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.attempts = attempts
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.rng = rng or random.Random()

    def backoff(self, retry: int) -> float:
        """Full-jitter wait before the ``retry``-th retry (from 1)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(retry - 1, 60))
        return self.rng.uniform(0.0, ceiling)

    def delay(self, retry: int, exc: BaseException, now: float) -> float | None:
        """Seconds to wait before retrying the same candidate, or None: do not retry it.

        ``retry`` is the retry about to be made (1 for the second attempt);
        ``now`` is wall time, for a ``Retry-After`` date.
        """
        if retry >= self.attempts:
            return None
        wait = self.backoff(retry)
        asked = parse_retry_after(retry_after_of(exc), now)
        if asked is not None:
            if asked > self.max_retry_after_s:
                return None  # the provider says "not soon": fail over instead
            wait = max(wait, asked)
        return wait


# ---- breakers -----------------------------------------------------------------------------------

BREAKER_STATE_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
BreakerHook = Callable[[BreakerTransition, int], None]


class Breakers(Collector):
    """One breaker per provider, created up front from the provider list.

    ``hooks`` hear every transition with the failure count of the breaker's
    window (the events layer publishes them as ``breaker.changed``). Also a
    Prometheus collector: ``tollway_breaker_state`` (0 closed, 1 half-open,
    2 open) and ``tollway_breaker_transitions_total``, read on scrape.
    """

    def __init__(self, providers: Iterable[str], clock: Clock,
                 options: BreakerOptions | None = None) -> None:
        self.clock = clock
        self.options: BreakerOptions = dict(options or {})  # type: ignore[assignment]
        self.breakers: dict[str, CircuitBreaker] = {}
        self.transitions: dict[tuple[str, str], int] = {}
        self.hooks: list[BreakerHook] = []
        for name in providers:
            self.add(name)

    def add(self, name: str) -> CircuitBreaker:
        breaker = self.breakers.get(name)
        if breaker is None:
            breaker = self.breakers[name] = CircuitBreaker(name, **self.options)
            breaker.on_change(self._changed)
        return breaker

    def __getitem__(self, name: str) -> CircuitBreaker:
        breaker = self.breakers.get(name)
        return breaker if breaker is not None else self.add(name)

    def state(self, name: str) -> str:
        return self[name].state(self.clock.monotonic())

    def _changed(self, t: BreakerTransition) -> None:
        key = (t.breaker, t.to_state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        breaker = self.breakers[t.breaker]
        failures = 0
        try:
            failures = breaker.snapshot(t.at).failures
            if t.reason == "failure_threshold":
                # Opening clears the window; the event should still say how many it took.
                failures = max(failures, int(breaker.options.get("failure_threshold", 0) or 0))
        except Exception:  # a snapshot is only for the event; never fail a call over it
            log.debug("breaker snapshot failed", exc_info=True)
        level = logging.WARNING if t.to_state == "open" else logging.INFO
        log.log(level, "breaker %s: %s -> %s (%s)", t.breaker, t.from_state, t.to_state,
                t.reason, extra={"provider": t.breaker, "breaker_from": t.from_state,
                                 "breaker_to": t.to_state, "breaker_reason": t.reason})
        for hook in self.hooks:
            try:
                hook(t, failures)
            except Exception:
                log.exception("breaker hook failed")

    def info(self, name: str) -> dict[str, Any]:
        """What ``/api/ai/providers`` shows of one provider's breaker."""
        snap = self[name].snapshot(self.clock.monotonic())
        return {
            "state": snap.state,
            "failures_in_window": snap.failures,
            "calls_in_window": snap.calls,
            "opens": snap.opens,
            "retry_after_s": round(snap.retry_after, 3),
            "recovery_timeout_s": snap.recovery_timeout,
        }

    def collect(self) -> Iterator[Metric]:
        now = self.clock.monotonic()
        state = GaugeMetricFamily(
            "tollway_breaker_state",
            "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open.",
            labels=["provider"])
        for name, breaker in list(self.breakers.items()):
            state.add_metric([name], BREAKER_STATE_VALUE.get(breaker.state(now), 0.0))
        yield state
        changes = CounterMetricFamily(
            "tollway_breaker_transitions", "Breaker transitions by provider and new state.",
            labels=["provider", "state"])
        for (name, to), n in list(self.transitions.items()):
            changes.add_metric([name, to], float(n))
        yield changes


# ---- latency ------------------------------------------------------------------------------------

class _Samples:
    """A ring of recent latencies with a p95 recomputed every few samples."""

    __slots__ = ("count", "ewma", "p95", "ring", "stale")

    def __init__(self, size: int) -> None:
        self.ring: list[float] = [0.0] * size
        self.count = 0
        self.ewma = 0.0
        self.p95 = 0.0
        self.stale = 0

    def add(self, value: float, alpha: float, size: int) -> None:
        self.ring[self.count % size] = value
        self.ewma = value if self.count == 0 else self.ewma + alpha * (value - self.ewma)
        self.count += 1
        self.stale += 1
        # Sorting the ring costs a few microseconds; once every eight samples keeps the
        # p95 fresh enough for routing at a fraction of that per call.
        if self.stale >= 8 or self.count <= 8:
            n = min(self.count, size)
            ordered = sorted(self.ring[:n])
            self.p95 = ordered[min(n - 1, math.ceil(0.95 * n) - 1)]
            self.stale = 0


class _ProviderStats:
    __slots__ = ("calls", "error_rate", "errors", "latency_ewma_s")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.error_rate = 0.0
        self.latency_ewma_s = 0.0


class LatencyTracker:
    """Observed latency per deployment (any hashable key) and health per provider.

    What is observed is the provider's time to answer: a whole reply when not
    streaming, the first chunk of a stream (time to first byte), so a
    deployment's numbers do not depend on how long its completions are.
    """

    __slots__ = ("alpha", "error_alpha", "min_samples", "providers", "size", "stats")

    def __init__(self, alpha: float = 0.2, window: int = 64, min_samples: int = 5,
                 error_alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.size = window
        self.min_samples = min_samples  # before this many, a p95 is not trusted
        self.error_alpha = error_alpha
        self.stats: dict[object, _Samples] = {}
        self.providers: dict[str, _ProviderStats] = {}

    def observe(self, key: object, provider: str, seconds: float) -> None:
        """A successful attempt's latency."""
        s = self.stats.get(key)
        if s is None:
            s = self.stats[key] = _Samples(self.size)
        s.add(seconds, self.alpha, self.size)
        p = self._provider(provider)
        p.calls += 1
        p.error_rate -= self.error_alpha * p.error_rate
        p.latency_ewma_s = seconds if p.calls == 1 else (
            p.latency_ewma_s + self.alpha * (seconds - p.latency_ewma_s))

    def observe_failure(self, key: object, provider: str, seconds: float | None = None) -> None:
        """A failed attempt; a timeout also counts its wait as latency (a slow deployment)."""
        if seconds is not None:
            s = self.stats.get(key)
            if s is None:
                s = self.stats[key] = _Samples(self.size)
            s.add(seconds, self.alpha, self.size)
        p = self._provider(provider)
        p.calls += 1
        p.errors += 1
        p.error_rate += self.error_alpha * (1.0 - p.error_rate)

    def _provider(self, name: str) -> _ProviderStats:
        p = self.providers.get(name)
        if p is None:
            p = self.providers[name] = _ProviderStats()
        return p

    def ewma(self, key: object) -> float | None:
        s = self.stats.get(key)
        return s.ewma if s is not None else None

    def p95(self, key: object) -> float | None:
        """The p95 of the recent samples, None until there are ``min_samples``."""
        s = self.stats.get(key)
        if s is None or s.count < self.min_samples:
            return None
        return s.p95

    def samples(self, key: object) -> int:
        s = self.stats.get(key)
        return s.count if s is not None else 0

    def describe(self, provider: str) -> dict[str, Any]:
        p = self.providers.get(provider) or _ProviderStats()
        return {
            "calls": p.calls,
            "errors": p.errors,
            "error_rate": round(p.error_rate, 4),
            "latency_ewma_s": round(p.latency_ewma_s, 6),
        }

    def describe_keys(self, keys: Mapping[str, object]) -> dict[str, dict[str, Any]]:
        """Per named deployment: samples, EWMA and p95."""
        out: dict[str, dict[str, Any]] = {}
        for name, key in keys.items():
            s = self.stats.get(key)
            if s is not None:
                out[name] = {"samples": s.count, "latency_ewma_s": round(s.ewma, 6),
                             "latency_p95_s": round(s.p95, 6)}
        return out
