"""What the cache keeps of an answer, and the answer given back as JSON or as SSE.

An entry holds the provider's chat completion as JSON (a streamed answer is read
back into one, :func:`from_stream`), the tenant it belongs to, when it was made and
what it cost. A plain hit sends the JSON as it was; a streamed hit sends it as chat
completion chunks (:func:`as_sse`): per choice, one chunk with the whole message
(role, content, tool calls), one with its finish reason, the usage chunk when the
caller asked for it, then ``[DONE]``.

Never kept (:func:`storable`): an error, a refusal (``refusal`` set, or
``finish_reason`` ``content_filter``), an empty answer, an answer that stopped at
the gateway's own output bound (the caller's budget, not its request, cut it short).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Entry", "as_sse", "decode_entry", "encode_entry", "from_stream", "storable"]


class Entry(msgspec.Struct, frozen=True, array_like=True):
    tenant: str
    model: str  # tollway's model id that answered
    provider: str
    body: bytes  # the chat completion, JSON
    created_at: float  # unix seconds
    cost_nanousd: int  # what the answer cost when it was made: a hit saves it
    prompt_tokens: int = 0
    completion_tokens: int = 0


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Entry)


def encode_entry(e: Entry) -> bytes:
    return _enc.encode(e)


def decode_entry(data: bytes) -> Entry:
    return _dec.decode(data)


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    system_fingerprint: str | None = None
    choices: list[_Choice] = []
    usage: dict[str, Any] | None = None


_completion = msgspec.json.Decoder(_Completion)
_json = msgspec.json.Encoder()


def storable(body: bytes, bounded: bool = False) -> bool:
    """Whether a whole chat completion may be kept: it has choices, each with content or
    tool calls, none refused or filtered; ``bounded`` (the gateway lowered the output
    bound), none stopped at its length."""
    try:
        c = _completion.decode(body)
    except msgspec.MsgspecError:
        return False
    if not c.choices:
        return False
    for ch in c.choices:
        m = ch.message
        if m is None or m.refusal or ch.finish_reason in (None, "content_filter"):
            return False
        if bounded and ch.finish_reason == "length":
            return False
        if not m.content and not m.tool_calls:
            return False
    return True


def from_stream(sse: bytes, prompt_tokens: int, completion_tokens: int) -> bytes | None:
    """The chat completion a whole relayed stream adds up to; None when it is not one
    (no chunk, an error event, a choice without its finish reason)."""
    choices: dict[int, dict[str, Any]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    head: _Completion | None = None
    for event in sse.replace(b"\r\n", b"\n").split(b"\n\n"):
        payload = b""
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                payload += line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        if payload.find(b'"error"') >= 0 and payload.startswith(b'{"error"'):
            return None
        try:
            c = _completion.decode(payload)
        except msgspec.MsgspecError:
            return None
        if head is None:
            head = c
        for ch in c.choices:
            acc = choices.setdefault(ch.index, {"content": [], "finish": None, "refusal": False})
            d = ch.delta
            if d is not None:
                if d.refusal:
                    acc["refusal"] = True
                if d.content:
                    acc["content"].append(d.content)
                for tc in d.tool_calls or ():
                    slot = calls.setdefault(ch.index, {}).setdefault(
                        tc.index, {"id": None, "type": "function", "name": [], "args": []})
                    if tc.id:
                        slot["id"] = tc.id
                    if tc.type:
                        slot["type"] = tc.type
                    if tc.function is not None:
                        if tc.function.name:
                            slot["name"].append(tc.function.name)
                        if tc.function.arguments:
                            slot["args"].append(tc.function.arguments)
            if ch.finish_reason:
                acc["finish"] = ch.finish_reason
    if head is None or not choices:
        return None
    out_choices = []
    for i in sorted(choices):
        acc = choices[i]
        if acc["finish"] is None or acc["refusal"]:
            return None
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(acc["content"]) or None,
                                   "refusal": None}
        if i in calls:
            message["tool_calls"] = [
                {"id": s["id"], "type": s["type"],
                 "function": {"name": "".join(s["name"]), "arguments": "".join(s["args"])}}
                for _, s in sorted(calls[i].items())]
        out_choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": acc["finish"]})
    completion: dict[str, Any] = {
        "id": head.id, "object": "chat.completion", "created": head.created,
        "model": head.model, "choices": out_choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}}
    if head.system_fingerprint:
        completion["system_fingerprint"] = head.system_fingerprint
    return _json.encode(completion)


def as_sse(body: bytes, include_usage: bool) -> bytes:
    """A stored chat completion as the stream of chunks a provider would have sent."""
    c = _completion.decode(body)
    base = {"id": c.id, "object": "chat.completion.chunk", "created": c.created,
            "model": c.model}
    if c.system_fingerprint:
        base["system_fingerprint"] = c.system_fingerprint
    out: list[bytes] = []

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> None:
        out.append(b"data: " + _json.encode({**base, "choices": choices, **extra}) + b"\n\n")

    for ch in c.choices:
        m = ch.message or _Message()
        delta: dict[str, Any] = {"role": "assistant", "content": m.content}
        if m.tool_calls:
            delta["tool_calls"] = [
                {"index": j, "id": tc.id, "type": tc.type or "function",
                 "function": {"name": (tc.function.name if tc.function else "") or "",
                              "arguments": (tc.function.arguments if tc.function else "")
                              or ""}}
                for j, tc in enumerate(m.tool_calls)]
        chunk([{"index": ch.index, "delta": delta, "logprobs": None, "finish_reason": None}])
        chunk([{"index": ch.index, "delta": {}, "logprobs": None,
                "finish_reason": ch.finish_reason}])
    if include_usage and c.usage is not None:
        chunk([], usage=c.usage)
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)
