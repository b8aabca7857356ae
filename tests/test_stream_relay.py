"""The relay forwards the provider's stream byte for byte, for every shape the simulated
upstream sends, however its bytes arrive; and bills it as before.

The shapes are the simulated upstream's own (:class:`tollway.testing.replies.Replies`):
content, a tool call, a refusal, two choices (``n = 2``), each with the usage chunk and
without. Unit level: :class:`SseTap` over every split of a stream in two, one byte a
read, and all at once, with and without an output limit. Live: the gateway in front of a
provider that sends those bytes one event a write (separate reads), all in one write
(several events in one read) or in pieces of 7 bytes (events split across reads).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support import ListRecorder, Server, auth, gateway_env, make_config, unlimited_acme
from tollway import count_tokens
from tollway.app import create_app
from tollway.pipeline.stream import DONE, SseTap
from tollway.testing.replies import Replies, Stream
from tollway.testing.scripted import ScriptedUpstream, Step

CHAT = "/api/ai/v1/chat/completions"
_PRICE_IN, _PRICE_OUT = 150, 600  # gpt-4o-mini in the test config, nano-USD a token
_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}]
SHAPES: dict[str, dict[str, Any]] = {
    "content": {},
    "tool call": {"tools": _TOOLS},
    "refusal": {"refusal": "I can't help with that request."},
    "two choices": {"n": 2},
}


def provider_stream(shape: str, usage: bool) -> list[bytes]:
    """The simulated upstream's events for ``shape`` ([DONE] last)."""
    extra = dict(SHAPES[shape])
    replies = Replies("fake", reply_words=6)
    replies.refusal = extra.pop("refusal", None)
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": usage},
            "messages": [{"role": "user", "content": "Weather in Paris?"}], **extra}
    reply = replies.route("POST", "/v1/chat/completions", body)
    assert isinstance(reply, Stream)
    return reply.events


def is_usage_only(event: bytes) -> bool:
    return event != DONE and json.loads(event[6:]).get("choices") == []


def forwarded(events: list[bytes], keep_usage: bool) -> bytes:
    """What the relay passes on of the provider's events: all but [DONE] (the relay ends the
    stream itself) and, for a caller who did not ask, the usage chunk."""
    return b"".join(e for e in events
                    if e != DONE and (keep_usage or not is_usage_only(e)))


def text_of(events: list[bytes]) -> str:
    """The generated text as the settle counts it: every choice's content, refusal, tool
    name and arguments, in the order they came."""
    parts: list[str] = []
    for event in events:
        if event == DONE:
            continue
        for choice in json.loads(event[6:])["choices"]:
            delta = choice.get("delta") or {}
            parts += [delta.get("content") or "", delta.get("refusal") or ""]
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") or {}
                parts += [fn.get("name") or "", fn.get("arguments") or ""]
    return "".join(parts)


def usage_of(events: list[bytes]) -> dict[str, int] | None:
    found = [json.loads(e[6:])["usage"] for e in events if e != DONE and is_usage_only(e)]
    return found[-1] if found else None


def splits(raw: bytes) -> Iterator[list[bytes]]:
    yield [raw]
    yield [raw[i:i + 1] for i in range(len(raw))]
    for cut in range(1, len(raw)):
        yield [raw[:cut], raw[cut:]]


@pytest.mark.parametrize("limit", [0, 10**6], ids=["no limit", "limit not reached"])
@pytest.mark.parametrize("keep_usage", [True, False], ids=["asked usage", "did not ask"])
@pytest.mark.parametrize("usage", [True, False], ids=["usage chunk", "no usage chunk"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_tap_forwards_every_shape_byte_for_byte_however_it_is_split(
        shape: str, usage: bool, keep_usage: bool, limit: int) -> None:
    events = provider_stream(shape, usage)
    raw = b"".join(events)
    expected = forwarded(events, keep_usage)
    want_usage = usage_of(events)
    assert (want_usage is not None) == usage
    text = text_of(events)
    assert text  # every shape generates something
    for pieces in splits(raw):
        tap = SseTap(keep_usage, limit, "gpt-4o-mini")
        out = b"".join(tap.feed(p) for p in pieces)
        assert out == expected, [len(p) for p in pieces]
        assert tap.done and not tap.error and not tap.cut
        assert tap.first_token_at is not None
        got_usage = None if tap.usage is None else {
            "prompt_tokens": tap.usage.prompt_tokens,
            "completion_tokens": tap.usage.completion_tokens,
            "total_tokens": tap.usage.total_tokens}
        assert got_usage == want_usage
        assert tap.text() == text
        assert tap.finish_reason == ("tool_calls" if shape == "tool call" else "stop")


def test_the_held_text_is_decoded_once_past_its_bound_and_still_complete() -> None:
    replies = Replies("fake", reply_words=3000)  # ~3,000 events, past the held bytes' bound
    reply = replies.route("POST", "/v1/chat/completions", {
        "model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert isinstance(reply, Stream)
    tap = SseTap(keep_usage=False)
    out = b"".join(tap.feed(e) for e in reply.events)
    assert out == forwarded(reply.events, keep_usage=False)
    assert tap.parts  # decoded on the way, not all held to the end
    assert tap.text() == text_of(reply.events)


# ---- live: the gateway in front of a provider that sends exactly these bytes ----------

_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")


def _framed(pieces: list[bytes], pause: float = 0.0) -> list[Step]:
    steps: list[Step] = [_SSE_HEAD]
    for piece in pieces:
        steps.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        if pause:
            steps.append(pause)
    steps.append(b"0\r\n\r\n")
    return steps


FRAMINGS = {
    "one event a read": lambda events: _framed(events, pause=0.002),
    "all in one read": lambda events: _framed([b"".join(events)]),
    "7-byte pieces": lambda events: _framed(
        [raw[i:i + 7] for raw in [b"".join(events)] for i in range(0, len(raw), 7)]),
}


@pytest.fixture(scope="module")
def relay() -> Iterator[tuple[list[list[Step]], ListRecorder, httpx.Client]]:
    answer: list[list[Step]] = []
    recorder = ListRecorder()
    with ScriptedUpstream(lambda req: answer[0]) as up:
        cfg = make_config(f"http://127.0.0.1:{up.port}/v1", tenants=unlimited_acme())
        with Server(create_app(cfg, env=gateway_env(), recorder=recorder)) as server, \
                httpx.Client(base_url=server.url, timeout=10) as client:
            yield answer, recorder, client


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("keep_usage", [True, False], ids=["asked usage", "did not ask"])
@pytest.mark.parametrize("usage", [True, False], ids=["usage chunk", "no usage chunk"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_gateway_relays_every_shape_byte_for_byte_and_bills_it(
        relay: tuple[list[list[Step]], ListRecorder, httpx.Client], shape: str, usage: bool,
        keep_usage: bool, framing: str) -> None:
    answer, recorder, client = relay
    events = provider_stream(shape, usage)
    answer[:] = [FRAMINGS[framing](events)]
    calls = len(recorder.records)
    body: dict[str, Any] = {
        "model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": keep_usage},
        "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    r = client.post(CHAT, headers=auth(), json=body)
    rec = recorder.wait(calls + 1)[-1]
    assert r.status_code == 200
    expected = forwarded(events, keep_usage)
    if usage or not keep_usage:
        assert r.content == expected + DONE
    else:  # the gateway adds the usage chunk the caller asked for, from counted tokens
        assert r.content.startswith(expected) and r.content.endswith(DONE)
        (added,) = [e for e in r.content[len(expected):-len(DONE)].split(b"\n\n") if e]
        counted = json.loads(added[6:])["usage"]
        assert (counted["prompt_tokens"], counted["completion_tokens"]) == (
            rec.prompt_tokens, rec.completion_tokens)
    # Billed from the provider's usage chunk, else from the relayed text, counted.
    want = usage_of(events)
    if want is not None:
        assert (rec.prompt_tokens, rec.completion_tokens) == (
            want["prompt_tokens"], want["completion_tokens"])
    else:
        assert rec.completion_tokens == count_tokens(text_of(events), "o200k_base")
        assert rec.prompt_tokens > 0
    assert rec.actual_cost_nanousd == (
        rec.prompt_tokens * _PRICE_IN + rec.completion_tokens * _PRICE_OUT)
    assert rec.outcome == "completed" and rec.stream and not rec.client_cancelled
