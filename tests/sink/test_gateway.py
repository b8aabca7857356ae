"""Against a live gateway: calls through HTTP become events, the sink writes them, and the
sums in SQL equal what GET /api/ai/usage reports."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from support import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    Server,
    auth,
    chat_body,
    eventually,
    gateway_env,
    make_config,
    unlimited_acme,
)
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.events.broker import connect
from tollway.sink.postgres import PostgresSink
from tollway.testing.upstream import FakeUpstream, Fault


@pytest.fixture
def gateway(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Server]:
    cfg = make_config(upstream.base_url,
                      nats={"url": "embedded", "data_dir": str(tmp_path / "data")},
                      tenants=[*unlimited_acme(), {"id": "globex", "tier": "low",
                                                   "key_sha256": [hash_key(GLOBEX_KEY)],
                                                   "models": ["fast"]}])
    with Server(create_app(cfg, env=gateway_env())) as server:
        yield server


def test_sql_sums_equal_the_usage_api(gateway: Server, upstream: FakeUpstream,
                                      dsn: str) -> None:
    with httpx.Client(base_url=gateway.url, timeout=20) as c:
        for i in range(10):
            r = c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY),
                       json=chat_body(f"hello {i}", model="auto" if i % 2 else "gpt-4o-mini",
                                      stream=i % 3 == 0,
                                      stream_options={"include_usage": True}))
            assert r.status_code == 200, r.text
        r = c.post("/api/ai/v1/chat/completions", headers=auth(GLOBEX_KEY),
                   json=chat_body(model="fast"))
        assert r.status_code == 200, r.text
        upstream.add_fault(Fault(status=500, times=50))
        assert c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY),
                      json=chat_body()).status_code >= 500
        upstream.clear()
        assert c.post("/api/ai/v1/chat/completions", headers=auth(GLOBEX_KEY),
                      json=chat_body(model="gpt-4o-mini")).status_code == 403

        def usage() -> dict[str, Any]:
            body: dict[str, Any] = c.get("/api/ai/usage", headers=auth(ADMIN_KEY)).json()
            return body

        assert eventually(lambda: usage()["total"]["requests"] == 13)
        api = usage()

    svc = gateway.app.state.gateway.events
    assert svc is not None and svc.embedded is not None

    async def sink() -> None:
        nc = await connect(svc.embedded.url)
        try:
            await PostgresSink(nc, dsn, migrate=True).run(until_caught_up=True)
        finally:
            await nc.close()

    asyncio.run(sink())
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT day::text, tenant, model, provider, requests, completed, failed, rejected, "
            "prompt_tokens, completion_tokens, cost_nanousd FROM usage_daily").fetchall()
        total = conn.execute("SELECT count(*), sum(prompt_tokens), sum(completion_tokens), "
                             "sum(actual_cost_nanousd) FROM calls").fetchone()
    keys = ("day", "tenant", "model", "provider", "requests", "completed", "failed",
            "rejected", "prompt_tokens", "completion_tokens", "cost_nanousd")
    assert sorted(rows) == sorted(tuple(r[k] for k in keys) for r in api["rows"])
    t = api["total"]
    assert total == (t["requests"], t["prompt_tokens"], t["completion_tokens"],
                     t["cost_nanousd"])
    assert t["cost_nanousd"] > 0 and t["failed"] == 1 and t["rejected"] == 1
