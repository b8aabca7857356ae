"""The SSE relay under arbitrary event streams split at arbitrary points (hypothesis).

Unit level: :class:`SseTap` forwards the same events and reaches the same accounting
state however the provider's bytes are split, and what it forwards is whole events, in
order, as sent. Live: the gateway relays such streams from a provider that sends exactly
those bytes; the client always gets a well-formed stream with one last message, and the
call is billed from the provider's last usage chunk, or from counted text without one.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import ListRecorder, Server, auth, gateway_env, make_config, unlimited_acme
from tollway import count_tokens
from tollway.app import create_app
from tollway.pipeline.stream import SseTap, _payload
from tollway.pipeline.stream import _chunk as _chunk_of
from tollway.testing.scripted import ScriptedUpstream, Step

USAGE = st.builds(lambda p, c: {"prompt_tokens": p, "completion_tokens": c,
                                "total_tokens": p + c},
                  st.integers(0, 1000), st.integers(0, 1000))  # within the per-call cap
TEXT = st.text(max_size=12)


@dataclass
class Expected:
    """What the tap must end with, built from the events as generated."""

    keep_usage: bool
    forwarded: list[bytes] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    done: bool = False
    error: bool = False
    finish_reason: str = ""


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": choices, **extra}
    return b"data: " + json.dumps(body).encode()


@st.composite
def _event(draw: st.DrawFn, exp: Expected) -> bytes:
    """One event (without its blank line), and its effect on ``exp``."""
    kind = draw(st.sampled_from(["content", "tool", "refusal", "finish", "usage_only",
                                 "usage_with_choice", "error", "comment", "junk", "named"]))
    if kind in ("content", "refusal", "named"):
        text = draw(TEXT)
        field_ = "refusal" if kind == "refusal" else "content"
        event = _chunk([{"index": 0, "delta": {field_: text}, "finish_reason": None}])
        if kind == "named":
            event = b"event: message\nid: 7\n" + event
        exp.parts += [text] if text else []
    elif kind == "tool":
        name, args = draw(TEXT), draw(TEXT)
        event = _chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
            "name": name, "arguments": args}}]}}])
        exp.parts += [p for p in (name, args) if p]
    elif kind == "finish":
        reason = draw(st.sampled_from(["stop", "length", "tool_calls"]))
        event = _chunk([{"index": 0, "delta": {}, "finish_reason": reason}])
        exp.finish_reason = exp.finish_reason or reason
    elif kind in ("usage_only", "usage_with_choice"):
        usage = draw(USAGE)
        choices = [] if kind == "usage_only" else [{"index": 0, "delta": {}}]
        event = _chunk(choices, usage=usage)
        exp.usage = usage
        if kind == "usage_only" and not exp.keep_usage:
            return event  # dropped: the caller did not ask for usage
    elif kind == "error":
        event = b'data: {"error": {"message": "overloaded", "type": "server_error"}}'
        exp.error = True
    elif kind == "comment":
        event = b": keep-alive"
    else:  # not JSON: passed on as sent, counted as nothing
        event = b"data: x" + draw(TEXT.filter(lambda t: "\r" not in t and "\n" not in t)
                                  ).encode()
    exp.forwarded.append(event)
    return event


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, Expected]:
    """A provider's stream: events, maybe [DONE], maybe a cut-off tail; LF or CRLF."""
    exp = Expected(keep_usage=draw(st.booleans()))
    events = [draw(_event(exp)) for _ in range(draw(st.integers(0, 8)))]
    if draw(st.booleans()):
        events.append(b"data: [DONE]")
        exp.done = True
    nl = draw(st.sampled_from([b"\n", b"\r\n"]))
    raw = b"".join(e.replace(b"\n", nl) + nl + nl for e in events)
    if draw(st.booleans()):
        raw += b'data: {"choices": [{"delta": {"content": "cut'  # never finished: not relayed
    return raw, exp


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _feed(tap: SseTap, pieces: list[bytes]) -> bytes:
    return b"".join(tap.feed(p) for p in pieces)


@pytest.mark.parametrize("collect", [False, True], ids=["held", "collected"])
@settings(max_examples=300)
@given(stream=streams(), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_the_tap_forwards_whole_events_as_sent_however_the_bytes_are_split(
        collect: bool, stream: tuple[bytes, Expected], cuts: list[int]) -> None:
    """Also when it gives the chunks it forwards to a translator (whose events are then
    read from those), decoded as they come or a run at a time: the same chunks, in the
    same order, as decoding each forwarded event."""
    raw, exp = stream
    collected: list[Any] = []

    class Recorder:  # a translator that writes no run from its bytes: each chunk given
        def chunk(self, payload: bytes, chunk: Any) -> None:
            collected.append(msgspec.to_builtins(chunk))

        def template(self) -> None:
            return None

        def took(self, events: bytes, text: str, finish: str | None, count: int) -> None:
            raise AssertionError("no template, no run written")

    tap = SseTap(keep_usage=exp.keep_usage, sink=Recorder() if collect else None)
    out = b""
    for piece in _split(raw, cuts):
        out += tap.feed(piece)
    assert out == b"".join(e + b"\n\n" for e in exp.forwarded)
    if collect:
        want = []
        for event in exp.forwarded:
            with contextlib.suppress(msgspec.MsgspecError):
                want.append(msgspec.to_builtins(_chunk_of.decode(_payload(event.replace(
                    b"\r\n", b"\n")))))
        assert collected == want
    assert (tap.text(), tap.done, tap.error, tap.finish_reason) == (
        "".join(exp.parts), exp.done, exp.error, exp.finish_reason)
    got = None if tap.usage is None else {
        "prompt_tokens": tap.usage.prompt_tokens,
        "completion_tokens": tap.usage.completion_tokens,
        "total_tokens": tap.usage.total_tokens}
    assert got == exp.usage


@settings(max_examples=300)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=12),
       keep_usage=st.booleans())
def test_arbitrary_bytes_split_anywhere_give_the_same_events(
        data: bytes, cuts: list[int], keep_usage: bool) -> None:
    whole, split = SseTap(keep_usage), SseTap(keep_usage)
    out = whole.feed(data)
    assert _feed(split, _split(data, cuts)) == out
    assert out == b"" or out.endswith(b"\n\n")
    assert (split.text(), split.usage, split.done, split.error) == (
        whole.text(), whole.usage, whole.done, whole.error)


# ---- live: the gateway relaying such streams from a provider that sends exactly them ----

_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
_PRICE_IN, _PRICE_OUT = 150, 600  # gpt-4o-mini in the test config, nano-USD a token


def _chunked(pieces: list[bytes]) -> list[Step]:
    return [_SSE_HEAD, *(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p), b"0\r\n\r\n"]


def _ending(exp: Expected) -> bytes:
    """What must follow the forwarded events: the relay's own ending."""
    if exp.error:
        return b""  # the provider's error event already told the client
    if not exp.done:
        return b"error"
    if exp.keep_usage and exp.usage is None:
        return b"usage+done"
    return b"done"


def test_the_gateway_relays_any_stream_well_formed_and_bills_it_consistently() -> None:
    answer: list[list[Step]] = []
    recorder = ListRecorder()
    with ScriptedUpstream(lambda req: answer[0]) as up:
        # Broken streams are the provider's failures: the breaker must not stop the test.
        cfg = make_config(f"http://127.0.0.1:{up.port}/v1",
                          breaker={"failure_threshold": 10**6}, tenants=unlimited_acme())
        with Server(create_app(cfg, env=gateway_env(), recorder=recorder)) as server, \
                httpx.Client(base_url=server.url, timeout=10) as client:
            _relay_examples(answer, recorder, client)


def _relay_examples(answer: list[list[Step]], recorder: ListRecorder,
                    client: httpx.Client) -> None:
    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(stream=streams(), cuts=st.lists(st.integers(0, 4000), max_size=8))
    def relay(stream: tuple[bytes, Expected], cuts: list[int]) -> None:
        raw, exp = stream
        answer[:] = [_chunked(_split(raw, cuts))]
        calls = len(recorder.records)
        r = client.post("/api/ai/v1/chat/completions", headers=auth(), json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "stream": True, "stream_options": {"include_usage": exp.keep_usage}})
        rec = recorder.wait(calls + 1)[-1]
        if not raw:  # nothing at all from the provider: a gateway error, before any byte
            assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
            return
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        body = r.content
        forwarded = b"".join(e + b"\n\n" for e in exp.forwarded)
        assert body.startswith(forwarded) and body.endswith(b"\n\n")
        tail = [e for e in body[len(forwarded):].split(b"\n\n") if e]
        ending = _ending(exp)
        if ending == b"done":
            assert tail == [b"data: [DONE]"]
        elif ending == b"usage+done":
            assert len(tail) == 2 and tail[1] == b"data: [DONE]"
            assert json.loads(tail[0][6:])["usage"]["completion_tokens"] == (
                rec.completion_tokens)
        elif ending == b"error":
            assert len(tail) == 1 and json.loads(tail[0][6:])["error"]["code"]
        else:
            assert tail == []
        # Billing: the provider's last usage, else the counted text (prompt counted too).
        if exp.usage is not None:
            assert (rec.prompt_tokens, rec.completion_tokens) == (
                exp.usage["prompt_tokens"], exp.usage["completion_tokens"])
        else:
            assert rec.completion_tokens == count_tokens("".join(exp.parts), "o200k_base")
            assert rec.prompt_tokens > 0
        assert rec.actual_cost_nanousd == (
            rec.prompt_tokens * _PRICE_IN + rec.completion_tokens * _PRICE_OUT)
        assert rec.outcome == ("completed" if ending in (b"done", b"usage+done") else "failed")

    relay()
