"""The guards through a real gateway: rate-limit headers and refusals, cost cap, daily budget."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from policy_rig import CHAT, completions, rig
from support import auth, chat_body
from tollway.clock import ManualClock
from tollway.context import RequestInfo
from tollway.events.schema import day_of, event_from_record
from tollway.pipeline.call import CHAT as CHAT_ENDPOINT
from tollway.pipeline.call import Call
from tollway.pipeline.decode import decode_chat
from tollway.testing.upstream import Fault

NANO = 1_000_000_000


def test_rate_limit_headers_on_success_and_429_when_spent() -> None:
    limits = {"per_minute": 3, "per_hour": 1000, "per_day": 10000, "expensive_per_hour": 10}
    with rig(("primary",), tenant={"limits": limits}) as r:
        for left in (2, 1, 0):
            resp = r.chat()
            assert resp.status_code == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "3"
            assert resp.headers["x-ratelimit-remaining-requests"] == str(left)
            assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
        resp = r.chat(stream=True)
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        assert resp.headers["retry-after"] == "20"  # 3 a minute: one every 20 s
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert completions(r.ups["primary"]) == 3  # the refused call went nowhere
        rec = r.recorder.wait(4)[-1]
        assert rec.outcome == "rejected" and rec.error_code == "rate_limit_exceeded"
        assert "refused: rate limit (per_minute)" in rec.reason
        assert 'tollway_rejections_total{reason="rate_limit_exceeded"} 1.0' in r.metrics()
        r.clock.advance(20)
        resp = r.chat(stream=True)  # streams carry the headers too
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"


def test_the_cap_lowers_max_tokens_and_refuses_a_prompt_it_cannot_pay() -> None:
    with rig(("primary",)) as r:
        # A budget-tier hint lowers the cap for one call (low: 0.002 USD), which pays
        # ~1,000 output tokens at 2 USD/M: the 2,000 asked for are lowered to that.
        resp = r.chat(max_tokens=2000, headers={"X-Tollway-Budget-Tier": "low"})
        assert resp.status_code == 200
        bound = int(resp.headers["x-tollway-max-tokens"])
        assert 900 < bound < 1000
        assert r.ups["primary"].requests[-1].body["max_tokens"] == bound
        # A prompt that leaves no room for even a minimal reply: refused, nothing sent.
        long = " ".join(["word"] * 2100)  # 2,100 prompt tokens at 1 USD/M > 0.002 USD
        resp = r.http.post(CHAT, json=chat_body(long, model="auto", max_tokens=10),
                           headers={**auth(), "X-Tollway-Budget-Tier": "low"})
        assert resp.status_code == 400
        err = resp.json()["error"]
        assert err["code"] == "cost_limit_exceeded" and err["param"] == "messages"
        assert completions(r.ups["primary"]) == 1
        recs = r.recorder.wait(2)
        assert [x.outcome for x in recs] == ["completed", "rejected"]
        assert recs[0].max_tokens_bound == bound
        assert recs[1].tier == "low" and "over the low cap" in recs[1].reason
        assert recs[1].estimated_cost_nanousd > 0.002 * NANO


def estimate_of(r: Any, content: str, **body: Any) -> int:
    """The budget hold of one call, read from the record of a call made to find out."""
    resp = r.http.post(CHAT, headers=auth(), json=chat_body(content, model="auto", **body))
    assert resp.status_code == 200
    rec = r.recorder.wait(len(r.recorder.records))[-1]
    return int(rec.estimated_cost_nanousd)


async def test_50_concurrent_calls_against_a_budget_worth_10() -> None:
    body = {"max_tokens": 5}  # the reply is 5 words: the call costs about what it reserves
    content = "one two three four five six"
    with rig(("primary",)) as r:
        per_call = estimate_of(r, content, **body)
        spent_before = r.gateway.local_budget.spent_today("acme", r.clock.time())
        r.gateway.budget_guard.daily["acme"] = spent_before + 10 * per_call
        r.ups["primary"].latency_s = 0.05  # all 50 are in flight together

        async with httpx.AsyncClient(base_url=r.server.url, timeout=20,
                                     limits=httpx.Limits(max_connections=60)) as client:
            async def one() -> httpx.Response:
                return await client.post(CHAT, headers=auth(),
                                         json=chat_body(content, model="auto",
                                                        **body))
            replies = await asyncio.gather(*(one() for _ in range(50)))
        codes = sorted(x.status_code for x in replies)
        assert codes.count(200) == 10 and codes.count(429) == 40
        refused = [x.json()["error"] for x in replies if x.status_code == 429]
        assert {e["code"] for e in refused} == {"insufficient_quota"}
        recs = r.recorder.wait(51)[1:]
        spent = sum(x.actual_cost_nanousd for x in recs)
        budget = r.gateway.budget_guard.daily["acme"] - spent_before
        assert 0 < spent <= budget
        book = r.gateway.local_budget
        assert book.spent_today("acme", r.clock.time()) == spent_before + spent
        assert book.reserved_today("acme", r.clock.time()) == 0
        assert sum(1 for x in recs if x.error_code == "insufficient_quota") == 40


def test_failed_call_releases_its_hold_and_a_cut_stream_settles_what_was_sent() -> None:
    with rig(("primary",)) as r:
        book = r.gateway.local_budget
        r.ups["primary"].add_fault(Fault(status=500, times=None))
        assert r.chat().status_code == 502
        assert book.reserved_today("acme", r.clock.time()) == 0
        assert book.spent_today("acme", r.clock.time()) == 0  # nothing billed
        r.ups["primary"].clear()
        r.ups["primary"].add_fault(Fault(kind="cut_stream", after_chunks=2))
        resp = r.chat(stream=True)
        assert resp.status_code == 200
        rec = r.recorder.wait(2)[-1]
        assert rec.outcome == "failed" and rec.actual_cost_nanousd > 0
        assert book.spent_today("acme", r.clock.time()) == rec.actual_cost_nanousd
        assert book.reserved_today("acme", r.clock.time()) == 0


def test_budget_spent_is_429_insufficient_quota_until_the_next_day() -> None:
    with rig(("primary",), tenant={"daily_usd": 0.0001}) as r:  # 100,000 nano-USD
        ok = 0
        while True:
            resp = r.chat(max_tokens=10)
            if resp.status_code != 200:
                break
            ok += 1
        assert ok > 0
        assert resp.status_code == 429
        assert resp.json()["error"]["code"] == "insufficient_quota"
        assert "daily budget of 0.0001 USD" in resp.json()["error"]["message"]
        r.clock.advance(86_400)  # a new UTC day
        assert r.chat(max_tokens=10).status_code == 200


async def test_50_concurrent_calls_against_the_shared_events_budget(tmp_path: Path) -> None:
    """The same, with the budget in the events layer (leases on JetStream)."""
    body = {"max_tokens": 5}
    content = "one two three four five six"
    nats = {"enabled": True, "url": "embedded", "data_dir": str(tmp_path / "data")}
    with rig(("primary",), real_clock=True, nats=nats) as r:
        svc = r.gateway.events
        assert svc is not None and r.gateway.budget_book() is svc.budget
        # The hold of one call, from the gateway's own policy, before any budget is leased.
        call = Call(CHAT_ENDPOINT, RequestInfo("probe", 0.0), r.gateway.config.tenants[0],
                    r.gateway.clock.time())
        call.body = json.dumps(chat_body(content, model="auto", **body)).encode()
        call.request = decode_chat(call.body)
        budget = 10 * r.gateway.policy.plan(call).max_cost_nanousd
        r.gateway.budget_guard.daily["acme"] = budget
        r.ups["primary"].latency_s = 0.05

        async with httpx.AsyncClient(base_url=r.server.url, timeout=20,
                                     limits=httpx.Limits(max_connections=60)) as client:
            async def one() -> httpx.Response:
                return await client.post(CHAT, headers=auth(),
                                         json=chat_body(content, model="auto", **body))
            replies = await asyncio.gather(*(one() for _ in range(50)))
        codes = [x.status_code for x in replies]
        assert codes.count(200) == 10 and codes.count(429) == 40, sorted(codes)
        recs = r.recorder.wait(50)
        spent = sum(x.actual_cost_nanousd for x in recs)
        assert 0 < spent <= budget
        deadline = time.monotonic() + 10
        while svc.budget.spent_today("acme") < spent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the call events fold into the view
        assert svc.budget.spent_today("acme") == spent


def call_across_midnight(r: Any) -> tuple[float, Any]:
    """One call that begins at 2026-01-01T23:59:59.9Z and is answered after midnight:
    (the instant it began, its record)."""
    clock = r.clock
    assert isinstance(clock, ManualClock)
    clock.advance(86_400 - 0.1)
    began = clock.time()
    r.ups["primary"].latency_s = 0.5  # holds the reply while the clock passes midnight
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(r.chat, max_tokens=10)
        r.ups["primary"].wait_for_requests(1)  # reserved: the call is upstream now
        clock.advance(0.2)
        resp = pending.result()
    assert resp.status_code == 200
    assert day_of(began) == "2026-01-01" and day_of(clock.time()) == "2026-01-02"
    rec = r.recorder.wait(1)[0]
    assert rec.actual_cost_nanousd > 0
    assert rec.occurred_at == began
    assert day_of(event_from_record(rec, "e-1").occurred_at) == "2026-01-01"
    return began, rec


def test_a_call_that_runs_past_midnight_is_reserved_settled_and_recorded_on_its_first_day(
        ) -> None:
    with rig(("primary",)) as r:
        began, rec = call_across_midnight(r)
        book = r.gateway.local_budget
        assert book.spent_today("acme", began) == rec.actual_cost_nanousd
        assert book.reserved_today("acme", began) == 0  # settled on the day it was reserved
        assert book.spent_today("acme", r.clock.time()) == 0
        assert book.reserved_today("acme", r.clock.time()) == 0


async def test_past_midnight_with_the_shared_events_budget(tmp_path: Path) -> None:
    nats = {"enabled": True, "url": "embedded", "data_dir": str(tmp_path / "data")}
    with rig(("primary",), nats=nats) as r:
        svc = r.gateway.events
        assert svc is not None and r.gateway.budget_book() is svc.budget
        began, rec = await asyncio.to_thread(call_across_midnight, r)
        assert rec.reservation_id  # granted from a lease on the stream
        deadline = time.monotonic() + 10
        while (svc.budget.spent_today("acme", began) < rec.actual_cost_nanousd
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)  # the call event folds into the view
        assert svc.budget.spent_today("acme", began) == rec.actual_cost_nanousd
        assert svc.budget.state.holds[rec.reservation_id].day == "2026-01-01"
        # The lease is of yesterday now: given back (on the gateway's clock) and folded,
        # which leaves the call's spend on the day it began.
        while rec.reservation_id in svc.budget.state.holds and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert rec.reservation_id not in svc.budget.state.holds
        assert svc.budget.spent_today("acme", began) == rec.actual_cost_nanousd
        assert svc.budget.spent_today("acme", r.clock.time()) == 0
