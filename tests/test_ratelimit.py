"""The Rust rate limiter from Python: bindings, headers, threads, and properties.

The properties compare the Rust limiter with the pure-Python reference
(``benchmarks/pure_python.py``, the benchmark's baseline): both follow the
same float arithmetic, so their answers must agree exactly.
"""

from __future__ import annotations

import doctest
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tollway
import tollway.ratelimit
from reference import load_reference
from tollway import Limits, RateDecision, RateLimiter
from tollway.ratelimit import TIERS, format_reset, rate_limit_headers

ref = load_reference()

ONLY_MINUTE = Limits(per_minute=60, per_hour=None, per_day=None, expensive_per_hour=None)


def test_defaults_follow_the_design() -> None:
    assert RateLimiter().default_limits == Limits()
    assert Limits().as_dict() == {
        "per_minute": 60, "per_hour": 1000, "per_day": 10000, "expensive_per_hour": 10,
        "tokens_per_minute": None,
    }
    limiter = RateLimiter()
    admitted = sum(limiter.check("acme", now=10.0).allowed for _ in range(100))
    assert admitted == 60


def test_limits_value_semantics() -> None:
    assert Limits(per_minute=0) == Limits(per_minute=None)
    assert Limits(per_minute=0).per_minute is None
    assert hash(Limits(per_hour=5)) == hash(Limits(per_hour=5))
    assert Limits(per_hour=5) != Limits(per_hour=6)
    assert Limits.unlimited().as_dict() == dict.fromkeys(TIERS)
    assert "tokens_per_minute=None" in repr(Limits())
    with pytest.raises(OverflowError):
        Limits(per_minute=-1)


def test_a_decision_reports_every_enabled_tier() -> None:
    limiter = RateLimiter(Limits(tokens_per_minute=1000))
    d = limiter.check("acme", 2, expensive=True, tokens=250, now=100.0)
    assert isinstance(d, RateDecision)
    assert d and d.allowed and d.retry_after == 0.0 and d.denied_by == ()
    assert set(d.tiers) == set(TIERS)
    minute = d.tiers["per_minute"]
    assert (minute.name, minute.limit, minute.remaining) == ("per_minute", 60, 58)
    assert minute.reset == pytest.approx(2.0)
    assert d.tier("expensive_per_hour").remaining == 8  # type: ignore[union-attr]
    assert d.tier("tokens_per_minute").remaining == 750  # type: ignore[union-attr]
    assert d.limits == Limits(tokens_per_minute=1000)
    assert RateLimiter().check("x", now=1.0).tier("tokens_per_minute") is None
    with pytest.raises(KeyError):
        d.tier("per_week")


def test_denial_is_all_or_nothing_with_exact_retry_after() -> None:
    limiter = RateLimiter(Limits(per_minute=10, expensive_per_hour=1))
    assert limiter.check("k", expensive=True, now=0.0).allowed
    denied = limiter.check("k", expensive=True, now=0.0)
    assert not denied and denied.denied_by == ("expensive_per_hour",)
    assert denied.retry_after == pytest.approx(3600.0)
    assert denied.tiers["per_minute"].remaining == 9  # nothing taken
    assert "denied_by=('expensive_per_hour',)" in repr(denied)
    assert not limiter.check("k", expensive=True, now=3599.0).allowed
    assert limiter.check("k", expensive=True, now=denied.retry_after).allowed


def test_a_cost_above_a_limit_waits_forever() -> None:
    limiter = RateLimiter(Limits(tokens_per_minute=100))
    d = limiter.check("k", tokens=101, now=0.0)
    assert not d.allowed and math.isinf(d.retry_after)
    assert "retry-after" not in rate_limit_headers(d)


def test_status_consumes_nothing() -> None:
    limiter = RateLimiter(ONLY_MINUTE)
    for _ in range(3):
        assert limiter.status("k", 60, now=0.0).allowed
    assert len(limiter) == 0
    assert limiter.check("k", 60, now=0.0).allowed
    assert limiter.status("k", now=0.0).tiers["per_minute"].remaining == 0
    assert not limiter.status("k", now=0.0).allowed


def test_now_defaults_to_the_monotonic_clock() -> None:
    limiter = RateLimiter(ONLY_MINUTE)
    before = time.monotonic()
    limiter.check("k", 60)
    after = time.monotonic()
    # 60 used at 1/s refill: reset = 60 - (t - checked_at) at any later t.
    reset = limiter.status("k", now=after + 10.0).tiers["per_minute"].reset
    checked_at = after + 10.0 - 60.0 + reset
    assert before - 0.01 <= checked_at <= after + 0.01


def test_bad_arguments_are_refused() -> None:
    limiter = RateLimiter()
    with pytest.raises(ValueError, match="finite"):
        limiter.check("k", now=math.nan)
    with pytest.raises(OverflowError):
        limiter.check("k", -1, now=0.0)
    with pytest.raises(TypeError):
        limiter.check(b"k", now=0.0)  # type: ignore[arg-type]


def test_limits_change_at_run_time() -> None:
    limiter = RateLimiter(ONLY_MINUTE)
    limiter.set_limits("vip", Limits(per_minute=120, per_hour=None, per_day=None), now=0.0)
    assert limiter.limits("vip").per_minute == 120
    assert limiter.limits("other").per_minute == 60
    assert sum(limiter.check("vip", now=0.0).allowed for _ in range(200)) == 120
    limiter.set_limits("vip", None, now=0.0)
    assert limiter.limits("vip") == ONLY_MINUTE
    assert not limiter.check("vip", now=0.0).allowed  # 120 used, limit 60 now
    limiter.set_default_limits(Limits.unlimited(), now=0.0)
    assert limiter.check("vip", 10**9, now=0.0).allowed
    assert limiter.check("vip", now=0.0).tiers == {}


def test_idle_keys_are_evicted() -> None:
    limiter = RateLimiter()
    for i in range(1000):
        limiter.check(f"tenant-{i}", now=0.0)
    assert len(limiter) == 1000
    assert limiter.evict_idle(now=1.0) == 0  # the day tier needs 8.64 s
    assert limiter.evict_idle(now=9.0) == 1000
    assert len(limiter) == 0


def test_headers_report_the_binding_request_tier() -> None:
    limiter = RateLimiter(Limits(per_minute=60, per_hour=100, tokens_per_minute=10_000))
    headers = rate_limit_headers(limiter.check("k", 50, tokens=2500, now=0.0))
    # The hour tier has 50 left, the minute tier 10: the minute tier binds.
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "50s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "7500",
        "x-ratelimit-reset-tokens": "15s",
    }
    limiter.check("k", 10, now=0.0)
    denied = limiter.check("k", 1, now=0.0)
    headers = rate_limit_headers(denied)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["retry-after"] == "1"
    assert rate_limit_headers(RateLimiter(Limits.unlimited()).check("k", now=0.0)) == {}


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0s"), (0.0201, "21ms"), (1.0, "1s"), (1.5, "1.5s"), (60.0, "1m0s"),
    (360.0, "6m0s"), (3.5999999999999996, "3.6s"), (3723.5, "1h2m3.5s"), (86400.0, "24h0m0s"),
])
def test_format_reset_matches_openai(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_module_examples_hold() -> None:
    assert doctest.testmod(tollway.ratelimit).failed == 0


def test_threads_hammering_one_key_never_exceed_the_limit() -> None:
    limiter = RateLimiter(Limits(per_minute=5000, per_hour=None, per_day=None))

    def worker(seed: int) -> int:
        got = 0
        for i in range(3000):
            cost = 1 + (i + seed) % 3
            if limiter.check("shared", cost, now=50.0).allowed:
                got += cost
            limiter.check(f"side-{seed}-{i % 20}", now=50.0)
        return got

    with ThreadPoolExecutor(max_workers=8) as pool:
        total = sum(pool.map(worker, range(8)))
    assert total == 5000
    assert limiter.status("shared", now=50.0).tiers["per_minute"].remaining == 0


# --- properties --------------------------------------------------------------

limit_values = st.sampled_from([None, 1, 2, 3, 7, 10, 60, 1000])
limits_strategy = st.builds(
    Limits, per_minute=limit_values, per_hour=limit_values, per_day=limit_values,
    expensive_per_hour=limit_values, tokens_per_minute=st.sampled_from([None, 50, 500]),
)
advance = st.one_of(
    st.just(0.0), st.floats(0.0, 2.0), st.floats(0.0, 120.0), st.floats(0.0, 5000.0),
    st.integers(0, 90_000).map(float),
)
check_op = st.tuples(
    st.just("check"), advance, st.sampled_from(["a", "b", "c"]), st.integers(0, 4),
    st.booleans(), st.integers(0, 120),
)
limits_op = st.tuples(st.just("limits"), advance, st.sampled_from(["a", "b"]),
                      st.one_of(st.none(), limits_strategy))
default_op = st.tuples(st.just("default"), advance, limits_strategy)
evict_op = st.tuples(st.just("evict"), advance)
ops = st.lists(st.one_of(check_op, check_op, check_op, check_op, limits_op, default_op,
                         evict_op), max_size=80)


def _same(rust: RateDecision, model: object) -> None:
    assert rust.allowed == model.allowed  # type: ignore[attr-defined]
    assert rust.retry_after == model.retry_after  # type: ignore[attr-defined]
    assert rust.denied_by == model.denied_by  # type: ignore[attr-defined]
    got = {n: (s.limit, s.remaining, s.reset) for n, s in rust.tiers.items()}
    want = {n: (s.limit, s.remaining, s.reset) for n, s in model.tiers.items()}  # type: ignore[attr-defined]
    assert got == want


@settings(max_examples=150, deadline=None)
@given(default=limits_strategy, ops=ops)
def test_rust_matches_the_reference_model(default: Limits, ops: list[tuple[object, ...]]) -> None:
    rust = RateLimiter(default, shards=2)
    model = ref.RateLimiter(default.as_dict())
    now = 1000.0
    for op in ops:
        now += op[1]
        if op[0] == "check":
            _, _, key, cost, expensive, tokens = op
            _same(rust.status(key, cost, expensive=expensive, tokens=tokens, now=now),
                  model.status(key, cost, expensive=expensive, tokens=tokens, now=now))
            _same(rust.check(key, cost, expensive=expensive, tokens=tokens, now=now),
                  model.check(key, cost, expensive=expensive, tokens=tokens, now=now))
        elif op[0] == "limits":
            _, _, key, limits = op
            rust.set_limits(key, limits, now=now)
            model.set_limits(key, None if limits is None else limits.as_dict(), now=now)
            assert rust.limits(key).as_dict() == dict(zip(TIERS, (
                v or None for v in model.limits(key)), strict=True))
        elif op[0] == "default":
            rust.set_default_limits(op[2], now=now)
            model.set_default_limits(op[2].as_dict(), now=now)
        else:
            # Eviction may only drop state that can't change an answer; the
            # model keeps everything, so any difference shows up above.
            rust.evict_idle(now=now)


@settings(max_examples=150, deadline=None)
@given(
    limit=st.sampled_from([1, 3, 10, 60]),
    steps=st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(1, 5)), min_size=1,
                   max_size=120),
)
def test_no_interval_admits_more_than_the_bucket(limit: int,
                                                 steps: list[tuple[float, int]]) -> None:
    """In any [t0, t1], admitted cost <= limit + limit * (t1 - t0) / period."""
    limiter = RateLimiter(Limits(per_minute=limit, per_hour=None, per_day=None,
                                 expensive_per_hour=None))
    now = 0.0
    admitted: list[tuple[float, int]] = []
    for dt, cost in steps:
        now += dt
        if limiter.check("k", cost, now=now).allowed:
            admitted.append((now, cost))
    rate = limit / 60.0
    for i, (t0, _) in enumerate(admitted):
        total = 0
        for t1, cost in admitted[i:]:
            total += cost
            assert total <= limit + rate * (t1 - t0) + 1e-6 * limit


@settings(max_examples=100, deadline=None)
@given(limits=limits_strategy, costs=st.lists(st.integers(1, 5), max_size=60))
def test_a_burst_from_full_admits_exactly_the_smallest_limit(limits: Limits,
                                                             costs: list[int]) -> None:
    limiter = RateLimiter(limits)
    caps = [v for v in (limits.per_minute, limits.per_hour, limits.per_day,
                        limits.expensive_per_hour) if v is not None]
    cap = min(caps, default=math.inf)
    admitted = 0
    for cost in costs:
        # An expensive call takes from every request tier at once.
        allowed = limiter.check("k", cost, expensive=True, now=7.0).allowed
        assert allowed == (admitted + cost <= cap)
        admitted += cost if allowed else 0
