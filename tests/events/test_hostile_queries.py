"""Hostile query strings on every route that reads one: a 4xx in the OpenAI envelope or an
answer, never a 5xx; the gateway keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import ACME_KEY, ADMIN_KEY, Server, auth, chat_body, gateway_env, make_config
from tollway.app import create_app
from tollway.testing.upstream import FakeUpstream

QUERIES = [
    "days=abc", "days=", "days=-5", "days=0", "days=1e3", "days=3.5", "days=%D9%A3",
    "days=" + "9" * 5000, "days=99999999999999999999999", "days=%00", "days=+7",
    "since=2026-99-99", "since=abcdefghij", "since=%00%00%00%00-%00%00-%00%00",
    "until=%ff%fe%fd", "since=2026-01-01&until=2025-01-01", "since=" + "9" * 4000,
    "tenant=%00", "tenant=" + "a" * 4000, "tenant=acme&tenant=globex", "tenant=..%2F..",
    "tenant=%E2%80%AE", "route=%ff", "route=" + "r" * 4000, "%ff%fe=1", "a=1&" * 1000,
    "=&&==&", "%", "%zz=%zz",
]
PATHS = ["/api/ai/usage", "/api/ai/budget", "/api/ai/shadow", "/api/ai/v1/models",
         "/api/ai/providers", "/api/ai/health", "/api/ai/metrics"]


@pytest.fixture
def events_gateway(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Server]:
    cfg = make_config(upstream.base_url,
                      nats={"url": "embedded", "data_dir": str(tmp_path / "data")})
    with Server(create_app(cfg, env=gateway_env())) as server:
        yield server


def test_hostile_query_strings_never_get_a_5xx(events_gateway: Server) -> None:
    wrong = []
    with httpx.Client(base_url=events_gateway.url, timeout=10) as c:
        assert c.post("/api/ai/v1/chat/completions", json=chat_body(),
                      headers=auth()).status_code == 200
        for key in (ACME_KEY, ADMIN_KEY):
            for path in PATHS:
                for query in QUERIES:
                    r = c.get(f"{path}?{query}", headers=auth(key))
                    if r.status_code >= 500 or (r.status_code >= 400 and set(
                            r.json()["error"]) != {"message", "type", "param", "code"}):
                        wrong.append((path, query[:40], r.status_code, r.text[:200]))
        assert wrong == []
        assert c.get("/api/ai/usage", headers=auth()).json()["object"] == "usage"
