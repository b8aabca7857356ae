"""Step 2: decode the request body once, into structs holding what tollway needs.

Only the fields the gateway reads are typed; every other field stays in the
original bytes, which are what the provider receives. The body is re-encoded
only when the gateway must change it (a different upstream model name, or a
usage request added to a stream).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from tollway.errors import InvalidRequest

T = TypeVar("T")
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
# Far above any model's output, and low enough that the bound of a call (times `n`, plus
# the prompt) stays inside the core's 64-bit counts: above it the estimate overflowed (500).
OutputTokens = Annotated[int, Meta(ge=1, le=2**32 - 1)]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ChatMessage(msgspec.Struct):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str | list[Any] | None = None


class ChatRequest(msgspec.Struct):
    model: ModelName
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: OutputTokens | None = None
    max_completion_tokens: OutputTokens | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


class EmbeddingsRequest(msgspec.Struct):
    model: ModelName
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


_chat = msgspec.json.Decoder(ChatRequest)
_embeddings = msgspec.json.Decoder(EmbeddingsRequest)
_any = msgspec.json.Decoder()
_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode

_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


# msgspec before 0.19 lets a UnicodeDecodeError out for bad UTF-8 in an object's key.
_UNREADABLE = (msgspec.MsgspecError, UnicodeDecodeError)


def _invalid(exc: Exception) -> InvalidRequest:
    if isinstance(exc, UnicodeDecodeError):
        return InvalidRequest("request body is not valid UTF-8", code="invalid_json")
    msg = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return InvalidRequest(f"request body is not valid JSON: {msg}", code="invalid_json")
    param = None
    m = _AT.search(msg)
    if m:
        param = m.group(1) or None
    m2 = _MISSING.search(msg)
    if m2:
        param = f"{param}.{m2.group(1)}" if param else m2.group(1)
    return InvalidRequest(msg, param=param)


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except _UNREADABLE as exc:
        raise _invalid(exc) from None
    except RecursionError:  # msgspec stops at the interpreter's recursion limit (~1,000)
        raise InvalidRequest("request body nests too deeply", code="nesting_too_deep") from None


def decode_chat(body: bytes) -> ChatRequest:
    return _decode(_chat, body)


def decode_embeddings(body: bytes) -> EmbeddingsRequest:
    req = _decode(_embeddings, body)
    if isinstance(req.input, list) and not req.input:
        raise InvalidRequest("`input` must not be empty", param="input")
    if isinstance(req.input, str) and not req.input:
        raise InvalidRequest("`input` must not be empty", param="input")
    return req


def rewrite(body: bytes, *, model: str | None, include_usage: bool,
            drop: tuple[str, ...] = ()) -> bytes:
    """The body with `model` replaced and/or a stream usage request added, and without
    the top-level members ``drop`` names.

    Only the top level is decoded; every other member (the messages) is copied as raw
    JSON, not built into Python objects and encoded again: on the event loop, a 4 MB
    prompt costs about 12 ms this way against 50 ms.
    """
    try:
        return _rewritten(body, model, include_usage, drop)
    except _UNREADABLE as exc:
        # The decoders skip the members they do not type without reading them; this reads
        # every key (and those of stream_options), so it alone sees bad UTF-8 in them.
        raise _invalid(exc) from None


def _rewritten(body: bytes, model: str | None, include_usage: bool,
               drop: tuple[str, ...]) -> bytes:
    data = _top_level.decode(body)
    for name in drop:
        data.pop(name, None)
    if model is not None:
        data["model"] = msgspec.Raw(_encode(model))
    if include_usage:
        raw = data.get("stream_options")
        opts = _any.decode(raw) if raw is not None else None
        data["stream_options"] = msgspec.Raw(_encode(
            {**(opts if isinstance(opts, dict) else {}), "include_usage": True}))
    out: bytes = _encode(data)
    return out
