"""Server-sent events from the provider, passed through as they arrive.

:class:`SseTap` sees every complete event on its way to the client: it notes
the first token, takes the provider's usage chunk, and drops that chunk when
the caller did not ask for usage (tollway always asks the provider for it).
Events are forwarded as the provider's bytes, never re-encoded; what is not
dropped goes out byte for byte (a stream with CRLF line ends is relayed with
LF ones).

Most events need no decoding. Once the first token has been seen, a run of
complete events is forwarded whole unless its bytes hold ``[DONE]``, an
``"error"`` key or a ``"usage"`` that is not null; only such a run is read
event by event. The generated text (to count tokens when the provider sends
no usage, or the client leaves before the usage chunk; and for the shadow's
comparison) is decoded from the forwarded bytes only when asked for
(:meth:`SseTap.text`), so a stream that ends with its usage chunk is never
decoded past its first token. The forwarded bytes are held until then, up to
:data:`HELD_TEXT_BYTES`, past which they are decoded and let go.

A translated stream (Messages, Responses) gives its translator, the tap's
:class:`Sink`, each chunk as it is read, decoded once; a run of plain events
that are text deltas alone (nearly all of a reply) is instead written as the
other API's events in one call into the core (``_core.text_deltas``: each
piece's JSON string copied from the provider's bytes), and only what it will
not read (a tool call, a refusal, odd JSON) is decoded here.

Given a limit (the output tokens the budget held the call at, when that is
less than the model's full output), every event is read as it comes, and the
tap drops the event that would take the relayed output past the limit and
every event after (:attr:`SseTap.cut`; a translated run of text deltas goes
whole only when its text cannot take the output past the limit, a token being at
least a byte): a provider that ignores
``max_tokens`` still cannot make the call cost more than was held, since what
is billed is what was relayed.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import msgspec

from tollway._core import plain_end, text_deltas
from tollway.errors import UpstreamError
from tollway.pipeline.usage import Usage, count_text


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    id: str = ""
    choices: list[_ChunkChoice] | None = None
    usage: Usage | None = None
    error: dict[str, object] | None = None


_chunk = msgspec.json.Decoder(_Chunk)
NO_FUNCTION = _Function()  # a tool call's, when its chunk names none
DONE = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 1 << 20  # one event held until its end comes: ~250k tokens of text
# Forwarded bytes held for their text at most; past it they are decoded into text. A
# chunk is ~250 bytes for a token or two: ~250 chunks, 64 KiB a stream at most (2,000
# streams: 128 MB), where the decoded text of as many chunks takes about a quarter.
HELD_TEXT_BYTES = 64 << 10


def _payload(event: bytes) -> bytes:
    """The data of one event: its ``data:`` lines joined by newlines."""
    payload = b""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            piece = line[5:]
            if piece.startswith(b" "):
                piece = piece[1:]
            payload = payload + b"\n" + piece if payload else piece
    return payload


class Sink(Protocol):
    """What a translator (``pipeline/translate.py``) takes from the tap, as it is read."""

    def chunk(self, payload: bytes, chunk: _Chunk) -> None:
        """A forwarded chunk, decoded (``payload``: its data when it was read alone)."""

    def template(self) -> tuple[bytes, bytes, bytes, int] | None:
        """The pieces of a text delta event (head, middle, tail, first sequence number or
        -1: none) when a run of them can be written from the provider's bytes now
        (``_core.text_deltas``); None: runs are given chunk by chunk."""

    def took(self, events: bytes, text: str, finish: str | None, count: int) -> None:
        """A run written from its bytes: its events, text, last finish reason, events
        written."""


class SseTap:
    __slots__ = ("_buf", "_counted", "_finish_reason", "_held", "_held_bytes", "_uncounted",
                 "cut", "done", "error", "first_token_at", "keep_usage", "limit", "parts",
                 "sink", "tool_calls", "upstream", "usage")

    def __init__(self, keep_usage: bool, limit: int = 0, upstream: str = "",
                 sink: Sink | None = None) -> None:
        self.keep_usage = keep_usage
        # Output tokens relayed at most (0: no limit), counted as the settle counts them
        # (the text of every choice, in the encoding of ``upstream``).
        self.limit = limit
        self.upstream = upstream
        self.cut = False  # an event went past the limit: nothing more is relayed
        self._counted = 0  # tokens of the parts when last counted ...
        self._uncounted = 0  # ... plus at most this many since (a token is >= 1 byte)
        self._buf = b""
        self.parts: list[str] = []  # text decoded so far; the held bytes hold the rest
        self._held: list[bytes] = []  # forwarded events whose text is not decoded yet
        self._held_bytes = 0
        self.usage: Usage | None = None
        self.first_token_at: float | None = None  # perf_counter
        self.done = False  # saw [DONE]
        self.error = False  # the provider sent an error event
        self._finish_reason = ""
        # (choice, tool call index) -> [name, argument pieces...] of the stream's tool
        # calls, when asked for (a request naming registry tools: tollway.tools); filled as
        # the text is (from the held bytes, when :meth:`text` is asked), never per chunk.
        self.tool_calls: dict[tuple[int, int], list[str]] | None = None
        # A translator, given every chunk forwarded as it is read, in order (instead of
        # decoding the forwarded bytes again): see :class:`Sink`. The text is then taken
        # as they are read, never held.
        self.sink = sink

    @property
    def finish_reason(self) -> str:
        """The first choice's, when the stream said it."""
        self._decode_held()
        return self._finish_reason

    def feed(self, data: bytes) -> bytes:
        """Complete events in ``data`` (plus what was buffered), ready to forward."""
        buf = self._buf + data if self._buf else data
        if buf.find(b"\r") >= 0:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            self._check_held()
            return b""
        # Events end at blank lines taken two newlines at a time from the start of a run
        # of them: in an odd run the last newline belongs to what follows (as it would had
        # the bytes come split there).
        start = end
        while start and buf[start - 1] == 10:
            start -= 1
        end = start + (end + 2 - start) // 2 * 2
        self._buf = buf[end:]
        self._check_held()
        complete = buf[:end]
        sink = self.sink
        if self.limit and sink is None:  # every event read: the cut must be exact
            return self._inspect_all(complete)
        if self.first_token_at is not None and plain_end(complete) == end:
            if sink is None:
                self._hold(complete)
                return complete
            return self._run(complete, sink)
        out: list[bytes] = []
        rest = complete
        if self.first_token_at is None:  # event by event up to the first token
            at, rest = 0, b""
            while at < end:
                stop = complete.find(b"\n\n", at)  # as split() takes them, from the left
                event = complete[at:stop]
                if self._inspect(event):
                    out.append(event)
                    out.append(b"\n\n")
                at = stop + 2
                if self.first_token_at is not None:
                    rest = complete[at:]
                    break
        if rest:
            # Past the first token, the plain events before the stream's tail (usage,
            # [DONE], an error) go as one run; only the tail is read event by event.
            start = plain_end(rest)  # where the tail starts
            if start:
                out.append(rest[:start] if sink is None else self._run(rest[:start], sink))
            out.append(self._inspect_all(rest[start:]))
        forwarded = b"".join(out)
        if forwarded and sink is None:
            self._hold(forwarded)
        return forwarded

    def _inspect_all(self, events: bytes) -> bytes:
        """The complete ``events`` read one by one: those to forward."""
        out: list[bytes] = []
        for event in events.split(b"\n\n")[:-1]:
            if self._inspect(event):
                out.append(event)
                out.append(b"\n\n")
        return b"".join(out)

    def _run(self, run: bytes, sink: Sink) -> bytes:
        """A run of plain events past the first token, for the sink: written from its
        bytes when it is text deltas alone (and, with a limit, cannot pass it), else
        decoded in one call (read event by event with a limit): what is forwarded."""
        if self.cut:
            return b""
        template = sink.template()
        got = None if template is None else text_deltas(run, *template)
        if got is not None:
            events, text, first_finish, last_finish, count = got
            if not self.limit or self._fits(text):
                if text:
                    self.parts.append(text)
                if first_finish and not self._finish_reason:
                    self._finish_reason = first_finish
                sink.took(events, text, last_finish, count)
                return run
        if self.limit:
            return self._inspect_all(run)
        chunks: list[_Chunk] = []
        self._decode_into(run, chunks)
        for chunk in chunks:
            self._text_of(chunk)
            sink.chunk(b"", chunk)
        return run

    def _fits(self, text: str) -> bool:
        """Whether ``text`` after the parts stays within the limit (then counted in)."""
        counted, uncounted = self._counted, self._uncounted
        self._uncounted += len(text.encode())  # a token is >= 1 byte
        if self._counted + self._uncounted <= self.limit:
            return True
        self._counted = count_text(self.text() + text, self.upstream)
        self._uncounted = 0
        if self._counted <= self.limit:
            return True
        self._counted, self._uncounted = counted, uncounted  # read event by event instead
        return False

    def _check_held(self) -> None:
        # Not an event stream (an HTML page with a 200, say): refuse it rather than
        # hold and re-copy it whole for every chunk that arrives.
        if len(self._buf) > MAX_EVENT_BYTES:
            raise UpstreamError("provider sent something other than an event stream "
                                f"(no event end in {MAX_EVENT_BYTES} bytes)")

    def _hold(self, events: bytes) -> None:
        self._held.append(events)
        self._held_bytes += len(events)
        if self._held_bytes > HELD_TEXT_BYTES:
            self._decode_held()

    def _decode_held(self) -> None:
        held = self._held
        if not held:
            return
        self._held = []
        self._held_bytes = 0
        chunks: list[_Chunk] = []
        self._decode_into(b"".join(held), chunks)
        for chunk in chunks:
            self._text_of(chunk)

    def _decode_into(self, events: bytes, chunks: list[_Chunk]) -> None:
        """The chunks of the complete ``events`` (a payload that is not one skipped)."""
        lines: list[bytes] = []  # one-line payloads, decoded together
        for event in events.split(b"\n\n"):
            if event.startswith(b"data: ") and event.find(b"\n") < 0:
                lines.append(event[6:])
            elif event:
                payload = _payload(event)
                if payload.find(b"\n") < 0:
                    if payload:
                        lines.append(payload)
                else:  # several data lines: a payload with newlines, decoded alone
                    self._flush(lines, chunks)
                    with contextlib.suppress(msgspec.MsgspecError):  # relayed as sent
                        chunks.append(_chunk.decode(payload))
        self._flush(lines, chunks)

    @staticmethod
    def _flush(lines: list[bytes], chunks: list[_Chunk]) -> None:
        """Decode the payloads in ``lines`` into ``chunks`` (in one call, each line one JSON
        document, as when decoded alone); a payload that is not a chunk is skipped."""
        if not lines:
            return
        try:
            chunks.extend(_chunk.decode_lines(b"\n".join(lines)))
        except msgspec.MsgspecError:  # one is not a chunk (relayed as sent): one by one
            for line in lines:
                with contextlib.suppress(msgspec.MsgspecError):
                    chunks.append(_chunk.decode(line))
        lines.clear()

    def _text_of(self, chunk: _Chunk) -> bool:
        """Add the chunk's text to the parts; whether it had any."""
        got_token = False
        parts = self.parts
        for choice in chunk.choices or ():
            if choice.finish_reason and not self._finish_reason:
                self._finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                parts.append(delta.content)
                got_token = True
            if delta.refusal:
                parts.append(delta.refusal)
                got_token = True
            for call in delta.tool_calls or ():
                fn = call.function
                if fn is not None:
                    if fn.name:
                        parts.append(fn.name)
                    if fn.arguments:
                        parts.append(fn.arguments)
                    got_token = True
                    if self.tool_calls is not None:
                        acc = self.tool_calls.setdefault((choice.index, call.index), [""])
                        if fn.name:
                            acc[0] = fn.name
                        if fn.arguments:
                            acc.append(fn.arguments)
        return got_token

    def _inspect(self, event: bytes) -> bool:
        """Read one event; False to drop it."""
        if self.cut:
            return False
        if event.startswith(b"data: ") and event.find(b"\n") < 0:
            payload = event[6:]  # the usual event, one data line: as _payload reads it
        else:
            payload = _payload(event) if event else b""
        if not payload:
            return True  # comments, keep-alives, blank lines: pass through
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
        if self.limit:  # the text now, to stop at the limit
            before = len(self.parts)
            got_token = self._text_of(chunk)
            if got_token and self._over(before):
                del self.parts[before:]
                self.cut = True
                return False
        elif self.sink is not None:
            got_token = self._text_of(chunk)
        elif self.first_token_at is None:
            got_token = any(_has_token(choice.delta) for choice in chunk.choices or ())
        if got_token and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if chunk.usage is not None:
            self.usage = chunk.usage
            # The usage-only chunk has no choices; others carry "usage": null.
            if not self.keep_usage and not chunk.choices:
                return False
        if self.sink is not None:
            self.sink.chunk(payload, chunk)
        return True

    def text(self) -> str:
        self._decode_held()
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


def _has_token(delta: _Delta | None) -> bool:
    if delta is None:
        return False
    if delta.content or delta.refusal:
        return True
    return any(call.function is not None for call in delta.tool_calls or ())


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
