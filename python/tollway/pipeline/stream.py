"""Server-sent events from the provider, passed through as they arrive.

:class:`SseTap` sees every complete event on its way to the client: it notes
the first token, collects generated text (to count tokens when the provider
sends no usage, or when the client leaves before the usage chunk), takes the
provider's usage chunk, and drops that chunk when the caller did not ask for
usage (tollway always asks the provider for it). Events are forwarded as the
provider's bytes, never re-encoded.

Given a limit (the output tokens the budget held the call at, when that is
less than the model's full output), it drops the event that would take the
relayed output past it and every event after (:attr:`SseTap.cut`): a
provider that ignores ``max_tokens`` still cannot make the call cost more
than was held, since what is billed is what was relayed.
"""

from __future__ import annotations

import time

import msgspec

from tollway.errors import UpstreamError
from tollway.pipeline.usage import Usage, count_text


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_ChunkChoice] | None = None
    usage: Usage | None = None
    error: dict[str, object] | None = None


_chunk = msgspec.json.Decoder(_Chunk)
DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1 << 20  # one event held until its end comes: ~250k tokens of text


class SseTap:
    __slots__ = ("_buf", "_counted", "_uncounted", "cut", "done", "error", "finish_reason",
                 "first_token_at", "keep_usage", "limit", "parts", "upstream", "usage")

    def __init__(self, keep_usage: bool, limit: int = 0, upstream: str = "") -> None:
        self.keep_usage = keep_usage
        # Output tokens relayed at most (0: no limit), counted as the settle counts them
        # (the text of every choice, in the encoding of ``upstream``).
        self.limit = limit
        self.upstream = upstream
        self.cut = False  # an event went past the limit: nothing more is relayed
        self._counted = 0  # tokens of the parts when last counted ...
        self._uncounted = 0  # ... plus at most this many since (a token is >= 1 byte)
        self._buf = b""
        self.parts: list[str] = []
        self.usage: Usage | None = None
        self.first_token_at: float | None = None  # perf_counter
        self.done = False  # saw [DONE]
        self.error = False  # the provider sent an error event
        self.finish_reason = ""  # the first choice's, when the stream said it

    def feed(self, data: bytes) -> bytes:
        """Complete events in ``data`` (plus what was buffered), ready to forward."""
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            self._check_held()
            return b""
        self._buf = buf[end + 2:]
        self._check_held()
        complete = buf[: end + 2]
        out: list[bytes] = []
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            if self._inspect(event):
                out.append(event)
                out.append(b"\n\n")
        return b"".join(out)

    def _check_held(self) -> None:
        # Not an event stream (an HTML page with a 200, say): refuse it rather than
        # hold and re-copy it whole for every chunk that arrives.
        if len(self._buf) > MAX_EVENT_BYTES:
            raise UpstreamError("provider sent something other than an event stream "
                                f"(no event end in {MAX_EVENT_BYTES} bytes)")

    def _inspect(self, event: bytes) -> bool:
        """Read one event; False to drop it."""
        payload = b""
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                piece = line[5:]
                if piece.startswith(b" "):
                    piece = piece[1:]
                payload = payload + b"\n" + piece if payload else piece
        if self.cut:
            return False
        if not payload:
            return True  # comments, keep-alives: pass through
        if payload == b"[DONE]":
            # Held back: the relay ends the stream itself, after any usage it adds.
            self.done = True
            return False
        try:
            chunk = _chunk.decode(payload)
        except msgspec.MsgspecError:
            return True
        if chunk.error is not None:
            self.error = True
        got_token = False
        before = len(self.parts)
        for choice in chunk.choices or ():
            if choice.finish_reason and not self.finish_reason:
                self.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                self.parts.append(delta.content)
                got_token = True
            if delta.refusal:
                self.parts.append(delta.refusal)
                got_token = True
            for call in delta.tool_calls or ():
                fn = call.function
                if fn is not None:
                    if fn.name:
                        self.parts.append(fn.name)
                    if fn.arguments:
                        self.parts.append(fn.arguments)
                    got_token = True
        if got_token and self.limit and self._over(before):
            del self.parts[before:]
            self.cut = True
            return False
        if got_token and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if chunk.usage is not None:
            self.usage = chunk.usage
            # The usage-only chunk has no choices; others carry "usage": null.
            if not self.keep_usage and not chunk.choices:
                return False
        return True

    def text(self) -> str:
        return "".join(self.parts)

    def _over(self, before: int) -> bool:
        """Whether the parts from ``before`` on take the output past :attr:`limit`.

        Counting the whole text at every event would cost O(n^2): it is counted only
        once its byte length (at most 4 bytes a character) could pass the limit.
        """
        self._uncounted += 4 * sum(len(p) for p in self.parts[before:])
        if self._counted + self._uncounted <= self.limit:
            return False
        self._counted = count_text(self.text(), self.upstream)
        self._uncounted = 0
        return self._counted > self.limit


def usage_event(model: str, usage: Usage, chunk_id: str) -> bytes:
    """A usage chunk in OpenAI's shape, for a caller who asked and got none from upstream."""
    body = msgspec.json.encode({
        "id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "choices": [], "usage": usage,
    })
    return b"data: " + body + b"\n\n"


def length_event(model: str, chunk_id: str) -> bytes:
    """The last chunk of a stream cut at its output limit, as a provider ends one that
    reached max_tokens."""
    body = msgspec.json.encode({
        "id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
    })
    return b"data: " + body + b"\n\n"


def error_event(message: str, type_: str, code: str | None) -> bytes:
    body = msgspec.json.encode({"error": {"message": message, "type": type_, "param": None,
                                          "code": code}})
    return b"data: " + body + b"\n\n"
