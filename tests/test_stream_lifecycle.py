"""Every way a stream can end, 1,000 times: the upstream reply is let go, the client gets its
last message, the breaker a result, the call one record; afterwards the pool is whole.

The gateway is the real app (middleware, pipeline, dispatcher, the provider's HTTP client)
in front of a real simulated upstream; only the caller is in-process, an ASGI client
scripted to leave, fail its send or cancel the call at a chosen moment, which no socket
client can do on cue. A leaked pool slot shows as a hang: the last check needs every slot
at once, and pytest's timeout is the detector.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from policy_rig import CHAT, raw_config
from support import ACME_KEY, UPSTREAM_KEY, ListRecorder, gateway_env
from tollway.app import create_app
from tollway.clock import ManualClock
from tollway.config import parse_config
from tollway.pipeline.stream import MAX_EVENT_BYTES, SseTap
from tollway.providers.http import CLIENTS
from tollway.testing.upstream import FakeUpstream, Fault

MAX_CONNECTIONS = 16
SILENCE_S = 0.75  # the provider's first-byte / longest-gap timeout (the stall way waits it out)
BUG = "tap-bug"  # a word that makes the tap raise (a bug in the gateway, injected)

Message = dict[str, Any]


class Caller:
    """One in-process ASGI client; ``at_start`` / ``at_first`` script what it does when
    the response starts and when the first piece of the stream arrives."""

    def __init__(self, body: bytes, at_start: Hook | None, at_first: Hook | None) -> None:
        self.body: bytes | None = body
        self.at_start = at_start
        self.at_first = at_first
        self.messages: list[Message] = []
        self.gone = asyncio.Event()
        self.stuck = False  # every later send blocks: a client that stopped reading
        self.task: asyncio.Task[None] | None = None

    async def receive(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)
        if self.stuck:
            await asyncio.Event().wait()
        if message["type"] == "http.response.start":
            if self.at_start is not None:
                await self.at_start(self)
        elif len(self.messages) == 2 and message.get("more_body") and self.at_first is not None:
            await self.at_first(self)

    def ends(self) -> list[Message]:
        return [m for m in self.messages
                if m["type"] == "http.response.body" and not m.get("more_body")]


Hook = Callable[[Caller], Awaitable[None]]


async def leave(c: Caller) -> None:
    """Stop reading and hang up: the send stays blocked until the gateway gives up on it."""
    c.gone.set()
    await asyncio.Event().wait()


async def fail_send(c: Caller) -> None:
    raise ConnectionResetError("the client's connection is gone")


async def cancel(c: Caller) -> None:
    assert c.task is not None
    c.task.cancel()


@dataclass(frozen=True)
class Way:
    """One way for a stream to end, and what must follow from it."""

    name: str
    count: int
    status: int  # the call's recorded status
    fault: Fault | None = None
    prompt: str = "one two three four"
    at_start: Hook | None = None
    at_first: Hook | None = None
    provider_fault: bool = False  # the breaker records a failure
    client_gone: bool = False  # recorded as client_cancelled; no last message
    last: bytes = b""  # in the last message's body (ways where the client is still there)
    stall: bool = False  # the upstream goes silent after its first event


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
         "choices": [{"index": 0, "delta": {"content": "half a"}, "finish_reason": None}]}
PROVIDER_ERROR = {"error": {"message": "the model crashed", "type": "server_error",
                            "code": "model_crashed"}}

WAYS = [
    Way("whole", 102, 200, last=b"data: [DONE]"),
    Way("refused", 60, 503, Fault(status=503, times=None), provider_fault=True,
        last=b"upstream_unavailable"),
    Way("reset", 60, 502, Fault(kind="reset", times=None), provider_fault=True,
        last=b"upstream_error"),
    Way("cut", 100, 502, Fault(kind="cut_stream", after_chunks=2, times=None),
        provider_fault=True, last=b"upstream_error"),
    Way("stall", MAX_CONNECTIONS, 504, stall=True, provider_fault=True,
        last=b"upstream_timeout"),
    Way("error event", 100, 502, Fault(status=200, body=sse(CHUNK, PROVIDER_ERROR), times=None),
        provider_fault=True),
    Way("malformed", 100, 502, Fault(status=200, body="<html>a proxy's page</html>",
                                     times=None), provider_fault=True, last=b"upstream_error"),
    Way("oversized", 2, 502, Fault(status=200, body=b"x" * (MAX_EVENT_BYTES + 1), times=None),
        provider_fault=True, last=b"upstream_error"),
    Way("client leaves", 100, 200, at_first=leave, client_gone=True),
    Way("send fails", 100, 200, at_first=fail_send, client_gone=True),
    Way("send fails at start", 60, 200, at_start=fail_send, client_gone=True),
    Way("cancelled", 100, 200, at_first=cancel, client_gone=True, last=b"stream_stopped"),
    Way("tap bug", 100, 500, prompt=f"one {BUG} two", last=b"internal_error"),
]
assert sum(w.count for w in WAYS) == 1000


class InProcess:
    """The app with its lifespan entered, called without a server."""

    def __init__(self, app: Any, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def call(self, rid: str, prompt: str, at_start: Hook | None = None,
                   at_first: Hook | None = None) -> Caller:
        body = json.dumps({"model": "m-fake", "stream": True,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": CHAT,
            "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
            "headers": [(b"host", b"gateway"), (b"content-type", b"application/json"),
                        (b"authorization", f"Bearer {ACME_KEY}".encode()),
                        (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", rid.encode())],
            "state": dict(self.state),
        }
        caller = Caller(body, at_start, at_first)
        caller.task = asyncio.ensure_future(self.app(scope, caller.receive, caller.send))
        await asyncio.wait((caller.task,))
        if not caller.task.cancelled():
            assert caller.task.exception() is None
        return caller


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(name="fake", api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture
def tap_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    feed = SseTap.feed

    def buggy(self: SseTap, data: bytes) -> bytes:
        out = feed(self, data)
        if BUG.encode() in out:
            raise RuntimeError("a bug in the tap")
        return out

    monkeypatch.setattr(SseTap, "feed", buggy)


def config_for(base_url: str, http_client: str) -> dict[str, Any]:
    raw = raw_config({"fake": base_url}, retry={"attempts": 1},
                     breaker={"failure_threshold": 100_000})
    raw["providers"][0].update(http_client=http_client, max_connections=MAX_CONNECTIONS,
                               first_byte_timeout_s=SILENCE_S)
    return raw


@pytest.mark.timeout(60)  # the hang detector: a lost slot blocks the last check for good
@pytest.mark.parametrize("http_client", CLIENTS)  # every client a provider may name
async def test_a_thousand_streams_ending_every_way_leave_the_pool_whole(
    http_client: str, upstream: FakeUpstream, tap_bug: None
) -> None:
    raw = config_for(upstream.base_url, http_client)
    clock = ManualClock()  # frozen: every breaker result stays in its window
    recorder = ListRecorder()
    app = create_app(parse_config(raw, source="<test>", env=gateway_env()),
                     env=gateway_env(), recorder=recorder, clock=clock)
    async with app.router.lifespan_context(app) as state:
        gw = InProcess(app, state)
        callers: dict[str, tuple[Way, Caller]] = {}
        for way in WAYS:
            upstream.clear()
            if way.fault is not None:
                upstream.add_fault(way.fault)
            upstream.chunk_delay_s = 2 * SILENCE_S if way.stall else 0.0
            rids = [f"{way.name.replace(' ', '-')}-{i}" for i in range(way.count)]
            done = await asyncio.gather(*(gw.call(rid, way.prompt, way.at_start, way.at_first)
                                          for rid in rids))
            callers.update((rid, (way, c)) for rid, c in zip(rids, done, strict=True))
        upstream.clear()
        upstream.chunk_delay_s = 0.0

        # Exactly one record per call, with the outcome its way calls for.
        records = recorder.records
        assert len(records) == 1000
        assert Counter(r.request_id for r in records) == Counter(callers.keys())
        for rec in records:
            way, caller = callers[rec.request_id]
            assert (rec.status, rec.client_cancelled) == (way.status, way.client_gone), way
            expect = "completed" if way.status == 200 else "failed"
            assert rec.outcome == expect and rec.stream and rec.attempts == 1, way
            assert caller.task is not None and caller.task.cancelled() == (way.at_first is cancel)
            # The client still there got one last message, and nothing after it.
            ends = caller.ends()
            if way.client_gone and not way.last:
                assert ends == [], way
            else:
                assert len(ends) == 1 and caller.messages[-1] is ends[0], way
                assert way.last in ends[0]["body"], (way, ends[0])
            if way.name == "error event":  # the provider's own error event, then the end
                assert b"model_crashed" in b"".join(m.get("body", b"") for m in caller.messages)

        # The breaker got a result from every call, a failure from every provider fault.
        snap = app.state.gateway.breakers["fake"].snapshot(clock.monotonic())
        assert snap.calls == 1000
        assert snap.failures == sum(w.count for w in WAYS if w.provider_fault)

        # Every slot at once: each stream holds its connection until all have started.
        started = 0
        all_started = asyncio.Event()

        async def hold(c: Caller) -> None:
            nonlocal started
            started += 1
            if started == MAX_CONNECTIONS:
                all_started.set()
            await all_started.wait()

        last = await asyncio.gather(*(gw.call(f"after-{i}", "one two three", at_first=hold)
                                      for i in range(MAX_CONNECTIONS)))
        for c in last:
            assert c.messages[0]["status"] == 200
            assert c.ends()[0]["body"].endswith(b"data: [DONE]\n\n")


@pytest.mark.timeout(30)  # the hang detector
async def test_a_cancelled_stream_does_not_wait_for_a_client_that_stopped_reading(
    upstream: FakeUpstream,
) -> None:
    async def cancel_and_stop_reading(c: Caller) -> None:
        c.stuck = True
        await cancel(c)

    recorder = ListRecorder()
    clock = ManualClock()
    raw = raw_config({"fake": upstream.base_url}, retry={"attempts": 1})
    app = create_app(parse_config(raw, source="<test>", env=gateway_env()),
                     env=gateway_env(), recorder=recorder, clock=clock)
    async with app.router.lifespan_context(app) as state:
        upstream.chunk_delay_s = 0.05  # still streaming when the call is cancelled
        c = await InProcess(app, state).call("stuck", "one two three four five six",
                                             at_first=cancel_and_stop_reading)
    # The relay tried to end the stream, gave up on the stuck send, and let the call go.
    assert c.task is not None and c.task.cancelled()
    assert b"stream_stopped" in c.messages[-1]["body"] and not c.messages[-1]["more_body"]
    (rec,) = recorder.records
    assert rec.client_cancelled and rec.outcome == "completed"
    snap = app.state.gateway.breakers["fake"].snapshot(clock.monotonic())
    assert (snap.calls, snap.failures) == (1, 0)
