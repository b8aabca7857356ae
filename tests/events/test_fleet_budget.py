"""One daily budget, four gateway processes: two ``tollway serve --workers 2`` on one NATS.

The tenant's budget is worth 10.5 calls; 50 calls arrive at once, spread over
both instances (and, through each one's shared socket, over its two workers).
Every call holds and costs exactly what it may: input is free and the
provider replies with ``max_tokens`` tokens, so a process that granted a call
the others had already covered would show as spend over the budget.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx

from fleet_rig import CHAT, Fleet, write_config
from support import ACME_KEY, HANG_S, UPSTREAM_KEY, auth, chat_body
from tollway.events.broker import EmbeddedNats, connect
from tollway.events.schema import CallEvent
from tollway.testing.upstream import FakeUpstream

from .helpers import read_stream

MAX_TOKENS = 50
NANO_PER_TOKEN = 1_000  # output at 1 USD per million tokens
CALL = MAX_TOKENS * NANO_PER_TOKEN  # what one call holds, and costs
LIMIT = CALL * 21 // 2  # the tenant's day: 10.5 calls
CALLS = 50


async def _call_events(url: str, n: int) -> list[CallEvent]:
    """The stream's call events for acme, once there are ``n`` of them."""
    nc = await connect(url)
    try:
        deadline = time.monotonic() + HANG_S
        while True:
            events = [e for _, _, e in await read_stream(nc, "tollway.call.*.acme")
                      if isinstance(e, CallEvent)]
            if len(events) >= n or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def test_four_processes_spend_one_budget_and_never_more(
        tmp_path: Path, nats_server: EmbeddedNats) -> None:
    # Replies take a moment, so the 50 calls hold their reservations at the same time.
    with FakeUpstream(api_key=UPSTREAM_KEY, reply_words=4 * MAX_TOKENS, latency_s=0.05,
                      record=False) as up:
        cfg = write_config(tmp_path, up.base_url, nats=nats_server.url,
                           daily_usd=LIMIT / 1e9, input_usd_per_mtok=0.0,
                           output_usd_per_mtok=NANO_PER_TOKEN / 1000)
        fleets = [Fleet(cfg), Fleet(cfg)]
        try:
            for fleet in fleets:
                fleet.start()
            limits = httpx.Limits(max_connections=CALLS, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=HANG_S, limits=limits) as client:
                go = asyncio.Event()

                async def one(i: int) -> httpx.Response:
                    await go.wait()
                    return await client.post(
                        fleets[i % 2].url + CHAT, headers=auth(ACME_KEY),
                        json=chat_body(f"call {i}", max_tokens=MAX_TOKENS))

                calls = asyncio.gather(*(one(i) for i in range(CALLS)))
                go.set()
                answers = await calls
                events = await _call_events(nats_server.url, CALLS)
                usage = budget = None
                deadline = time.monotonic() + HANG_S
                while time.monotonic() < deadline:  # each process's view, caught up
                    views = [(await client.get(f.url + "/api/ai/usage", headers=auth())).json()
                             for f in fleets for _ in range(4)]
                    if all(v["total"]["requests"] == CALLS for v in views):
                        usage = views[0]["total"]
                        budget = (await client.get(fleets[1].url + "/api/ai/budget",
                                                   headers=auth())).json()
                        break
                    await asyncio.sleep(0.1)
        finally:
            for fleet in fleets:
                fleet.stop()

    statuses = Counter(r.status_code for r in answers)
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert set(statuses) <= {200, 429}, statuses
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert served and len(refused) >= CALLS - 11, statuses
    spent = sum(e.actual_cost_nanousd for e in events if e.outcome == "completed")
    assert len(events) == CALLS and len({e.request_id for e in events}) == CALLS
    assert 0 < spent <= LIMIT, f"spend {spent} nano-USD over the budget of {LIMIT}"
    header_spend = sum(round(float(r.headers["x-tollway-cost-usd"]) * 1e9) for r in served)
    assert header_spend == spent
    assert usage is not None and budget is not None, "the views caught up"
    assert usage["cost_nanousd"] == spent and usage["completed"] == len(served)
    assert budget["spent_nanousd"] == spent <= budget["daily_nanousd"] == LIMIT
    # Both instances answered (each instance's two workers share its port).
    assert len({e.instance for e in events}) >= 2
