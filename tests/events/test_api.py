"""End to end: HTTP calls through the gateway (embedded NATS, simulated upstream) -> one
event per call in the stream -> GET /api/ai/usage and /api/ai/budget from the views."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
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
    serving_port,
)
from tollway.app import create_app
from tollway.auth import hash_key
from tollway.events.broker import connect
from tollway.events.schema import CallCompleted, CallFailed, CallRejected
from tollway.testing.upstream import FakeUpstream, Fault

from .helpers import read_stream


@pytest.fixture
def events_gateway(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Server]:
    cfg = make_config(upstream.base_url,
                      nats={"url": "embedded", "data_dir": str(tmp_path / "data")},
                      events={"checkpoint_interval_s": 0.5})
    with Server(create_app(cfg, env=gateway_env())) as server:
        yield server


def test_calls_become_events_and_views(events_gateway: Server, upstream: FakeUpstream) -> None:
    gateway = events_gateway.app.state.gateway
    svc = gateway.events
    assert svc is not None and svc.embedded is not None
    ids: dict[str, str] = {}  # request id -> expected outcome
    with httpx.Client(base_url=events_gateway.url, timeout=20) as c:
        for i in range(12):
            r = c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY),
                       json=chat_body(f"hello {i}", stream=i % 3 == 0,
                                      stream_options={"include_usage": True}))
            assert r.status_code == 200, r.text
            ids[r.headers["x-request-id"]] = "completed"
        upstream.add_fault(Fault(status=500, times=50))
        r = c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY), json=chat_body())
        assert r.status_code >= 500
        ids[r.headers["x-request-id"]] = "failed"
        upstream.clear()
        r = c.post("/api/ai/v1/chat/completions", headers=auth(GLOBEX_KEY),
                   json=chat_body(model="gpt-4o-mini"))  # globex may only use "fast"
        assert 400 <= r.status_code < 500
        ids[r.headers["x-request-id"]] = "rejected"

        def usage_of(key: str, **params: str) -> dict[str, Any]:
            resp = c.get("/api/ai/usage", headers=auth(key), params=params)
            assert resp.status_code == 200, resp.text
            body: dict[str, Any] = resp.json()
            return body

        assert eventually(lambda: usage_of(ADMIN_KEY)["total"]["requests"] == 14), (
            "the usage view caught up with the calls")
        # The answer covers the days the view keeps, however far back it is asked.
        kept = usage_of(ADMIN_KEY, days="3000")
        newest = date.fromisoformat(max(d["key"] for d in kept["by_day"]))
        assert kept["retention_days"] == 90
        assert kept["since"] == (newest - timedelta(days=89)).isoformat()
        acme = usage_of(ACME_KEY)
        assert acme["total"]["requests"] == 13
        assert acme["tenant"] == "acme"
        assert acme["total"]["completed"] == 12 and acme["total"]["failed"] == 1
        assert acme["total"]["prompt_tokens"] > 0 and acme["total"]["cost_nanousd"] > 0
        assert {m["key"] for m in acme["by_model"]} == {"gpt-4o-mini"}
        assert {r["tenant"] for r in acme["rows"]} == {"acme"}
        # A tenant never sees another's usage; the admin may ask for any.
        assert c.get("/api/ai/usage", headers=auth(GLOBEX_KEY),
                     params={"tenant": "acme"}).status_code == 403
        globex = usage_of(GLOBEX_KEY)
        assert globex["total"]["requests"] == 1 and globex["total"]["rejected"] == 1
        assert usage_of(ADMIN_KEY, tenant="acme")["total"] == acme["total"]
        assert usage_of(ADMIN_KEY)["total"]["requests"] == 14

        budget = c.get("/api/ai/budget", headers=auth(ACME_KEY)).json()
        assert budget["tenant"] == "acme" and budget["tier"] == "standard"
        assert budget["max_call_usd"] == pytest.approx(0.01)
        assert budget["daily_nanousd"] == 1_000_000_000
        assert budget["spent_nanousd"] == acme["total"]["cost_nanousd"]
        assert budget["remaining_nanousd"] == (budget["daily_nanousd"] - budget["spent_nanousd"]
                                               - budget["reserved_nanousd"])
        assert c.get("/api/ai/budget", headers=auth(ADMIN_KEY)).status_code == 400
        assert c.get("/api/ai/budget", headers=auth(ADMIN_KEY),
                     params={"tenant": "globex"}).json()["tier"] == "low"
        assert c.get("/api/ai/ready").status_code == 200

        # The views can fold an event before its publish ack has been counted: poll.
        # Besides the 14 call events, budget holds publish their own events.
        assert eventually(lambda: published_total(c) >= 14)
        assert "tollway_events_outbox_depth 0.0" in c.get("/api/ai/metrics").text
        published = published_total(c)

    async def stream_events(subjects: str) -> list[Any]:
        nc = await connect(svc.url)
        try:
            return [e for _, _, e in await read_stream(nc, subjects)]
        finally:
            await nc.close()

    # Budget leases are compare-and-set publishes of their own, outside the publisher.
    everything = asyncio.run(stream_events("tollway.>"))
    queued = [e for e in everything if type(e).__name__ != "BudgetReserved"]
    # A call granted from a lease names it in its event; nothing else is published per call.
    leases = {e.reservation_id for e in everything if type(e).__name__ == "BudgetReserved"}
    assert leases and not [e for e in everything if type(e).__name__ == "BudgetSettled"]
    assert published == len(queued), "the published counter counts every queued event"
    events = asyncio.run(stream_events("tollway.call.>"))
    assert Counter(e.request_id for e in events) == dict.fromkeys(ids, 1), "one event per call"
    kinds = {"completed": CallCompleted, "failed": CallFailed, "rejected": CallRejected}
    for e in events:
        assert type(e) is kinds[ids[e.request_id]]
        assert (e.reservation_id in leases) == (e.tenant == "acme"), e  # globex: refused
    streamed = [e for e in events if isinstance(e, CallCompleted) and e.stream]
    assert len(streamed) == 4 and all(e.completion_tokens > 0 for e in streamed)


def published_total(c: httpx.Client) -> float:
    for line in c.get("/api/ai/metrics").text.splitlines():
        if line.startswith("tollway_events_published_total "):
            return float(line.split()[1])
    return 0.0


def test_events_disabled_means_no_views(gateway: Server) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        r = c.get("/api/ai/usage", headers=auth(ACME_KEY))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/api/ai/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_a_full_outbox_drops_counts_and_logs_while_calls_are_served(
        upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on: NATS is down from the start
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_config(upstream.base_url,
                      nats={"url": f"nats://127.0.0.1:{port}", "data_dir": str(tmp_path)},
                      events={"outbox_max_bytes": 4096})
    with Server(create_app(cfg, env=gateway_env())) as server, \
            httpx.Client(base_url=server.url, timeout=20) as c:
        for i in range(20):
            r = c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY),
                       json=chat_body(f"hello {i}"))
            assert r.status_code == 200, r.text
        dropped = 'tollway_events_dropped_total{reason="outbox_full"}'
        assert eventually(lambda: _metric(c, dropped) > 0), "events past the cap are counted"
        assert 0 < _metric(c, "tollway_events_outbox_bytes") <= 4096
        assert _metric(c, "tollway_events_outbox_max_bytes") == 4096
        kept = _metric(c, "tollway_events_outbox_depth")
        r = c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY), json=chat_body())
        assert r.status_code == 200, "still served with the outbox full"
    assert kept > 0 and "reached its cap of 4096" in caplog.text


# The gateway in a process whose files cannot grow past this many bytes (RLIMIT_FSIZE:
# writes past it fail with EFBIG, as they fail with ENOSPC on a full disk; no root, no
# mount). Its outbox is the only file it writes (its log goes to a pipe, which the limit
# does not cover).
DISK_BYTES = 12_000


def _serve_on_a_full_disk(config: Path, log: list[str]
                          ) -> tuple[subprocess.Popen[str], int, threading.Thread]:
    launch = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
              f"({DISK_BYTES}, {DISK_BYTES})); "
              "os.execv(sys.executable, [sys.executable, '-m', 'tollway.cli', *sys.argv[1:]])")
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, "serve", "--config", str(config), "--port", "0"],
        env={**os.environ, **gateway_env()}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    port = serving_port(proc)
    assert port, "serve did not report its port"
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
    reader.start()
    return proc, port, reader


def test_a_full_disk_drops_counts_and_logs_while_calls_are_served(
        upstream: FakeUpstream, tmp_path: Path) -> None:
    with socket.socket() as s:  # NATS down: every event goes to the outbox, until it can't
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "tollway.toml"
    config.write_text(textwrap.dedent(f"""
        [server]
        builtin_models = false
        builtin_providers = false
        admin_key_env = "TOLLWAY_ADMIN_KEY"
        [nats]
        url = "nats://127.0.0.1:{port}"
        data_dir = "{tmp_path / 'data'}"
        [[providers]]
        name = "fake"
        base_url = "{upstream.base_url}"
        api_key_env = "FAKE_API_KEY"
        [[models]]
        id = "gpt-4o-mini"
        provider = "fake"
        [[tenants]]
        id = "acme"
        tier = "standard"
        key_sha256 = ["{hash_key(ACME_KEY)}"]
        limits = {{ per_minute = 10000 }}
    """))
    log: list[str] = []
    proc, port, reader = _serve_on_a_full_disk(config, log)
    calls = 60
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as c:
            statuses = Counter(
                c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY),
                       json=chat_body(f"hello {i}")).status_code for i in range(calls))
            assert statuses == {200: calls}, "the calls are served with the disk full"
            dropped = 'tollway_events_dropped_total{reason="outbox_unwritable"}'
            assert eventually(lambda: _metric(c, dropped) > 0), "the events it lost count"
            # Every event is in the outbox or counted as dropped: calls, and budget leases.
            leases = _metric(c, "tollway_budget_local_reservations_total")
            assert eventually(lambda: _metric(c, "tollway_events_outbox_depth")
                               + _metric(c, dropped) == calls + leases)
            kept = _metric(c, "tollway_events_outbox_depth")
            assert kept > 0
            r = c.post("/api/ai/v1/chat/completions", headers=auth(ACME_KEY), json=chat_body())
            assert r.status_code == 200, "still served"
    finally:
        proc.terminate()
        code = proc.wait(15)
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    assert any("outbox not writable" in line for line in log)
    assert any("events dropped (outbox_unwritable)" in line for line in log)
    assert not [line for line in log if "Traceback" in line], "".join(log[-40:])
    # What was written is whole lines: a restart would send each of them.
    (outbox,) = [p for p in (tmp_path / "data" / "outbox").glob("events-*.log")]
    body = outbox.read_bytes()
    assert body.endswith(b"\n") and body.count(b"\n") >= kept
