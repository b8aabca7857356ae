"""Where the APIs the gateway serves differ: one :class:`Surface` per API, one
:class:`Wire` per (API, provider kind) that can serve it.

Every surface (chat completions, embeddings, legacy completions, Anthropic
Messages) goes through the one order of :mod:`tollway.pipeline`: decode,
plan, guards, dispatch, settle, record. What differs is small and lives
here: how the body decodes and how its prompt is counted (the request
struct), which provider kinds can serve it, and, per provider kind, the
provider path, the body the provider gets, how its usage and generated text
are read, what the client gets back (the reply as is, or translated), the
stream's tap and last events, and the error shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from tollway.asgi import Headers, Send, send_error
from tollway.errors import InvalidRequest
from tollway.pipeline.decode import decode_chat, decode_embeddings, rewrite
from tollway.pipeline.stream import DONE, SseTap, error_event, length_event, usage_event
from tollway.pipeline.usage import Usage, reply_text, reply_usage
from tollway.tokens import MAX_TOKENS_FIELDS

if TYPE_CHECKING:
    from tollway.pipeline.plan import Deployment
    from tollway.pipeline.taps import Tap

__all__ = ["CHAT_SURFACE", "EMBEDDINGS_SURFACE", "CallState", "Surface", "Wire", "rewritten"]

class CallState(Protocol):
    """What of a call (:class:`tollway.pipeline.call.Call`) the surfaces read and set."""

    body: bytes
    request: Any
    stream: bool
    include_usage: bool
    prompt_counts: dict[str, int]
    protocol_headers: dict[str, str]
    deployment: Deployment | None


Counted = Callable[[], Usage]  # the stream's usage as counted by the gateway


def rewritten(call: CallState, dep: Deployment, bound: int, ask_usage: bool,
              field: str | None = None) -> bytes:
    """The call's body as ``dep`` must see it; the original bytes when unchanged.

    The upstream's model name; a usage request on a stream (``ask_usage``); an output
    bound in the fields the caller sent (lowered), else in ``field`` (default: the one
    the model takes; OpenAI's reasoning models refuse ``max_tokens``)."""
    req = call.request
    model = dep.upstream if dep.upstream != req.model else None
    if model is None and not ask_usage and not bound:
        return call.body
    numbers: dict[str, int] = {}
    if bound:  # a field the caller set lower than the bound (both set) stays as it is
        numbers = {f: min(v, bound) for f in MAX_TOKENS_FIELDS
                   if (v := getattr(req, f, None)) is not None}
        numbers = numbers or {field or dep.max_tokens_field: bound}
    return rewrite(call.body, model=model, include_usage=ask_usage, numbers=numbers)


class Wire:
    """One surface over one provider kind. The defaults are OpenAI's chat completions."""

    path = "chat"  # the provider's URL (tollway.providers.openai)

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        return rewritten(call, dep, bound, call.stream and not call.include_usage)

    def headers(self, call: CallState) -> Mapping[str, str] | None:
        """Protocol headers of the caller's to pass on (never a key)."""
        return None

    def usage(self, body: bytes) -> Usage | None:
        """The usage of a whole reply; raises msgspec.MsgspecError when it is unreadable."""
        return reply_usage(body)

    def text(self, body: bytes) -> str:
        """Generated text of a whole reply (to count when it has no usage)."""
        return reply_text(body)

    def reply(self, call: CallState, body: bytes) -> bytes:
        """What the client gets of a whole reply."""
        return body

    def tap(self, call: CallState, limit: int, upstream: str) -> Tap:
        return SseTap(call.include_usage, limit, upstream)

    def end(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        """The last bytes of a stream the provider ended whole."""
        if call.include_usage and tap.usage is None:
            return usage_event(call_model(call), counted(), "tollway-usage") + DONE
        return DONE

    def cut(self, call: CallState, tap: Tap, counted: Counted) -> bytes:
        """The last bytes of a stream cut at its output limit (the provider ignored
        max_tokens)."""
        tail = length_event(call_model(call), "tollway-length")
        if call.include_usage:
            tail += usage_event(call_model(call), counted(), "tollway-usage")
        return tail + DONE

    def error_event(self, message: str, type_: str, code: str | None) -> bytes:
        return error_event(message, type_, code)


class _EmbeddingsWire(Wire):
    path = "embeddings"

    def body(self, call: CallState, dep: Deployment, bound: int) -> bytes:
        return rewritten(call, dep, 0, False)

    def text(self, body: bytes) -> str:
        return ""


class Surface:
    """One API: its endpoint name (the call record's), its decoder, its wires."""

    # Request headers of the protocol the pipeline keeps for the wires (lower case).
    protocol_headers: frozenset[bytes] = frozenset()

    def __init__(self, endpoint: str, decode: Callable[[bytes], Any],
                 wires: Mapping[str, Wire]) -> None:
        self.endpoint = endpoint
        self._decode = decode
        self.wires = dict(wires)

    def decode(self, call: CallState) -> None:
        """Decode ``call.body`` into ``call.request`` (and ``stream``, ``include_usage``)."""
        req = self._decode(call.body)
        call.request = req
        stream = getattr(req, "stream", None)
        call.stream = bool(stream)
        options = getattr(req, "stream_options", None)
        call.include_usage = bool(stream and options and options.include_usage)

    def wire(self, kind: str, responses: bool = False) -> Wire | None:
        """How a provider of ``kind`` serves this API (``responses``: it serves OpenAI's
        Responses API itself); None: it cannot."""
        return self.wires.get(kind)

    def serves(self, call: CallState, dep: Deployment) -> InvalidRequest | None:
        """None when ``dep`` can serve ``call``, else why not (the policy's refusal when no
        candidate can)."""
        if self.wire(dep.provider_kind, dep.responses) is None:
            return InvalidRequest(f"`{call.request.model}` is not served on the "
                                  f"{self.endpoint} API", param="model",
                                  code="model_not_supported")
        return None

    async def send_error(self, send: Send, exc: BaseException,
                         headers: Headers | None = None) -> None:
        await send_error(send, exc, headers)

    def shadow_body(self, call: CallState) -> bytes | None:
        """The call as a chat completions request, which shadow mode sends its candidates
        (OpenAI-compatible models); None: this API is not shadowed."""
        return call.body if self.endpoint == "chat.completions" else None


def call_model(call: CallState) -> str:
    return call.deployment.upstream if call.deployment is not None else ""


CHAT_SURFACE = Surface("chat.completions", decode_chat, {"openai": Wire()})
EMBEDDINGS_SURFACE = Surface("embeddings", decode_embeddings, {"openai": _EmbeddingsWire()})
