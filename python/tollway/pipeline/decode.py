"""Step 2: decode the request body once, into structs holding what tollway needs.

Only the fields the gateway reads are typed; every other field stays in the
original bytes, which are what the provider receives. The body is re-encoded
only when the gateway must change it (a different upstream model name, a
usage request added to a stream, or an output bound the call's money requires).

Whatever a client sends is a 400 in the OpenAI envelope when it does not fit,
never a 500: a body that is not UTF-8 or not JSON, the wrong types, nesting
deeper than the decoder's recursion limit, numbers the gateway would have to
hold in 64 bits (token counts are bounded to 32), and a top-level member named
twice. The gateway reads a duplicated member one way (the last) and a provider
may read the bytes it forwards another (the first): the model, ``stream`` or
``max_tokens`` it checked would not be the ones served. Nested members are
the provider's to read, and not checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from tollway._core import duplicate_member, utf8_error
from tollway.errors import InvalidRequest

T = TypeVar("T")
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
# Token counts and ids the gateway passes to the Rust core as 64-bit integers, and
# providers as 32-bit ones: the largest a provider can accept. Far above any model's
# output, and low enough that a call's bound (times `n`, plus the prompt) stays inside
# the core's 64-bit counts.
MAX_INT32 = 2**31 - 1
Count = Annotated[int, Meta(ge=1, le=MAX_INT32)]


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
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
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
    dimensions: Count | None = None
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


def invalid_request(exc: Exception) -> InvalidRequest:
    """The 400 for a body msgspec could not decode into its struct, naming the field."""
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
    # msgspec lets bytes that are not UTF-8 through in the members it skips (and 0.18
    # raises UnicodeDecodeError for a typed one); JSON is UTF-8 (RFC 8259).
    if not body.isascii():
        bad = utf8_error(body)
        if bad is not None:
            raise InvalidRequest(f"request body is not UTF-8 (byte {bad})",
                                 code="invalid_json")
    try:
        req = decoder.decode(body)
        _unique_members(body)
    except _UNREADABLE as exc:
        raise invalid_request(exc) from None
    except RecursionError:
        # msgspec stops at the interpreter's recursion limit (~1,000)
        raise InvalidRequest("request body nests too deeply", code="nesting_too_deep") from None
    return req


def _unique_members(body: bytes) -> None:
    """Refuse a body (a valid JSON object) whose top level names a member twice.

    The decoder keeps one value per name, the last, so what it returns cannot show a
    duplicate: the core reads the names once more, skipping every value, and compares
    them as JSON means them (escapes decoded)."""
    name = duplicate_member(body)
    if name is not None:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidRequest(f"the request body names the top-level member {shown!r} twice",
                             code="duplicate_key")


def decode_chat(body: bytes) -> ChatRequest:
    return _decode(_chat, body)


def decode_embeddings(body: bytes) -> EmbeddingsRequest:
    req = _decode(_embeddings, body)
    _check_input(req.input)
    return req


def _check_input(value: str | list[Any]) -> None:
    """`input` is a string, strings, token ids or arrays of token ids, and not empty."""
    if isinstance(value, str):
        if value:
            return
    elif value:
        kind = type(value[0])
        if kind is str and all(type(x) is str for x in value):
            return
        if kind is int and _token_ids(value):
            return
        if kind is list and all(type(x) is list and x and _token_ids(x) for x in value):
            return
        raise InvalidRequest("`input` must be a string, an array of strings, an array of "
                             f"token ids (0 to {MAX_INT32}) or an array of such arrays",
                             param="input")
    raise InvalidRequest("`input` must not be empty", param="input")


def _token_ids(items: list[Any]) -> bool:
    return all(type(x) is int and 0 <= x <= MAX_INT32 for x in items)


def rewrite(body: bytes, *, model: str | None, include_usage: bool,
            drop: tuple[str, ...] = (), numbers: Mapping[str, int] | None = None) -> bytes:
    """The body with `model` replaced and/or a stream usage request added, without
    the top-level members ``drop`` names, and with the members ``numbers`` gives set.

    Only the top level is decoded; every other member (the messages) is copied as raw
    JSON, not built into Python objects and encoded again: on the event loop, a 4 MB
    prompt costs about 12 ms this way against 50 ms.
    """
    try:
        return _rewritten(body, model, include_usage, drop, numbers)
    except _UNREADABLE as exc:
        # The decoders skip the members they do not type without reading them; this reads
        # every key (and those of stream_options), so it alone sees bad UTF-8 in them.
        raise invalid_request(exc) from None


def _rewritten(body: bytes, model: str | None, include_usage: bool,
               drop: tuple[str, ...], numbers: Mapping[str, int] | None) -> bytes:
    data = _top_level.decode(body)
    for name in drop:
        data.pop(name, None)
    if model is not None:
        data["model"] = msgspec.Raw(_encode(model))
    for name, value in (numbers or {}).items():
        data[name] = msgspec.Raw(_encode(value))
    if include_usage:
        raw = data.get("stream_options")
        opts = _any.decode(raw) if raw is not None else None
        data["stream_options"] = msgspec.Raw(_encode(
            {**(opts if isinstance(opts, dict) else {}), "include_usage": True}))
    out: bytes = _encode(data)
    return out
