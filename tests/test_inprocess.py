"""``tollway.Gateway``, the in-process API: the same calls made over HTTP (uvicorn on
loopback, serving the same gateway's app) and in process produce the same events on a
real nats-server, field by field (ids, times and budget lease aside); errors are raised
with the status and envelope HTTP answers; a stream left early ends as a client that
left."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn

import tollway
from events.helpers import read_stream
from support import (
    ACME_KEY,
    HANG_S,
    UPSTREAM_KEY,
    auth,
    gateway_env,
    make_config,
    unlimited_acme,
)
from tollway.config import ServerConfig
from tollway.events.broker import connect
from tollway.events.schema import CallEvent
from tollway.server import uvicorn_config
from tollway.testing.upstream import FakeUpstream, Fault

# What differs between two calls however they come in: their ids, their times, and the
# budget lease each was granted from.
NOT_COMPARED = {"event_id", "request_id", "occurred_at", "latency_s", "ttft_s", "overhead_s",
                "reservation_id"}


class Both:
    def __init__(self, gw: tollway.Gateway, http: httpx.AsyncClient,
                 upstream: FakeUpstream) -> None:
        self.gw = gw
        self.http = http
        self.upstream = upstream


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Both]:
    """One gateway, called in process and over HTTP (its app on uvicorn, in this loop)."""
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        cfg = make_config(up.base_url, nats={"url": "embedded",
                                             "data_dir": str(tmp_path / "data")},
                          tenants=unlimited_acme(max_sensitivity="confidential"))
        async with tollway.Gateway(cfg, tenant="acme", env=gateway_env()) as gw:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            server = uvicorn.Server(uvicorn_config(gw.app, ServerConfig(), loop="asyncio"))
            task = asyncio.ensure_future(server.serve(sockets=[sock]))
            try:
                async with asyncio.timeout(HANG_S):
                    while not server.started:
                        await asyncio.sleep(0.01)
                url = f"http://127.0.0.1:{sock.getsockname()[1]}"
                async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                    yield Both(gw, http, up)
            finally:
                server.should_exit = True
                await task
                sock.close()


async def _events(gw: tollway.Gateway, ids: set[str]) -> dict[str, dict[str, Any]]:
    svc = gw.core.events
    assert svc is not None and svc.embedded is not None
    nc = await connect(svc.embedded.url)
    try:
        found: dict[str, dict[str, Any]] = {}
        for _ in range(200):  # a hang detector: events are published as the calls end
            found = {e.request_id: msgspec.to_builtins(e)
                     for _, _, e in await read_stream(nc, "tollway.call.>", timeout=0.5)
                     if isinstance(e, CallEvent) and e.request_id in ids}
            if len(found) == len(ids):
                break
        return found
    finally:
        await nc.close()


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    left = {k: v for k, v in a.items() if k not in NOT_COMPARED}
    right = {k: v for k, v in b.items() if k not in NOT_COMPARED}
    assert left == right


async def test_in_process_calls_are_the_http_calls_event_for_event(both: Both) -> None:
    gw, http = both.gw, both.http
    pairs: list[tuple[str, str]] = []  # (request id over HTTP, request id in process)

    # A plain chat with every hint, to a route alias: the same plan, cost and event.
    hints = {"X-Tollway-Task": "summarize", "X-Tollway-Sensitivity": "internal",
             "X-Tollway-Latency": "batch", "X-Tollway-Budget-Tier": "low",
             "X-Tollway-User": "u-1"}
    body = {"model": "auto", "messages": [{"role": "user", "content": "parity please"}],
            "temperature": 0}
    r = await http.post("/api/ai/v1/chat/completions", json=body,
                        headers={**auth(ACME_KEY), **hints})
    assert r.status_code == 200, r.text
    reply = await gw.chat(**body, task="summarize", sensitivity="internal", latency="batch",
                          budget_tier="low", user="u-1", request_id="inproc-chat")
    answer = r.json()["choices"][0]
    assert reply.choices[0].message.content == answer["message"]["content"] == "parity please"
    assert reply.choices[0].finish_reason == answer["finish_reason"]
    assert reply.usage is not None and reply.usage.total_tokens == r.json()["usage"][
        "total_tokens"]
    pairs.append((r.headers["x-request-id"], "inproc-chat"))

    # A stream with the usage chunk.
    sbody = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}],
             "stream_options": {"include_usage": True}}
    r = await http.post("/api/ai/v1/chat/completions", json={**sbody, "stream": True},
                        headers=auth(ACME_KEY))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    text, usage = [], None
    async with gw.chat_stream(**sbody, request_id="inproc-stream") as stream:
        async for chunk in stream:
            text += [c.delta.get("content") or "" for c in chunk.choices]
            usage = chunk.usage or usage
    assert "".join(text) == "one two three" and usage is not None
    pairs.append((r.headers["x-request-id"], "inproc-stream"))

    # Embeddings.
    r = await http.post("/api/ai/v1/embeddings", headers=auth(ACME_KEY),
                        json={"model": "text-embedding-3-small", "input": ["a b", "c"]})
    assert r.status_code == 200
    vectors = await gw.embeddings(model="text-embedding-3-small", input=["a b", "c"],
                                  request_id="inproc-emb")
    assert [e.embedding for e in vectors.data] == [e["embedding"] for e in r.json()["data"]]
    pairs.append((r.headers["x-request-id"], "inproc-emb"))

    # A refusal (the policy: restricted data above the tenant's cap) ...
    r = await http.post("/api/ai/v1/chat/completions", json=body,
                        headers={**auth(ACME_KEY), "X-Tollway-Sensitivity": "restricted"})
    with pytest.raises(tollway.APIError) as refused:
        await gw.chat(**body, sensitivity="restricted", request_id="inproc-refused")
    assert (refused.value.status, refused.value.code) == (
        r.status_code, r.json()["error"]["code"]) == (403, "sensitivity_not_allowed")
    pairs.append((r.headers["x-request-id"], "inproc-refused"))

    # ... and a failure (the provider's 500 on every try): retried and failed alike.
    both.upstream.add_fault(Fault(status=500, times=None))
    r = await http.post("/api/ai/v1/chat/completions", json=body, headers=auth(ACME_KEY))
    with pytest.raises(tollway.APIError) as failed:
        await gw.chat(**body, request_id="inproc-failed")
    both.upstream.clear()
    assert failed.value.status == r.status_code >= 500
    assert failed.value.message == r.json()["error"]["message"]
    pairs.append((r.headers["x-request-id"], "inproc-failed"))

    events = await _events(gw, {rid for pair in pairs for rid in pair})
    assert len(events) == 2 * len(pairs)
    for over_http, in_process in pairs:
        _same(events[over_http], events[in_process])
    assert [events[p][k] for p in ("inproc-chat", "inproc-refused", "inproc-failed")
            for k in ("outcome",)] == ["completed", "rejected", "failed"]
    assert events["inproc-chat"]["task"] == "summarize" and events["inproc-chat"]["tier"] == "low"


async def test_a_stream_left_early_ends_as_a_client_that_left(both: Both) -> None:
    gw = both.gw
    both.upstream.chunk_delay_s = 0.05  # the stream is still under way when we leave
    try:
        async with gw.chat_stream(model="gpt-4o-mini", request_id="left-early", messages=[
                {"role": "user", "content": " ".join(["word"] * 40)}]) as stream:
            async for _ in stream:
                break
    finally:
        both.upstream.chunk_delay_s = 0.0
    events = await _events(gw, {"left-early"})
    assert events["left-early"]["client_cancelled"] is True
    assert events["left-early"]["stream"] is True


async def test_errors_are_raised_as_http_would_answer_them(both: Both) -> None:
    gw = both.gw
    with pytest.raises(tollway.APIError) as missing:
        await gw.chat(model="no-such", messages=[{"role": "user", "content": "x"}])
    assert (missing.value.status, missing.value.code, missing.value.param) == (
        404, "model_not_found", "model")
    with pytest.raises(tollway.APIError) as bad:
        await gw.chat(model="gpt-4o-mini", messages=[])
    assert bad.value.status == 400 and bad.value.param == "messages"
    with pytest.raises(tollway.APIError) as stranger:
        await gw.chat(model="auto", tenant="nobody", messages=[{"role": "user", "content": "x"}])
    assert stranger.value.code == "unknown_tenant"
    with pytest.raises(tollway.APIError) as streamed:
        async with gw.chat_stream(model="no-such", messages=[{"role": "user", "content": "x"}]):
            pass
    assert streamed.value.status == 404


async def test_calls_need_the_gateway_running_and_each_has_an_access_line(
        log_lines: io.StringIO) -> None:
    with FakeUpstream(api_key=UPSTREAM_KEY) as up:
        gw = tollway.Gateway(make_config(up.base_url), tenant="acme", env=gateway_env())
        with pytest.raises(RuntimeError, match="not running"):
            await gw.chat(model="auto", messages=[{"role": "user", "content": "x"}])
        async with gw:
            done = await gw.chat(model="auto", messages=[{"role": "user", "content": "x"}],
                                 request_id="logged-1")
            assert done.choices[0].message.content == "x"
        assert not gw.core.running
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (access,) = [line for line in lines if line.get("request_id") == "logged-1"
                 and line["msg"] == "request"]
    assert (access["method"], access["path"], access["status"]) == (
        "CALL", "/api/ai/v1/chat/completions", 200)
