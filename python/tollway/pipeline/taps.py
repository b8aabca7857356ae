"""What the relay needs of a stream tap, and the tap of the surfaces other than chat.

A tap sees every complete server-sent event of a provider's stream on its
way to the client (see :class:`tollway.pipeline.stream.SseTap`, the chat
completions one): it notes the first token, keeps the generated text (to
count it when no usage comes), takes the provider's usage, drops what the
caller did not ask for, and cuts the stream at the output the budget held.
:class:`EventTap` does the framing, the counting and the cut once; each
surface's subclass reads its own event shapes in :meth:`EventTap.read`.
"""

from __future__ import annotations

import abc
import time
from typing import Protocol

from tollway.errors import UpstreamError
from tollway.pipeline.usage import Usage, count_text

__all__ = ["MAX_EVENT_BYTES", "EventTap", "Tap"]

MAX_EVENT_BYTES = 1 << 20  # one event held until its end comes: ~250k tokens of text


class Tap(Protocol):
    @property
    def cut(self) -> bool:
        """An event went past the output limit: nothing more is relayed."""

    @property
    def done(self) -> bool:
        """The provider ended the stream as its protocol says."""

    @property
    def error(self) -> bool:
        """The provider sent an error event."""

    @property
    def usage(self) -> Usage | None:
        """The provider's usage, once it came."""

    @property
    def first_token_at(self) -> float | None:
        """When the first generated token came (perf_counter)."""

    def feed(self, data: bytes) -> bytes: ...

    def text(self) -> str: ...


class EventTap(abc.ABC):
    """Framing, counting and the output limit; :meth:`read` is the surface's."""

    __slots__ = ("_buf", "_counted", "_uncounted", "cut", "done", "error", "first_token_at",
                 "limit", "parts", "upstream", "usage")

    def __init__(self, limit: int = 0, upstream: str = "") -> None:
        self.limit = limit  # output tokens relayed at most (0: no limit)
        self.upstream = upstream
        self.cut = False
        self.done = False
        self.error = False
        self.usage: Usage | None = None
        self.first_token_at: float | None = None
        self.parts: list[str] = []
        self._buf = b""
        self._counted = 0
        self._uncounted = 0

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
        out: list[bytes] = []
        for event in buf[: end + 2].split(b"\n\n"):
            if not event or self.cut:
                continue
            name, payload = _fields(event)
            before = len(self.parts)
            forward = self.read(name, payload)
            if len(self.parts) > before:
                if self.limit and self._over(before):
                    del self.parts[before:]
                    self.cut = True
                    continue
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
            if forward is None:
                out.append(event + b"\n\n")
            elif forward:
                out.append(forward)
        return b"".join(out)

    @abc.abstractmethod
    def read(self, name: bytes, payload: bytes) -> bytes | None:
        """Read one event (its ``event:`` name and ``data:``), appending generated text to
        :attr:`parts`; None forwards the event as it came, bytes forward these instead
        (b"": drop it)."""

    def text(self) -> str:
        return "".join(self.parts)

    def _check_held(self) -> None:
        if len(self._buf) > MAX_EVENT_BYTES:
            raise UpstreamError("provider sent something other than an event stream "
                                f"(no event end in {MAX_EVENT_BYTES} bytes)")

    def _over(self, before: int) -> bool:
        # As SseTap: count the whole text only once its bytes could pass the limit.
        self._uncounted += 4 * sum(len(p) for p in self.parts[before:])
        if self._counted + self._uncounted <= self.limit:
            return False
        self._counted = count_text(self.text(), self.upstream)
        self._uncounted = 0
        return self._counted > self.limit


def _fields(event: bytes) -> tuple[bytes, bytes]:
    name = b""
    payload = b""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            piece = line[5:]
            if piece.startswith(b" "):
                piece = piece[1:]
            payload = payload + b"\n" + piece if payload else piece
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, payload
