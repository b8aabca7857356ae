"""Retry classification and timing, breakers per provider on an injected clock, latency."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tollway.breaker import BreakerTransition
from tollway.clock import ManualClock, SystemClock
from tollway.errors import (
    InvalidRequest,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejectedRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tollway.resilience import Breakers, LatencyTracker, RetryPolicy, classify, parse_retry_after

# ---- classification --------------------------------------------------------------------------

@pytest.mark.parametrize(("exc", "status", "verdict"), [
    (UpstreamConnectFailed("x"), None, "retry"),
    (UpstreamTimeout("x"), None, "retry"),
    (UpstreamRateLimited("x"), 429, "retry"),
    (UpstreamUnavailable("x"), 503, "retry"),
    (UpstreamError("x"), 500, "retry"),
    (UpstreamError("x"), 502, "retry"),
    (UpstreamError("broken stream"), None, "retry"),
    (UpstreamError("x"), 401, "next"),
    (UpstreamError("x"), 403, "next"),
    (UpstreamError("x"), 404, "next"),
    (UpstreamRejectedRequest("bad", status=400), 400, "stop"),
    (UpstreamRejectedRequest("big", status=413), 413, "stop"),
    (InvalidRequest("x"), None, "stop"),
    (RuntimeError("x"), None, "stop"),
])
def test_classify(exc: BaseException, status: int | None, verdict: str) -> None:
    assert classify(exc, status) == verdict


# ---- Retry-After -----------------------------------------------------------------------------

def test_parse_retry_after_seconds_and_dates() -> None:
    now = 1_767_225_600.0
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-4", now) == 0.0
    date = format_datetime(datetime.fromtimestamp(now + 7, UTC), usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(7.0)
    past = format_datetime(datetime.fromtimestamp(now - 60, UTC), usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    for bad in (None, "", "soon", "nan", "inf", "Mon, 99 Foo 2026"):
        assert parse_retry_after(bad, now) is None


def test_backoff_is_full_jitter_within_exponential_ceiling() -> None:
    policy = RetryPolicy(attempts=10, initial_backoff_s=0.5, max_backoff_s=4.0,
                         rng=random.Random(7))
    for retry, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)):
        waits = [policy.backoff(retry) for _ in range(400)]
        assert all(0.0 <= w <= ceiling for w in waits)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(waits) < ceiling * 0.1 and max(waits) > ceiling * 0.9


def test_delay_honours_retry_after_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=0.1,
                         max_retry_after_s=5.0, rng=random.Random(1))
    busy = UpstreamRateLimited("x", headers={"Retry-After": "4"})
    assert policy.delay(1, busy, 0.0) == 4.0  # longer than any backoff: wait what was asked
    too_long = UpstreamRateLimited("x", headers={"Retry-After": "30"})
    assert policy.delay(1, too_long, 0.0) is None  # fail over instead of waiting 30 s
    plain = UpstreamError("x")
    wait = policy.delay(1, plain, 0.0)
    assert wait is not None and 0.0 <= wait <= 0.1
    assert policy.delay(2, plain, 0.0) is not None
    assert policy.delay(3, plain, 0.0) is None  # 3 attempts: two retries at most
    assert RetryPolicy(attempts=1).delay(1, plain, 0.0) is None
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


# ---- breakers --------------------------------------------------------------------------------

def test_breaker_opens_after_5_failures_in_60s_half_opens_after_30s_closes_on_probe() -> None:
    clock = ManualClock()
    breakers = Breakers(["openai", "local"], clock)
    seen: list[tuple[str, str, str, int]] = []
    breakers.hooks.append(lambda t, failures: seen.append(
        (t.breaker, t.from_state, t.to_state, failures)))
    b = breakers["openai"]
    for _ in range(4):
        b.record_failure(clock.monotonic())
        clock.advance(10)
    assert breakers.state("openai") == "closed"  # 4 failures in 40 s
    b.record_failure(clock.monotonic())  # the 5th, 40 s after the first
    assert breakers.state("openai") == "open"
    assert breakers.state("local") == "closed"  # breakers are per provider
    assert not b.allow(clock.monotonic())
    clock.advance(29.5)
    assert breakers.state("openai") == "open"
    clock.advance(0.5)
    assert breakers.state("openai") == "half_open"
    assert b.allow(clock.monotonic())  # the probe
    assert not b.allow(clock.monotonic())  # one probe at a time
    b.record_success(clock.monotonic(), 0.2)
    assert breakers.state("openai") == "closed"
    assert [(s[1], s[2]) for s in seen] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert seen[0][3] == 5
    assert breakers.transitions[("openai", "open")] == 1


def test_failures_spread_over_more_than_60s_do_not_open() -> None:
    clock = ManualClock()
    breakers = Breakers(["p"], clock)
    for _ in range(10):
        breakers["p"].record_failure(clock.monotonic())
        clock.advance(16)  # never 5 within one 60 s window
    assert breakers.state("p") == "closed"


def test_failed_probe_reopens() -> None:
    clock = ManualClock()
    breakers = Breakers(["p"], clock, {"failure_threshold": 2, "recovery_s": 10.0,
                                       "recovery_multiplier": 1.0})
    b = breakers["p"]
    b.record_failure(clock.monotonic())
    b.record_failure(clock.monotonic())
    clock.advance(10)
    assert b.allow(clock.monotonic())
    b.record_failure(clock.monotonic())
    assert breakers.state("p") == "open"
    assert breakers.info("p")["retry_after_s"] == 10.0


def test_breaker_state_metric_and_transitions() -> None:
    clock = ManualClock()
    breakers = Breakers(["a", "b"], clock, {"failure_threshold": 1})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(breakers)
    breakers["b"].record_failure(clock.monotonic())
    text = generate_latest(registry).decode()
    assert 'tollway_breaker_state{provider="a"} 0.0' in text
    assert 'tollway_breaker_state{provider="b"} 2.0' in text
    assert 'tollway_breaker_transitions_total{provider="b",state="open"} 1.0' in text
    clock.advance(30)
    text = generate_latest(registry).decode()
    assert 'tollway_breaker_state{provider="b"} 1.0' in text


def test_a_failing_hook_does_not_break_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    breakers = Breakers(["p"], clock, {"failure_threshold": 1})
    calls: list[BreakerTransition] = []

    def bad(t: BreakerTransition, failures: int) -> None:
        raise RuntimeError("subscriber down")

    breakers.hooks += [bad, lambda t, f: calls.append(t)]
    breakers["p"].record_failure(clock.monotonic())
    assert breakers.state("p") == "open" and len(calls) == 1
    assert "breaker hook failed" in caplog.text


# ---- latency ---------------------------------------------------------------------------------

def test_latency_ewma_and_p95() -> None:
    lat = LatencyTracker(alpha=0.5, window=32, min_samples=5)
    key = object()
    assert lat.ewma(key) is None and lat.p95(key) is None
    lat.observe(key, "p", 1.0)
    assert lat.ewma(key) == 1.0
    lat.observe(key, "p", 3.0)
    assert lat.ewma(key) == 2.0
    assert lat.p95(key) is None  # too few samples to trust
    for _ in range(22):
        lat.observe(key, "p", 0.1)
    assert lat.p95(key) == 1.0  # 24 samples: the 23rd smallest is the 1.0
    for _ in range(32):
        lat.observe(key, "p", 0.1)  # the ring forgets the old ones
    assert lat.p95(key) == pytest.approx(0.1)
    assert lat.samples(key) == 56


def test_provider_error_rate() -> None:
    lat = LatencyTracker(error_alpha=0.5)
    k = object()
    lat.observe_failure(k, "p")
    lat.observe_failure(k, "p", 5.0)
    d = lat.describe("p")
    assert d["errors"] == 2 and d["calls"] == 2 and d["error_rate"] == 0.75
    assert lat.ewma(k) == 5.0  # a timeout's wait counts as latency
    lat.observe(k, "p", 1.0)
    assert lat.describe("p")["error_rate"] == 0.375
    assert lat.describe("never")["calls"] == 0


# ---- clocks ----------------------------------------------------------------------------------

async def test_manual_clock_sleep_moves_time_without_waiting() -> None:
    clock = ManualClock()
    t0, w0 = clock.monotonic(), clock.time()
    loop = asyncio.get_running_loop()
    real = loop.time()
    await clock.sleep(3600)
    assert clock.monotonic() - t0 == 3600 and clock.time() - w0 == 3600
    assert loop.time() - real < 60  # far from the hour it counted, however loaded the machine
    assert clock.slept == [3600]
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_system_clock() -> None:
    clock = SystemClock()
    a = clock.monotonic()
    await clock.sleep(0.01)
    assert clock.monotonic() - a >= 0.009
    assert abs(clock.time() - datetime.now(UTC).timestamp()) < 5
