"""Admin endpoints: provider listing without secrets, and the live connection test."""

from __future__ import annotations

import httpx

from support import ADMIN_KEY, UPSTREAM_KEY, auth
from tollway.testing.upstream import FakeUpstream, Fault


def test_providers_listing(client: httpx.Client, upstream: FakeUpstream) -> None:
    r = client.get("/api/ai/providers", headers=auth(ADMIN_KEY))
    assert r.status_code == 200
    (p,) = r.json()["data"]
    assert p["name"] == "fake" and p["configured"] is True and p["local"] is False
    assert p["base_url_host"] == f"127.0.0.1:{upstream.port}"
    assert set(p["models"]) == {"gpt-4o-mini", "fast", "text-embedding-3-small"}
    assert UPSTREAM_KEY not in r.text


def test_provider_connection_test(client: httpx.Client, upstream: FakeUpstream) -> None:
    r = client.post("/api/ai/providers/fake/test", headers=auth(ADMIN_KEY))
    assert r.status_code == 200
    result = r.json()
    assert result["ok"] is True and result["status"] == 200 and result["models"] > 0
    assert result["latency_ms"] >= 0
    assert upstream.requests[-1].method == "GET" and upstream.requests[-1].path == "/v1/models"

    upstream.add_fault(Fault(status=503, path="/models"))
    failed = client.post("/api/ai/providers/fake/test", headers=auth(ADMIN_KEY)).json()
    assert failed["ok"] is False and failed["status"] == 503

    upstream.add_fault(Fault(kind="reset", path="/models"))
    broken = client.post("/api/ai/providers/fake/test", headers=auth(ADMIN_KEY)).json()
    assert broken["ok"] is False and "fake" in broken["error"]
    assert UPSTREAM_KEY not in str(broken)

    missing = client.post("/api/ai/providers/nope/test", headers=auth(ADMIN_KEY))
    assert missing.status_code == 404


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/api/ai/health").json()["status"] == "ok"
    ready = client.get("/api/ai/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
