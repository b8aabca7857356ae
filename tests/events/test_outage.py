"""NATS stopped while the gateway serves: every call answered, the guards still refuse, and
every call's event is in the stream once NATS is back (by request id: none lost, none twice).

The outage is a few seconds here; ``benchmarks/faults.py`` stops NATS for 30 s at 100 calls/s.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from support import (
    ACME_KEY,
    GLOBEX_KEY,
    INITECH_KEY,
    Server,
    auth,
    chat_body,
    gateway_env,
    make_config,
)
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.events.broker import EmbeddedNats, connect
from tollway.testing.upstream import FakeUpstream

from .helpers import read_stream

CHAT = "/api/ai/v1/chat/completions"
OUTAGE_S = 3.0
RATE = 25.0  # calls/s of the background load
PER_MINUTE = 5  # globex: the rate limit the outage must not lift
DAILY_USD = 0.0004  # initech: about three calls of 50 output tokens on "fast"
MAX_TOKENS = 50


class Load(threading.Thread):
    """acme's calls at a steady rate, one in four streamed, until halted."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.results: list[tuple[int, str, bool]] = []  # status, request id, stream ended

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as c:
            due = time.monotonic()
            while not self.halt.is_set():
                stream = len(self.results) % 4 == 0
                r = c.post(CHAT, headers=auth(ACME_KEY),
                           json=chat_body(f"call {len(self.results)}", stream=stream))
                self.results.append((r.status_code, r.headers.get("x-request-id", ""),
                                     r.text.rstrip().endswith("data: [DONE]")))
                due += 1 / RATE
                self.halt.wait(max(0.0, due - time.monotonic()))


def _until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def _call_ids(url: str) -> Counter[str]:
    async def read() -> Counter[str]:
        nc = await connect(url)
        try:
            return Counter(e.request_id for _, _, e in await read_stream(nc, "tollway.call.>")
                           if e is not None)
        finally:
            await nc.close()

    return asyncio.run(read())


def test_nats_stopped_under_load(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.reply_words = MAX_TOKENS  # a reply fills its max_tokens: it costs its hold
    srv = EmbeddedNats(tmp_path / "nats")
    srv.start()
    generous = {"per_minute": 10_000, "per_hour": 100_000, "per_day": 1_000_000}
    cfg = make_config(
        upstream.base_url, nats={"url": srv.url, "data_dir": str(tmp_path / "data")},
        tenants=[
            {"id": "acme", "tier": "premium", "key_sha256": [hash_key(ACME_KEY)],
             "limits": generous},
            {"id": "globex", "tier": "premium", "key_sha256": [hash_key(GLOBEX_KEY)],
             "limits": {**generous, "per_minute": PER_MINUTE}},
            {"id": "initech", "tier": "low", "key_sha256": [hash_key(INITECH_KEY)],
             "limits": generous, "daily_usd": DAILY_USD},
        ])
    try:
        with Server(create_app(cfg, env=gateway_env())) as server, \
                httpx.Client(base_url=server.url, timeout=20) as c:
            load = Load(server.url)
            load.start()
            assert _until(lambda: len(load.results) >= 10)
            srv.kill()
            down_at = time.monotonic()
            assert _until(lambda: c.get("/api/ai/ready").status_code == 503)

            # The guards keep refusing while the event log is away.
            def call(key: str) -> httpx.Response:
                return c.post(CHAT, headers=auth(key),
                              json=chat_body(model="fast", max_tokens=MAX_TOKENS))

            limited = [call(GLOBEX_KEY) for _ in range(PER_MINUTE + 3)]
            assert [r.status_code for r in limited] == [200] * PER_MINUTE + [429] * 3
            assert {r.json()["error"]["code"] for r in limited[PER_MINUTE:]} == {
                "rate_limit_exceeded"}
            budgeted = [call(INITECH_KEY) for _ in range(8)]
            served = [r for r in budgeted if r.status_code == 200]
            refused = budgeted[len(served):]
            assert served and refused, [(r.status_code, r.headers.get("x-tollway-cost-usd"))
                                        for r in budgeted]
            assert {(r.status_code, r.json()["error"]["code"]) for r in refused} == {
                (429, "insufficient_quota")}
            assert sum(float(r.headers["x-tollway-cost-usd"]) for r in served) <= DAILY_USD

            time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
            during = len(load.results)
            srv.start()  # same port and store
            assert _until(lambda: c.get("/api/ai/ready").status_code == 200)
            assert _until(lambda: len(load.results) >= during + 10)
            load.halt.set()
            load.join(10)

            assert load.results and all(s == 200 for s, _, _ in load.results), Counter(
                s for s, _, _ in load.results)
            assert all(done for _, _, done in load.results[::4]), "every stream ended whole"
            ids = [rid for _, rid, _ in load.results] + [
                r.headers["x-request-id"] for r in limited + budgeted]
            want = dict.fromkeys(ids, 1)
            landed = _until(lambda: (got := _call_ids(srv.url)) == want and got)
            assert landed == want, (len(want), sum((landed or _call_ids(srv.url)).values()))
    finally:
        srv.stop()
