"""Anthropic's Messages API over an OpenAI-compatible provider: the request to chat
completions, and the reply (whole or streamed) back to a message.

What crosses: text (system prompt, user and assistant turns; image blocks as data
URLs), tool definitions, tool choice, tool calls and their results, stop sequences,
temperature and top_p, ``metadata.user_id`` (as ``user``); back: text, tool calls
(``tool_use`` blocks with their parsed input), the stop reason and usage. What does
not: ``thinking`` blocks, ``top_k``, citations, documents and server tools, which chat
completions has no field for (dropped; a request that needs them goes to an
``anthropic`` provider instead).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from tollway.pipeline.stream import NO_FUNCTION, SseTap, _Chunk
from tollway.pipeline.usage import Usage

__all__ = ["ChatToMessages", "chat_request", "chat_tools", "message_of", "stop_reason"]

_encode = msgspec.json.encode

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "function_call": "tool_use", "content_filter": "refusal"}


def stop_reason(finish: str | None) -> str:
    """A chat ``finish_reason`` as Anthropic's ``stop_reason``."""
    return _STOP.get(finish or "stop", "end_turn")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content
                       if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _image(block: dict[str, Any]) -> dict[str, Any] | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = str(source.get("url", ""))
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def chat_messages(system: Any, messages: list[Any]) -> list[dict[str, Any]]:
    """Anthropic's ``system`` and ``messages`` as chat completions messages."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system)})
    for m in messages:
        role, content = m.role, m.content
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if role == "assistant":
            text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
            calls = [{"id": b.get("id", ""), "type": "function",
                      "function": {"name": b.get("name", ""),
                                   "arguments": _encode(b.get("input", {})).decode()}}
                     for b in content if b.get("type") == "tool_use"]
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        parts: list[dict[str, Any]] = []
        for b in content:
            kind = b.get("type")
            if kind == "tool_result":
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id", ""),
                            "content": _text(b.get("content", ""))})
            elif kind == "text":
                parts.append({"type": "text", "text": b.get("text", "")})
            elif kind == "image":
                image = _image(b)
                if image is not None:
                    parts.append(image)
        if parts:
            only_text = all(p["type"] == "text" for p in parts)
            out.append({"role": role, "content": "".join(p["text"] for p in parts)
                        if only_text else parts})
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic's client tools as chat functions (server tools, with no schema, dropped)."""
    if not tools:
        return None
    out = [{"type": "function", "function": {
        "name": t.get("name", ""), "description": t.get("description", ""),
        "parameters": t.get("input_schema") or {"type": "object"}}}
        for t in tools if "input_schema" in t]
    return out or None


def _tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool | None]:
    if not choice:
        return None, None
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "any":
        return "required", parallel
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", "")}}, parallel
    if kind == "none":
        return "none", None
    return "auto", parallel


def chat_request(req: Any, model: str, max_tokens: int, max_tokens_field: str,
                 stream: bool) -> bytes:
    """The chat completions body for a decoded Messages request."""
    body: dict[str, Any] = {"model": model,
                            "messages": chat_messages(req.system, req.messages),
                            max_tokens_field: max_tokens}
    tools = chat_tools(req.tools)
    if tools:
        body["tools"] = tools
        choice, parallel = _tool_choice(req.tool_choice)
        if choice is not None:
            body["tool_choice"] = choice
        if parallel is not None:
            body["parallel_tool_calls"] = parallel
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.temperature is not None:
        body["temperature"] = min(req.temperature, 2.0)
    if req.top_p is not None:
        body["top_p"] = req.top_p
    user = (req.metadata or {}).get("user_id")
    if isinstance(user, str):
        body["user"] = user
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _encode(body)


def _input(arguments: str | None) -> Any:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class ChatFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ChatToolCall(msgspec.Struct):
    id: str | None = None
    index: int = 0
    function: ChatFunction | None = None


class ChatMessage(msgspec.Struct):
    content: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatChoice(msgspec.Struct):
    message: ChatMessage | None = None
    delta: ChatMessage | None = None  # a stream's chunk
    finish_reason: str | None = None


class ChatReply(msgspec.Struct):
    """What the translators read of a chat completion, or of one of its stream's chunks."""

    id: str = ""
    choices: list[ChatChoice] | None = None
    usage: Usage | None = None


chat_reply = msgspec.json.Decoder(ChatReply)


def usage_of(usage: Usage | None) -> dict[str, int]:
    u = usage or Usage()
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def message_of(body: bytes, model: str) -> bytes:
    """A whole chat completion as Anthropic's message (``model``: the name the caller
    asked for)."""
    done = chat_reply.decode(body)
    content: list[dict[str, Any]] = []
    finish = None
    if done.choices:
        choice = done.choices[0]
        finish = choice.finish_reason
        msg = choice.message or ChatMessage()
        if msg.content:
            content.append({"type": "text", "text": msg.content})
        for call in msg.tool_calls or ():
            fn = call.function or ChatFunction()
            content.append({"type": "tool_use", "id": call.id or f"toolu_{call.index}",
                            "name": fn.name or "", "input": _input(fn.arguments)})
    return _encode({
        "id": "msg_" + (done.id or "tollway"), "type": "message", "role": "assistant",
        "model": model, "content": content, "stop_reason": stop_reason(finish),
        "stop_sequence": None, "usage": usage_of(done.usage)})


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode({"type": name, **data}) + b"\n\n"


class ChatInside:
    """A tap that turns a chat completions stream into another API's events: its face
    to the relay and the settle (cut, done, error, usage, first token, text) is the
    inner chat tap's, which reads the provider's chunks, counts and cuts."""

    inner: SseTap
    _out: list[bytes]  # events for the client from the feed under way

    @property
    def cut(self) -> bool:
        return self.inner.cut

    @property
    def done(self) -> bool:
        return self.inner.done

    @property
    def error(self) -> bool:
        return self.inner.error

    @property
    def usage(self) -> Usage | None:
        return self.inner.usage

    @property
    def first_token_at(self) -> float | None:
        return self.inner.first_token_at

    def text(self) -> str:
        return self.inner.text()

    def feed(self, data: bytes) -> bytes:
        # The chat tap hands this (its sink) what it forwards as it reads it, decoded
        # once (chunk), or written from the provider's bytes (took).
        out: list[bytes] = []
        self._out = out
        if not self.inner.feed(data):
            return b""
        return b"".join(out)


class ChatToMessages(ChatInside):
    """A chat completions stream as Anthropic's message events: the chat tap (usage
    kept, since the caller always gets it here) reads the provider's chunks, counts and
    cuts; this writes what it forwarded as ``message_start``, content blocks (text,
    ``tool_use`` with ``input_json_delta``), ``message_delta`` and ``message_stop``."""

    def __init__(self, limit: int, upstream: str, model: str, prompt_tokens: int) -> None:
        self.inner = SseTap(True, limit, upstream, sink=self)
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.started = False
        self.block = -1  # index of the open content block; -1: none
        self.block_kind = ""
        self.tools: dict[int, int] = {}  # chat tool call index -> block index
        self.finish: str | None = None
        self._text_head = b""  # a text delta event up to its text (see feed)


    def template(self) -> tuple[bytes, bytes, bytes, int] | None:
        if self.block_kind != "text":
            return None
        return self._text_head, b"", b"}}\n\n", -1

    def took(self, events: bytes, text: str, finish: str | None, count: int) -> None:
        self._out.append(events)
        if finish:
            self.finish = finish

    def chunk(self, payload: bytes, chunk: _Chunk) -> None:
        out = self._out
        if not self.started:
            out.append(self._start(chunk.id))
        choices = chunk.choices
        if not choices:
            if chunk.error is not None:
                out.append(_error_event(payload))
            return
        for choice in choices:
            if choice.finish_reason:
                self.finish = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                if self.block_kind != "text":
                    out.append(self._open(_TEXT_BLOCK, "text"))
                    self._text_head = (
                        b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                        b'"index":%d,"delta":{"type":"text_delta","text":' % self.block)
                # The commonest event of all, written from bytes: event() would
                # build and encode two dicts for it.
                out.append(self._text_head + _encode(delta.content) + b"}}\n\n")
            for call in delta.tool_calls or ():
                fn = call.function or NO_FUNCTION
                if call.index not in self.tools:
                    out.append(self._open(_encode({
                        "type": "tool_use", "id": call.id or f"toolu_{call.index}",
                        "name": fn.name or "", "input": {}}), "tool"))
                    self.tools[call.index] = self.block
                if fn.arguments:
                    out.append(event("content_block_delta", {
                        "index": self.tools[call.index],
                        "delta": {"type": "input_json_delta",
                                  "partial_json": fn.arguments}}))

    # The events every stream has are written from bytes (as event() would write them).
    def _start(self, chunk_id: str) -> bytes:
        self.started = True
        return (b'event: message_start\ndata: {"type":"message_start","message":{"id":%b,'
                b'"type":"message","role":"assistant","model":%b,"content":[],'
                b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":%d,'
                b'"output_tokens":0}}}\n\n' % (_encode("msg_" + (chunk_id or "tollway")),
                                               _encode(self.model), self.prompt_tokens))

    def _open(self, block: bytes, kind: str) -> bytes:
        """A content block opened: ``block``, encoded."""
        out = self._close()
        self.block += 1
        self.block_kind = kind
        return out + (b'event: content_block_start\ndata: {"type":"content_block_start",'
                      b'"index":%d,"content_block":%b}\n\n' % (self.block, block))

    def _close(self) -> bytes:
        if not self.block_kind:
            return b""
        self.block_kind = ""
        return (b'event: content_block_stop\ndata: {"type":"content_block_stop",'
                b'"index":%d}\n\n' % self.block)

    def end(self, usage: Usage, stop: str | None = None) -> bytes:
        """The stream's last events: the open block closed, the stop reason and usage."""
        out = b"" if self.started else self._start("")
        out += self._close()
        return out + (b'event: message_delta\ndata: {"type":"message_delta","delta":'
                      b'{"stop_reason":%b,"stop_sequence":null},"usage":%b}\n\n'
                      b'event: message_stop\ndata: {"type":"message_stop"}\n\n' % (
                          _encode(stop or stop_reason(self.finish)), _encode(usage_of(usage))))


_TEXT_BLOCK = b'{"type":"text","text":""}'  # a text block as it opens


def _error_event(payload: bytes) -> bytes:
    try:
        detail = msgspec.json.decode(payload).get("error") or {}
    except (msgspec.MsgspecError, AttributeError):
        detail = {}
    message = detail.get("message") if isinstance(detail, dict) else None
    return event("error", {"error": {"type": "api_error",
                                     "message": str(message or "provider error")}})
