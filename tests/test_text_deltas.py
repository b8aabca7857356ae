"""Text deltas written from the provider's bytes (``_core.text_deltas``).

A translated stream's runs of plain text-delta chunks are written by the core in one
call, each piece's JSON string copied as the provider sent it; anything else is read
chunk by chunk in Python. Both ways must give the same events (as JSON: the bytes of a
string may differ, its value may not), the same text and finish reason, and the same
sequence numbers, however the stream is spelled and split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway import _core
from tollway.pipeline import stream as tap_module
from tollway.pipeline.responses import ChatToResponses, ResponsesRequest
from tollway.pipeline.translate import ChatInside, ChatToMessages
from tollway.pipeline.usage import Usage

USAGE = Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14)


def _spell(obj: dict[str, Any], style: str) -> bytes:
    if style == "ascii":  # every non-ASCII character as a \u escape (Python's default)
        return json.dumps(obj).encode()
    if style == "spaced":
        return json.dumps(obj, ensure_ascii=False, indent=None, separators=(" , ", " : ")).encode()
    return msgspec.json.encode(obj)


@st.composite
def text_streams(draw: st.DrawFn) -> tuple[bytes, str]:
    """A chat stream of text deltas (with the odd chunk that is not one), and its text."""
    style = draw(st.sampled_from(["ascii", "spaced", "compact"]))
    pieces = draw(st.lists(st.text(max_size=12), min_size=1, max_size=25))
    chunks: list[dict[str, Any]] = [
        {"id": "c1", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}]}]
    for piece in pieces:
        chunk: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": None, "logprobs": None}]}
        if draw(st.booleans()):
            chunk["usage"] = None
        if draw(st.integers(0, 9)) == 0:  # one the core leaves to Python
            chunk["choices"][0]["delta"]["refusal"] = None
            chunk["choices"][0]["delta"]["tool_calls"] = [] if draw(st.booleans()) else None
        chunks.append(chunk)
    chunks.append({"id": "c1", "choices": [{"index": 0, "delta": {},
                                            "finish_reason": draw(st.sampled_from(
                                                ["stop", "length", "content_filter"]))}]})
    if draw(st.booleans()):
        chunks.append({"id": "c1", "choices": [], "usage": {
            "prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})
    raw = b"".join(b"data: " + _spell(c, style) + b"\n\n" for c in chunks)
    if draw(st.booleans()):
        raw += b"data: [DONE]\n\n"
    return raw, "".join(pieces)


def _events(stream: bytes) -> list[tuple[str, Any]]:
    out = []
    for event in stream.split(b"\n\n")[:-1]:
        name, data = event.split(b"\n")
        out.append((name.decode(), json.loads(data[len(b"data: "):])))
    return out


def _run(tap: ChatInside, pieces: list[bytes]) -> tuple[list[tuple[str, Any]], str, str]:
    out = b"".join(tap.feed(p) for p in pieces) + tap.end(USAGE)
    return _events(out), tap.text(), tap.inner.finish_reason


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


TAPS: dict[str, Callable[[int], ChatInside]] = {
    "messages": lambda limit: ChatToMessages(limit, "gpt-4o-mini", "claude", 5),
    "responses": lambda limit: ChatToResponses(ResponsesRequest(model="m", input="hi"),
                                               limit, "gpt-4o-mini"),
}


@pytest.mark.parametrize("surface", sorted(TAPS))
@settings(max_examples=150, deadline=None)
@given(stream=text_streams(), cuts=st.lists(st.integers(0, 3000), max_size=6),
       limit=st.sampled_from([0, 0, 2, 7, 30, 256]))
def test_runs_written_by_the_core_equal_the_python_translation(
        surface: str, stream: tuple[bytes, str], cuts: list[int], limit: int) -> None:
    """With an output limit too: a run that could pass it is read event by event, so
    the cut falls where it falls in Python."""
    raw, text = stream
    pieces = _split(raw, cuts)
    fast_tap, slow_tap = TAPS[surface](limit), TAPS[surface](limit)
    fast = _run(fast_tap, pieces)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tap_module, "text_deltas", lambda *args: None)
        slow = _run(slow_tap, pieces)
    assert fast == slow
    assert fast_tap.cut == slow_tap.cut
    if not limit:
        assert fast[1] == text
    # Sequence numbers (Responses) count every event, however it was written.
    if surface == "responses":
        assert [data["sequence_number"] for _, data in fast[0]] == list(range(len(fast[0])))


def test_a_stream_in_few_reads_is_written_by_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's usual stream, read in two reads: past the first token, every text
    delta is written from the bytes, the tail (usage, [DONE]) read event by event."""
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": f" w{i} \u00e9\""},
                                       "finish_reason": None}]} for i in range(20)]
    chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"id": "c", "choices": [], "usage": {"prompt_tokens": 5,
                                                      "completion_tokens": 9,
                                                      "total_tokens": 14}})
    events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    events.append(b"data: [DONE]\n\n")
    written: list[int] = []

    def counting(*args: Any) -> Any:
        got = _core.text_deltas(*args)
        written.append(-1 if got is None else got[4])
        return got

    monkeypatch.setattr(tap_module, "text_deltas", counting)
    for make in TAPS.values():
        written.clear()
        tap = make(0)
        out = tap.feed(b"".join(events[:2])) + tap.feed(b"".join(events[2:])) + tap.end(USAGE)
        # The first token is read alone (it opens the text block); the rest is written.
        assert written == [1, 18]
        assert tap.text() == "".join(f" w{i} \u00e9\"" for i in range(20))
        assert tap.usage == USAGE and tap.done and tap.inner.finish_reason == "stop"
        deltas = [data for _, data in _events(out) if "delta" in data]
        assert len(deltas) >= 20


def test_the_core_leaves_what_it_does_not_read_alike_to_python() -> None:
    """What the core answers None for (Python reads it): not valid JSON, a tool call, a
    member named twice; and what it reads, it reads as the JSON means it."""
    head, middle, tail = b"<", b"|", b">"

    def deltas(payload: bytes) -> Any:
        return _core.text_deltas(b"data: " + payload + b"\n\n", head, middle, tail, 0)

    assert deltas(b'{"choices":[{"delta":{"content":"a"}}],"x":[1,}') is None
    assert deltas(b'{"choices":[{"delta":{"content":"a","tool_calls":[{"index":0}]}}]}') is None
    assert deltas(b'{"choices":[{"delta":{"content":"a"}}],"choices":[]}') is None
    got = deltas(b'{"choices":[{"delta":{"content":"\\u0041\\n\\ud83d\\ude00"},'
                 b'"finish_reason":"stop"}]}')
    assert got == (b'<0|"\\u0041\\n\\ud83d\\ude00">', "A\n\U0001f600", "stop", "stop", 1)


def test_a_stream_in_one_read_under_a_limit_is_written_by_the_core(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Anthropic's callers always send max_tokens, so a Messages stream has a limit: a run
    whose text cannot pass it (a token is at least a byte) is still written from its
    bytes; one that could is read event by event, and cut where Python cuts it."""
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": f" word{i}"},
                                       "finish_reason": None}]} for i in range(20)]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    written: list[Any] = []

    def counting(*args: Any) -> Any:
        got = _core.text_deltas(*args)
        written.append(None if got is None else got[4])
        return got

    monkeypatch.setattr(tap_module, "text_deltas", counting)
    roomy = ChatToMessages(256, "gpt-4o-mini", "claude", 5)
    roomy.feed(raw)
    assert written == [19] and not roomy.cut
    written.clear()
    tight = ChatToMessages(12, "gpt-4o-mini", "claude", 5)
    events = _events(tight.feed(raw))
    assert written == [19] and tight.cut  # written, then not taken: read one by one
    assert tight.text() == "".join(f" word{i}" for i in range(6))
    assert sum(1 for _, data in events if data.get("delta", {}).get("type") == "text_delta") == 6
