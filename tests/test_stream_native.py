"""The native relay (pipeline/native.py, rust_core/src/relay.rs) against the Python one.

Two gateways in front of one scripted provider, ``[streams] native_relay`` on in one and
off in the other, get the same streams: what each client receives is the same bytes, and
the records bill the same (from the usage chunk, or counted when there is none). The
streams are paced (each event its own read after the first token), so the native
gateway hands every one of them to the Rust relay; the tests check that it did. Also:
an upstream that breaks mid-stream ends it with the same error event, a client that
leaves mid-stream is billed and recorded as cancelled, and a few hundred streams at once
all come through whole.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support import (
    HANG_S,
    ListRecorder,
    Server,
    auth,
    eventually,
    gateway_env,
    make_config,
    unlimited_acme,
)
from test_stream_relay import SHAPES, forwarded, provider_stream, usage_of
from tollway.app import create_app
from tollway.pipeline.stream import DONE
from tollway.testing.scripted import RESET, ScriptedUpstream, Step

CHAT = "/api/ai/v1/chat/completions"
_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n")


def paced(pieces: list[bytes], pause: float = 0.002, end: list[Step] | None = None
          ) -> list[Step]:
    steps: list[Step] = [_HEAD]
    for piece in pieces:
        steps += [b"%x\r\n%s\r\n" % (len(piece), piece), pause]
    steps += [b"0\r\n\r\n"] if end is None else end
    return steps


class Gateway:
    def __init__(self, server: Server, recorder: ListRecorder, client: httpx.Client) -> None:
        self.server, self.recorder, self.client = server, recorder, client

    @property
    def taken(self) -> int:
        relay = self.server.app.state.gateway.pipeline.dispatcher._relay_core
        return 0 if relay is None else relay.taken

    def running(self) -> int:
        relay = self.server.app.state.gateway.pipeline.dispatcher._relay_core
        return 0 if relay is None else relay.core.running()


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[list[list[Step]], Gateway, Gateway]]:
    answer: list[list[Step]] = []
    with ScriptedUpstream(lambda req: answer[0]) as up:
        gateways: list[Gateway] = []
        servers = []
        for native in (True, False):
            # A tier whose budget holds a few hundred streams at once.
            cfg = make_config(f"http://127.0.0.1:{up.port}/v1", tenants=unlimited_acme(
                tier="wide"), tiers={"wide": {"max_call_usd": 1.0, "daily_usd": 10**6}},
                streams={"native_relay": native})
            recorder = ListRecorder()
            server = Server(create_app(cfg, env=gateway_env(), recorder=recorder))
            servers.append(server.__enter__())
            gateways.append(Gateway(server, recorder, httpx.Client(base_url=server.url,
                                                                   timeout=HANG_S)))
        try:
            yield answer, gateways[0], gateways[1]
        finally:
            for g, server in zip(gateways, servers, strict=True):
                g.client.close()
                server.__exit__(None, None, None)


def _body(keep_usage: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "stream": True,
            "stream_options": {"include_usage": keep_usage},
            "messages": [{"role": "user", "content": "Weather in Paris?"}], **extra}


def _same(content: bytes) -> bytes:
    """Events the gateway writes itself carry the time: not what is compared."""
    return re.sub(rb'"created":\d+', b'"created":0', content)


def both(pair: tuple[list[list[Step]], Gateway, Gateway], steps: list[Step],
         body: dict[str, Any]) -> tuple[bytes, Any, bytes, Any]:
    """The stream through each gateway: (native bytes, record, python bytes, record)."""
    answer, native, python = pair
    answer[:] = [steps]
    out = []
    for g in (native, python):
        calls = len(g.recorder.records)
        r = g.client.post(CHAT, headers=auth(), json=body)
        assert r.status_code == 200
        out += [r.content, g.recorder.wait(calls + 1)[-1]]
    return out[0], out[1], out[2], out[3]


def _billing(rec: Any) -> tuple[Any, ...]:
    return (rec.prompt_tokens, rec.completion_tokens, rec.actual_cost_nanousd, rec.outcome,
            rec.status, rec.client_cancelled, rec.error_code)


@pytest.mark.parametrize("split", ["event a read", "events split across reads"])
@pytest.mark.parametrize("keep_usage", [True, False], ids=["asked usage", "did not ask"])
@pytest.mark.parametrize("usage", [True, False], ids=["usage chunk", "no usage chunk"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_native_relay_sends_the_python_relays_bytes_and_bills_the_same(
        pair: tuple[list[list[Step]], Gateway, Gateway], shape: str, usage: bool,
        keep_usage: bool, split: str) -> None:
    _, native, python = pair
    events = provider_stream(shape, usage)
    if split == "event a read":
        pieces = events
    else:  # the first two events whole (the first token), then 61-byte pieces, CRLF
        rest = b"".join(events[2:]).replace(b"\n", b"\r\n")
        pieces = events[:2] + [rest[i:i + 61] for i in range(0, len(rest), 61)]
    body = _body(keep_usage, **{k: v for k, v in SHAPES[shape].items() if k != "refusal"})
    taken = native.taken, python.taken
    got, rec, want, python_rec = both(pair, paced(pieces), body)
    assert (native.taken, python.taken) == (taken[0] + 1, taken[1])
    assert _same(got) == _same(want)
    assert got.endswith(DONE)
    if usage or not keep_usage:
        assert got == forwarded(events, keep_usage) + DONE
    assert _billing(rec) == _billing(python_rec)
    assert rec.outcome == "completed" and not rec.client_cancelled
    found = usage_of(events)
    if found is not None:  # billed from the usage chunk, else counted from the text
        assert (rec.prompt_tokens, rec.completion_tokens) == (
            found["prompt_tokens"], found["completion_tokens"])
    else:
        assert rec.completion_tokens > 0


@pytest.mark.parametrize("end", ["reset", "error event", "no [DONE]"])
def test_a_stream_the_upstream_breaks_ends_as_in_python(
        pair: tuple[list[list[Step]], Gateway, Gateway], end: str) -> None:
    _, native, _ = pair
    events = [e for e in provider_stream("content", False) if e != DONE]
    steps: list[Step]
    if end == "reset":
        steps = paced(events[:-1], end=[RESET])
    elif end == "error event":
        error = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
        # After as many reads as the other ends get: the hand-off may wait for the
        # client's bytes a few reads (native.TRIES) on a loaded machine.
        steps = paced([*events[:-1], error])
    else:
        steps = paced(events)
    taken = native.taken
    got, rec, want, python_rec = both(pair, steps, _body())
    assert native.taken == taken + 1
    assert _same(got) == _same(want)
    assert b'"error"' in got.split(b"\n\n")[-2] and not got.endswith(DONE)
    assert _billing(rec) == _billing(python_rec)
    assert rec.outcome == "failed" and rec.completion_tokens > 0


def test_a_client_leaving_mid_stream_is_billed_and_recorded_as_cancelled(
        pair: tuple[list[list[Step]], Gateway, Gateway]) -> None:
    answer, native, _ = pair
    events = [e for e in provider_stream("content", False) if e != DONE]
    answer[:] = [paced(events[:3] + events[3:4] * 400, pause=0.01)]  # 4 s unless cut
    taken, calls = native.taken, len(native.recorder.records)
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth()['Authorization']}\r\n"
               "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")
    payload = httpx.Request("POST", "http://x", json=_body(False)).content
    port = int(native.server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        sock.sendall((request % len(payload)).encode() + payload)
        seen = b""
        while seen.count(b"data: ") < 8:
            seen += sock.recv(65536)
        eventually(lambda: native.taken == taken + 1)
    rec = native.recorder.wait(calls + 1)[-1]
    assert rec.client_cancelled and rec.stream
    assert rec.outcome == "completed" and rec.status == 200
    assert rec.completion_tokens >= 5  # what was relayed, counted
    assert rec.actual_cost_nanousd == rec.prompt_tokens * 150 + rec.completion_tokens * 600
    eventually(lambda: native.running() == 0)


def test_hundreds_of_streams_at_once_all_come_through_whole(
        pair: tuple[list[list[Step]], Gateway, Gateway]) -> None:
    answer, native, _ = pair
    events = provider_stream("content", True)
    answer[:] = [paced(events, pause=0.005)]
    taken, calls = native.taken, len(native.recorder.records)
    n = 200

    async def run() -> list[bytes]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=native.server.url, timeout=HANG_S,
                                     limits=limits) as client:
            async def one() -> bytes:
                r = await client.post(CHAT, headers=auth(), json=_body())
                assert r.status_code == 200, r.content
                return r.content

            return await asyncio.gather(*(one() for _ in range(n)))

    bodies = asyncio.run(run())
    assert all(b == forwarded(events, True) + DONE for b in bodies)
    # A stream whose client is still reading what came before stays in Python (NOT_YET,
    # tried again at its next few reads). How many do depends on the machine's load (81 of
    # 200 were handed over once in CI, most are here), so the bound is only that some were.
    assert taken < native.taken <= taken + n
    records = native.recorder.wait(calls + n)[calls:]
    assert all(r.outcome == "completed" and r.completion_tokens == records[0].completion_tokens
               for r in records)
    eventually(lambda: native.running() == 0)


def test_a_stream_the_cache_stores_or_registry_tools_check_stays_in_python() -> None:
    """Every byte of a stream the response cache keeps must pass its send, and registry
    tools' arguments are collected from the events Python reads: such streams are never
    handed over, and the cache then answers a later call with the whole stream's text."""
    events = provider_stream("content", True)
    tools = [{"name": "lookup", "parameters": {"type": "object"}}]
    with ScriptedUpstream(lambda req: paced(events)) as up:
        cfg = make_config(f"http://127.0.0.1:{up.port}/v1", tenants=unlimited_acme(),
                          cache={"routes": ["*"]}, tools=tools,
                          streams={"native_relay": True})
        recorder = ListRecorder()
        with Server(create_app(cfg, env=gateway_env(), recorder=recorder)) as server, \
                httpx.Client(base_url=server.url, timeout=HANG_S) as client:
            g = Gateway(server, recorder, client)
            streamed = client.post(CHAT, headers=auth(), json=_body(temperature=0))
            assert streamed.status_code == 200 and g.taken == 0
            # The stored answer is the whole stream's, not what Python saw of it.
            hit = client.post(CHAT, headers=auth(), json={
                **_body(temperature=0), "stream": False, "stream_options": None})
            assert hit.headers.get("x-tollway-cache") == "hit", hit.headers
            text = "".join(
                (c.get("delta") or {}).get("content") or ""
                for e in forwarded(events, True).split(b"\n\n") if e.startswith(b"data: {")
                for c in json.loads(e[6:]).get("choices") or ())
            assert hit.json()["choices"][0]["message"]["content"] == text != ""
            named = client.post(CHAT, headers=auth(), json=_body(
                tools=[{"type": "registry", "name": "lookup"}]))
            assert named.status_code == 200 and g.taken == 0
            # The same stream with neither is handed over.
            plain = client.post(CHAT, headers=auth(), json=_body(temperature=1))
            assert plain.status_code == 200 and g.taken == 1
