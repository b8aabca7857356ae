"""Anthropic's Messages API (``POST /v1/messages``): passed through to ``kind =
"anthropic"`` providers, translated to chat completions for OpenAI-compatible ones.

The key comes as ``x-api-key`` (or ``Authorization: Bearer``); ``anthropic-version``
and ``anthropic-beta`` go on to an Anthropic provider with the body's bytes as the
caller sent them (unknown fields and ``cache_control`` intact), but for the upstream
model name and the output bound the call's money requires. Usage is the provider's:
``input_tokens`` plus the prompt-cache reads and writes (each priced at its own
price) make the call's prompt tokens. Errors, refusals included, answer in
Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``, and a stream
that breaks ends with its ``error`` event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from tollway.asgi import Headers, Send, send_bytes
from tollway.errors import TollwayError, public_message, spec_for
from tollway.pipeline.decode import Count, ModelName, _decode
from tollway.pipeline.prompt import prompt_tokens
from tollway.pipeline.surface import CallState, Counted, Surface, Wire, rewritten
from tollway.pipeline.taps import EventTap
from tollway.pipeline.translate import (
    ChatToMessages,
    chat_messages,
    chat_request,
    chat_tools,
    message_of,
)
from tollway.pipeline.translate import event as sse_event
from tollway.pipeline.usage import CachedUsage, Usage
from tollway.tokens import count_chat_tokens

if TYPE_CHECKING:
    from tollway.config import TenantConfig
    from tollway.pipeline.plan import Catalog, Deployment
    from tollway.pipeline.taps import Tap

__all__ = ["MESSAGES", "MESSAGES_SURFACE", "MessagesRequest", "count_tokens", "error_shape"]

MESSAGES = "messages"


class InputMessage(msgspec.Struct):
    role: Annotated[str, Meta(pattern="^(user|assistant)$")]
    # Anthropic refuses a message without content blocks, as the translation would too
    content: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]


class Conversation(msgspec.Struct, kw_only=True):
    """What ``/v1/messages/count_tokens`` takes: a Messages request's prompt (unknown
    fields, ``thinking`` or ``mcp_servers`` say, are ignored)."""

    model: ModelName
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None

    def count_prompt(self, upstream: str) -> int:
        """Prompt tokens as the chat counter counts the same conversation."""
        return int(count_chat_tokens(chat_messages(self.system, self.messages), upstream,
                                     chat_tools(self.tools)))


class MessagesRequest(Conversation, kw_only=True):
    max_tokens: Count
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    metadata: dict[str, Any] | None = None


class TokenCount(msgspec.Struct):
    """Anthropic's answer to ``count_tokens``."""

    input_tokens: int


_request = msgspec.json.Decoder(MessagesRequest)
_conversation = msgspec.json.Decoder(Conversation)


def decode_messages(body: bytes) -> MessagesRequest:
    return _decode(_request, body)


def count_tokens(body: bytes, tenant: TenantConfig, catalog: Catalog) -> bytes:
    """``POST /v1/messages/count_tokens``: the prompt's tokens, counted here with the
    tokenizer of the model the name resolves to first (a route alias: its first
    candidate), as the gateway counts the call's prompt for its budget. No provider is
    called and nothing is billed; for Claude models, whose tokenizer is not public, the
    count is tollway's estimate, not Anthropic's."""
    conv = _decode(_conversation, body)
    plan = catalog.plan(tenant, conv.model)
    return msgspec.json.encode(TokenCount(conv.count_prompt(plan.candidates[0].upstream)))


# ---- Anthropic's shapes ---------------------------------------------------------------
class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    name: str | None = None
    input: Any = None
    thinking: str | None = None


class _Delta(msgspec.Struct):
    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None


class _Body(msgspec.Struct):
    """A whole message, or one stream event (``type`` says which)."""

    type: str = ""
    usage: _Usage | None = None
    content: list[_Block] = []
    message: _Body | None = None
    delta: _Delta | None = None
    content_block: _Block | None = None
    index: int | None = None


_body = msgspec.json.Decoder(_Body)


def _usage(*parts: _Usage | None) -> CachedUsage:
    """The usage the parts give (later ones win, field by field), as the gateway's."""
    got = _Usage()
    for part in parts:
        if part is None:
            continue
        for name in _Usage.__struct_fields__:
            value = getattr(part, name)
            if value is not None:
                setattr(got, name, value)
    read = got.cache_read_input_tokens or 0
    write = got.cache_creation_input_tokens or 0
    prompt = (got.input_tokens or 0) + read + write
    out = got.output_tokens or 0
    return CachedUsage(prompt_tokens=prompt, completion_tokens=out, total_tokens=prompt + out,
                       cache_read_tokens=read, cache_write_tokens=write)


def _block_text(block: _Block) -> list[str]:
    if block.type == "tool_use":
        return [block.name or "", msgspec.json.encode(block.input or {}).decode()]
    return [block.text or block.thinking or ""]


class AnthropicTap(EventTap):
    """Anthropic's stream events: text, tool input JSON and thinking deltas are counted;
    the usage is ``message_start``'s with ``message_delta``'s on top; ``message_stop``
    ends it whole."""

    __slots__ = ("_start", "open_block")

    def __init__(self, limit: int = 0, upstream: str = "") -> None:
        super().__init__(limit, upstream)
        self._start: _Usage | None = None
        self.open_block: int | None = None

    def read(self, name: bytes, payload: bytes) -> bytes | None:
        if not payload:
            return None
        try:
            ev = _body.decode(payload)
        except msgspec.MsgspecError:
            return None
        kind = ev.type
        if kind == "content_block_delta" and ev.delta is not None:
            d = ev.delta
            piece = d.text or d.partial_json or d.thinking
            if piece:
                self.parts.append(piece)
        elif kind == "content_block_start":
            self.open_block = ev.index
            if ev.content_block is not None and ev.content_block.name:
                self.parts.append(ev.content_block.name)
        elif kind == "content_block_stop":
            self.open_block = None
        elif kind == "message_start" and ev.message is not None:
            self._start = ev.message.usage
        elif kind == "message_delta":
            self.usage = _usage(self._start, ev.usage)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = True
        return None


# ---- wires ----------------------------------------------------------------------------
_PASSED_HEADERS = ("anthropic-version", "anthropic-beta")


class _PassThrough(Wire):
    """To an Anthropic provider, the caller's bytes."""

    path = "messages"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        return rewritten(call, dep, bound, False, field="max_tokens")

    def headers(self, call: CallState) -> Mapping[str, str] | None:
        got = call.protocol_headers
        return {h: got[h] for h in _PASSED_HEADERS if h in got} or None

    def usage(self, body: bytes) -> Usage | None:
        done = _body.decode(body)
        return _usage(done.usage) if done.usage is not None else None

    def text(self, body: bytes) -> str:
        try:
            done = _body.decode(body)
        except msgspec.MsgspecError:
            return ""
        return "".join(t for b in done.content for t in _block_text(b))

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        return AnthropicTap(limit, upstream)

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        return b""  # message_stop went out with the rest

    def cut(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        out = b""
        block = tap.open_block if isinstance(tap, AnthropicTap) else None
        if block is not None:
            out += sse_event("content_block_stop", {"index": block})
        usage = counted()
        return out + sse_event("message_delta", {
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": usage.completion_tokens}}) + sse_event(
            "message_stop", {})

    def error_event(self, message: str, type_: str, code: str | None) -> bytes:
        return _error_event(message, type_)


def _error_event(message: str, openai_type: str) -> bytes:
    return sse_event("error", {"error": {"type": _type_of(openai_type), "message": message}})


class _Translated(Wire):
    """To an OpenAI-compatible provider, as chat completions (tollway.pipeline.translate);
    usage and text are read as chat's."""

    path = "chat"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        req = call.request
        out = min(req.max_tokens, bound) if bound else req.max_tokens
        return chat_request(req, dep.upstream, out, dep.max_tokens_field, call.stream)

    def error_event(self, message: str, type_: str, code: str | None) -> bytes:
        return _error_event(message, type_)

    def reply(self, call: CallState, body: bytes) -> bytes:
        return message_of(body, call.request.model)

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        counted = prompt_tokens(call, upstream) if call.deployment is not None else 0
        return ChatToMessages(limit, upstream, call.request.model, counted or 0)

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        assert isinstance(tap, ChatToMessages)
        return tap.end(tap.usage or counted())

    def cut(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        assert isinstance(tap, ChatToMessages)
        return tap.end(counted(), "max_tokens")


# ---- errors ---------------------------------------------------------------------------
_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          403: "permission_error", 404: "not_found_error", 413: "request_too_large",
          429: "rate_limit_error", 503: "overloaded_error"}


def _type_of(openai_type: str) -> str:
    return {"invalid_request_error": "invalid_request_error",
            "rate_limit_error": "rate_limit_error", "insufficient_quota": "rate_limit_error",
            "permission_error": "permission_error"}.get(openai_type, "api_error")


def error_shape(exc: BaseException) -> tuple[int, bytes]:
    """(status, Anthropic's error body) for ``exc``."""
    spec = spec_for(exc)
    body = {"type": "error", "error": {
        "type": _TYPES.get(spec.status, "api_error"), "message": public_message(exc)}}
    return spec.status, msgspec.json.encode(body)


async def send_anthropic_error(send: Send, exc: BaseException,
                               headers: Headers | None = None) -> int:
    status, body = error_shape(exc)
    extra = list(headers or ())
    if isinstance(exc, TollwayError) and exc.headers:
        extra.extend((k.lower().encode(), v.encode()) for k, v in exc.headers.items())
    await send_bytes(send, status, body, extra)
    return status


class _MessagesSurface(Surface):
    protocol_headers = frozenset(h.encode() for h in _PASSED_HEADERS)

    async def send_error(self, send: Send, exc: BaseException,
                         headers: Headers | None = None) -> None:
        await send_anthropic_error(send, exc, headers)

    def shadow_body(self, call: CallState) -> bytes | None:
        req = call.request
        return chat_request(req, req.model, req.max_tokens, "max_tokens", False)


MESSAGES_SURFACE = _MessagesSurface(MESSAGES, decode_messages,
                                    {"anthropic": _PassThrough(), "openai": _Translated()})
