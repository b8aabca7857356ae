"""Guards: rate-limit tiers over simulated time, the daily budget with reservations."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest

from tollway.auth import hash_key
from tollway.clock import ManualClock
from tollway.config import Config, TenantLimits, parse_config
from tollway.context import RequestInfo
from tollway.errors import QuotaExceeded, RateLimited, spec_for
from tollway.guards import BudgetGuard, LocalBudget, RateLimitGuard
from tollway.pipeline.call import CHAT, Call
from tollway.pipeline.decode import decode_chat
from tollway.pipeline.plan import Catalog
from tollway.policy import Policy, PolicyPlan
from tollway.resilience import Breakers, LatencyTracker
from tollway.tokens import CostEstimator

HOUR = 3600.0
DAY = 86400.0


def guard_config(limits: dict[str, Any] | None = None, daily_usd: float | None = None,
                 expensive: list[str] | None = None) -> Config:
    tenant: dict[str, Any] = {"id": "acme", "tier": "premium",
                              "key_sha256": [hash_key("k-acme-1234567890")]}
    if limits is not None:
        tenant["limits"] = limits
    if daily_usd is not None:
        tenant["daily_usd"] = daily_usd
    raw: dict[str, Any] = {
        "server": {"builtin_providers": False, "builtin_models": False},
        "nats": {"enabled": False},
        "providers": [{"name": "p", "base_url": "http://127.0.0.1:9/v1"}],
        "models": [
            {"id": "cheap", "provider": "p", "upstream": "gpt-4o-mini",
             "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
            {"id": "pricey", "provider": "p", "upstream": "gpt-4o",
             "input_usd_per_mtok": 5.0, "output_usd_per_mtok": 15.0},
        ],
        "tenants": [tenant],
    }
    return parse_config(raw, source="<test>", env={})


class Rig:
    """The real policy and guards of one tenant, on a manual clock."""

    def __init__(self, config: Config, **policy_kw: Any) -> None:
        self.config = config
        self.clock = ManualClock()
        self.estimator = CostEstimator({
            m.id: {"input_usd_per_mtok": m.input_usd_per_mtok,
                   "output_usd_per_mtok": m.output_usd_per_mtok} for m in config.models})
        self.policy = Policy(config, Catalog(config), self.estimator,
                             Breakers(["p"], self.clock), LatencyTracker(), self.clock,
                             **policy_kw)
        self.rate = RateLimitGuard(config.tenants, self.clock)
        self.book = LocalBudget(self.clock)
        self.budget = BudgetGuard(config, lambda: self.book)
        self.n = 0
        self._plans: dict[str, PolicyPlan] = {}  # simulations reuse one plan per request

    def call(self, model: str = "cheap", **body: Any) -> tuple[Call, PolicyPlan]:
        self.n += 1
        call = Call(CHAT, RequestInfo(f"req-{self.n}", 0.0), self.config.tenants[0],
                    self.clock.time())
        call.body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                **body}).encode()
        call.request = decode_chat(call.body)
        plan = self.policy.plan(call)
        call.plan = plan
        return call, plan

    async def try_rate(self, model: str = "cheap", **body: Any) -> float | None:
        """None if admitted, else the Retry-After seconds of the refusal."""
        key = json.dumps([model, body])
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.call(model, **body)[1]
        call = Call(CHAT, RequestInfo("req", 0.0), self.config.tenants[0], self.clock.time())
        try:
            await self.rate(call, plan)
        except RateLimited as exc:
            assert exc.headers is not None
            return float(exc.headers["Retry-After"])
        return None


# ---- rate limits -----------------------------------------------------------------------------

async def test_burst_then_refusal_with_headers_and_refill() -> None:
    rig = Rig(guard_config())  # the defaults: 60/min, 1000/h, 10000/day, 10 expensive/h
    for i in range(60):
        call, plan = rig.call()
        await rig.rate(call, plan)
        headers = dict(call.headers)
        assert headers[b"x-ratelimit-limit-requests"] == b"60"
        assert headers[b"x-ratelimit-remaining-requests"] == str(59 - i).encode()
    call, plan = rig.call()
    with pytest.raises(RateLimited) as err:
        await rig.rate(call, plan)
    spec = spec_for(err.value)
    assert (spec.status, spec.code) == (429, "rate_limit_exceeded")
    assert err.value.headers == {"Retry-After": "1"}  # 60/min refills one a second
    assert "60 requests per minute" in err.value.message
    assert dict(call.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert "refused: rate limit (per_minute)" in call.reason
    rig.clock.advance(1.0)
    assert await rig.try_rate() is None
    assert await rig.try_rate() == 1.0


async def greedy(rig: Rig, until: float, admitted_at: list[float], **kw: Any) -> None:
    """A client that calls as fast as it may, waiting exactly each Retry-After."""
    while rig.clock.monotonic() < until:
        wait = await rig.try_rate(**kw)
        if wait is None:
            admitted_at.append(rig.clock.monotonic())
        else:
            rig.clock.advance(wait)


def in_window(times: list[float], start: float, length: float) -> int:
    return sum(1 for t in times if start <= t < start + length)


async def test_minute_tier_holds_over_simulated_minutes() -> None:
    rig = Rig(guard_config({"per_minute": 60, "per_hour": 0, "per_day": 0}))
    t0 = rig.clock.monotonic()
    times: list[float] = []
    await greedy(rig, t0 + 10 * 60, times)
    assert in_window(times, t0, 1.0) == 60  # the burst
    for minute in range(1, 10):  # after it, the refill rate: one a second
        n = in_window(times, t0 + minute * 60, 60)
        assert 59 <= n <= 61, (minute, n)
    # Whatever the window, never more than the burst plus what refilled in it.
    for start in range(0, 540, 7):
        assert in_window(times, t0 + start, 60) <= 60 + 60 + 1


async def test_hour_tier_holds_over_simulated_hours() -> None:
    rig = Rig(guard_config({"per_minute": 60, "per_hour": 1000, "per_day": 0}))
    t0 = rig.clock.monotonic()
    times: list[float] = []
    await greedy(rig, t0 + 4 * HOUR, times)
    for hour in range(1, 4):
        n = in_window(times, t0 + hour * HOUR, HOUR)
        assert 990 <= n <= 1001, (hour, n)
    # 60/min alone would allow 3600 an hour.
    assert len(times) <= 1000 + 4 * 1000 + 1


async def test_day_tier_holds_over_a_simulated_day() -> None:
    rig = Rig(guard_config({"per_minute": 60, "per_hour": 1000, "per_day": 10000}))
    t0 = rig.clock.monotonic()
    times: list[float] = []
    await greedy(rig, t0 + 2 * DAY, times)
    n = in_window(times, t0 + DAY, DAY)  # the second day: the bucket's steady rate
    # 1000/h alone would allow 24000 a day; Retry-After is whole seconds, hence slack.
    assert 9000 <= n <= 10001, n
    for start in range(0, int(DAY), 3 * 3600):
        assert in_window(times, t0 + start, DAY) <= 10000 + 10000 + 1


async def test_expensive_tier_counts_only_expensive_calls() -> None:
    rig = Rig(guard_config(), expensive_models=["pricey"])
    for _ in range(10):
        assert await rig.try_rate("pricey", max_tokens=10) is None
    wait = await rig.try_rate("pricey", max_tokens=10)
    assert wait == 360.0  # 10 an hour: one every six minutes
    assert await rig.try_rate("cheap") is None  # ordinary calls still pass
    call, plan = rig.call("pricey", max_tokens=10)
    with pytest.raises(RateLimited) as err:
        await rig.rate(call, plan)
    assert "10 expensive requests per hour" in err.value.message
    rig.clock.advance(360)
    assert await rig.try_rate("pricey", max_tokens=10) is None


async def test_expensive_by_estimated_cost() -> None:
    rig = Rig(guard_config({"expensive_per_hour": 1}), expensive_min_cost_usd=0.005)
    assert await rig.try_rate("cheap", max_tokens=10) is None
    assert await rig.try_rate("cheap", max_tokens=10) is None
    assert await rig.try_rate("pricey", max_tokens=1000) is None  # ~0.015 USD: expensive
    assert await rig.try_rate("pricey", max_tokens=1000) == 3600.0


async def test_tokens_per_minute_tier() -> None:
    rig = Rig(guard_config({"tokens_per_minute": 1000}))
    call, plan = rig.call(max_tokens=400)
    await rig.rate(call, plan)
    headers = dict(call.headers)
    used = plan.prompt_tokens + 400
    assert headers[b"x-ratelimit-remaining-tokens"] == str(1000 - used).encode()
    assert await rig.try_rate(max_tokens=400) is None
    assert await rig.try_rate(max_tokens=400) is not None


def test_limits_are_per_tenant_and_configurable() -> None:
    limits = TenantLimits(per_minute=5, per_hour=50, per_day=500, expensive_per_hour=2)
    clock = ManualClock()
    cfg = guard_config({"per_minute": 5, "per_hour": 50, "per_day": 500,
                        "expensive_per_hour": 2})
    guard = RateLimitGuard(cfg.tenants, clock, default=TenantLimits(per_minute=1))
    assert guard.limiter.limits("acme").as_dict() == {
        "per_minute": 5, "per_hour": 50, "per_day": 500, "expensive_per_hour": 2,
        "tokens_per_minute": None}
    assert guard.limiter.limits("someone-else").per_minute == 1
    assert limits.per_minute == 5


# ---- budget ----------------------------------------------------------------------------------

async def test_local_budget_reserve_settle_release() -> None:
    clock = ManualClock()
    book = LocalBudget(clock)
    a = await book.reserve("t", 600, 1000)
    assert a is not None and book.reserved_today("t") == 600
    assert await book.reserve("t", 500, 1000) is None  # 600 held + 500 > 1000
    b = await book.reserve("t", 400, 1000)
    assert b is not None
    book.settle(a, 250)
    assert (book.spent_today("t"), book.reserved_today("t")) == (250, 400)
    book.release(b)
    book.release(b)  # twice: no effect
    assert (book.spent_today("t"), book.reserved_today("t")) == (250, 0)
    assert await book.reserve("t", 750, 1000) is not None
    assert await book.reserve("other", 1000, 1000) is not None  # per tenant


async def test_budget_day_boundary_follows_the_clock() -> None:
    clock = ManualClock()  # midnight UTC
    clock.advance(DAY - 10)  # 23:59:50
    book = LocalBudget(clock)
    held = await book.reserve("t", 700, 1000)
    done = await book.reserve("t", 300, 1000)
    assert held is not None and done is not None
    book.settle(done, 300)
    clock.advance(20)  # 00:00:10 the next day
    assert book.spent_today("t") == 0 and book.reserved_today("t") == 0
    book.settle(held, 650)  # counts for the day it was reserved against
    assert book.spent_today("t") == 0
    assert book.spent_today("t", clock.time() - DAY) == 950
    assert await book.reserve("t", 1000, 1000) is not None


async def test_budget_guard_refuses_with_insufficient_quota_and_settles() -> None:
    rig = Rig(guard_config(daily_usd=0.001))  # 1,000,000 nano-USD
    call, plan = rig.call(max_tokens=100)
    # "hi": 8 prompt tokens at 1000 nano-USD each (1 USD/M), 100 output at 2000.
    assert plan.max_cost_nanousd == 8 * 1000 + 100 * 2000
    await rig.budget(call, plan)
    assert rig.book.reserved_today("acme") == 208_000
    call.cost_nanousd = 50_000
    rig.budget.finish(call)
    rig.budget.finish(call)  # once only
    assert (rig.book.spent_today("acme"), rig.book.reserved_today("acme")) == (50_000, 0)
    big, plan = rig.call(max_tokens=480)
    # 50,000 + 968,000 > 1,000,000: its max_tokens is lowered to what is left to pay.
    await rig.budget(big, plan)
    assert plan.bound(plan.candidates[0]) == (1_000_000 - 50_000 - 8 * 1000) // 2000 == 471
    assert plan.max_cost_nanousd == big.estimated_cost_nanousd == 8 * 1000 + 471 * 2000
    assert rig.book.reserved_today("acme") == 950_000
    late, plan = rig.call(max_tokens=10)
    with pytest.raises(QuotaExceeded) as err:
        await rig.budget(late, plan)  # nothing left, not even for 10 tokens
    spec = spec_for(err.value)
    assert (spec.status, spec.code) == (429, "insufficient_quota")
    assert "daily budget of 0.001 USD" in err.value.message
    assert "refused: daily budget" in late.reason
    rig.budget.finish(big)  # cost 0: released
    unbilled, plan = rig.call(max_tokens=10)
    await rig.budget(unbilled, plan)
    rig.budget.finish(unbilled)  # cost 0: released, not settled
    assert (rig.book.spent_today("acme"), rig.book.reserved_today("acme")) == (50_000, 0)


async def test_50_concurrent_reservations_against_a_budget_worth_10() -> None:
    rig = Rig(guard_config(daily_usd=0.0))
    _, plan = rig.call(max_tokens=100)
    per_call = plan.max_cost_nanousd
    budget = 10 * per_call
    rig.budget.daily["acme"] = budget

    async def one(i: int) -> bool:
        call, plan = rig.call(max_tokens=100)
        try:
            await rig.budget(call, plan)
        except QuotaExceeded:
            return False
        await asyncio.sleep(0.001 * (i % 5))  # the call is "in flight"
        call.cost_nanousd = per_call  # as expensive as it could be
        rig.budget.finish(call)
        return True

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert sum(results) == 10
    assert rig.book.spent_today("acme") == budget
    assert rig.book.reserved_today("acme") == 0
    assert math.isclose(budget / 1e9, 10 * per_call / 1e9)
