"""Legacy completions (``POST /v1/completions``, with ``suffix`` for fill-in-the-middle),
passed through to OpenAI-compatible providers (vLLM, llama.cpp, OpenAI's instruct model).

The body goes to the provider as the caller sent it, but for the upstream model
name, the output bound the call's money requires, and, on a stream, a usage
request (``stream_options.include_usage``) whose answer is dropped when the
caller did not ask for it. ``best_of`` is billed as the provider bills it: the
budget holds ``max(n, best_of)`` completions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from tollway.errors import InvalidRequest
from tollway.pipeline.decode import Count, ModelName, StreamOptions, _check_input, _decode
from tollway.pipeline.stream import DONE
from tollway.pipeline.surface import CallState, Counted, Surface, Wire, call_model, rewritten
from tollway.pipeline.taps import EventTap
from tollway.pipeline.usage import Usage, count_input, count_text

if TYPE_CHECKING:
    from tollway.pipeline.plan import Deployment
    from tollway.pipeline.taps import Tap

__all__ = ["COMPLETIONS", "COMPLETIONS_SURFACE", "CompletionRequest"]

COMPLETIONS = "completions"
Choices = Annotated[int, Meta(ge=1, le=128)]


class CompletionRequest(msgspec.Struct):
    model: ModelName
    prompt: str | list[Any]
    suffix: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    n: Choices | None = None
    best_of: Choices | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    echo: bool | None = None
    user: str | None = None

    def count_prompt(self, upstream: str) -> int:
        """Tokens of ``prompt`` (text, texts or token ids) and ``suffix``."""
        tokens = count_input(self.prompt, upstream)
        if self.suffix:
            tokens += count_text(self.suffix, upstream)
        return tokens

    @property
    def choices(self) -> int:
        return max(self.n or 1, self.best_of or 1)


_request = msgspec.json.Decoder(CompletionRequest)


def decode_completion(body: bytes) -> CompletionRequest:
    req = _decode(_request, body)
    try:
        _check_input(req.prompt)
    except InvalidRequest as exc:  # the same rule as embeddings' `input`, named `prompt`
        raise InvalidRequest(exc.message.replace("`input`", "`prompt`"),
                             param="prompt") from None
    return req


class _Choice(msgspec.Struct):
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: Usage | None = None
    error: dict[str, object] | None = None


_chunk = msgspec.json.Decoder(_Chunk)


class _Completion(msgspec.Struct):
    choices: list[_Choice] = []


_completion = msgspec.json.Decoder(_Completion)


class CompletionsTap(EventTap):
    """Legacy completion chunks: ``choices[].text``; the usage-only chunk dropped unless
    the caller asked for it."""

    __slots__ = ("keep_usage",)

    def __init__(self, keep_usage: bool, limit: int = 0, upstream: str = "") -> None:
        super().__init__(limit, upstream)
        self.keep_usage = keep_usage

    def read(self, name: bytes, payload: bytes) -> bytes | None:
        if not payload:
            return None
        if payload == b"[DONE]":
            self.done = True
            return b""  # the relay ends the stream, after any usage it adds
        try:
            chunk = _chunk.decode(payload)
        except msgspec.MsgspecError:
            return None
        if chunk.error is not None:
            self.error = True
        for choice in chunk.choices or ():
            if choice.text:
                self.parts.append(choice.text)
        if chunk.usage is not None:
            self.usage = chunk.usage
            if not self.keep_usage and not chunk.choices:
                return b""
        return None


class _CompletionsWire(Wire):
    path = "completions"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        return rewritten(call, dep, bound, call.stream and not call.include_usage,
                         field="max_tokens")

    def text(self, body: bytes) -> str:
        try:
            done = _completion.decode(body)
        except msgspec.MsgspecError:
            return ""
        return "".join(c.text or "" for c in done.choices)

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        return CompletionsTap(call.include_usage, limit, upstream)

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        if call.include_usage and tap.usage is None:
            return _event(call, [], counted()) + DONE
        return DONE

    def cut(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        tail = _event(call, [{"text": "", "index": 0, "logprobs": None,
                              "finish_reason": "length"}], None)
        if call.include_usage:
            tail += _event(call, [], counted())
        return tail + DONE


def _event(call: CallState, choices: list[dict[str, Any]], usage: Usage | None) -> bytes:
    body: dict[str, Any] = {"id": "tollway-completion", "object": "text_completion",
                            "created": int(time.time()), "model": call_model(call),
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


COMPLETIONS_SURFACE = Surface(COMPLETIONS, decode_completion, {"openai": _CompletionsWire()})
