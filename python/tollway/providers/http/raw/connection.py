"""One HTTP/1.1 connection as a state machine: it always knows which reply is whose.

httptools (llhttp) parses the bytes; this class decides what they mean::

    IDLE --request written--> WAITING --final status line--> BODY --end--> DONE
      ^                        |  (1xx interim replies are skipped here)       |
      +-------------------- reset for the next request <----- reusable? ------+

Anything that does not fit the state ends the connection (``BROKEN``), and a
broken connection is never handed out again: a byte or an EOF while IDLE (a
``408`` written on an idle connection, a server closing it), bytes after a
complete message, a parser error, a reset. The body of a reply with neither a
length nor chunked framing ends only on a clean EOF (``eof_received``); a
reset part-way through it is an error, never a complete reply.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol, cast

import httptools

from tollway.errors import UpstreamConnectFailed, UpstreamError

IDLE, WAITING, BODY, DONE, BROKEN = range(5)

PAUSE_AT = 1 << 20  # a stream's buffered bytes before reading from the socket pauses
# A streamed reply's first bytes as read (head included) are kept, up to this many, so
# that the native relay can take the stream over knowing its body framing's state.
RECORD_BYTES = 32 << 10


class Owner(Protocol):
    """What a connection needs of its pool (the client)."""

    name: str  # the provider's, for error messages
    max_reply_bytes: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class Connection(asyncio.Protocol):
    """One connection; carries one request at a time."""

    def __init__(self, client: Owner, origin: tuple[str, int, bool]) -> None:
        self.client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = IDLE
        self.closed = False
        self.idle_until = 0.0  # the loop time after which an idle connection is not reused
        self.server_idle_s: float | None = None  # from the server's Keep-Alive: timeout=
        self.waiter: asyncio.Future[None] | None = None
        self.begin(streaming=False)
        self.state = IDLE

    def begin(self, streaming: bool) -> None:
        """A request is about to be written on this connection."""
        self.state = WAITING
        self.streaming = streaming
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.got_bytes = False
        self.keep_alive = False
        self.until_eof = False
        self.eof = False
        self.error: UpstreamError | None = None
        self.paused = False
        self.out_of_step = False
        self.last_activity = 0.0
        # Every byte read for this reply so far, while a stream may still be handed over.
        self.record: list[bytes] | None = [] if streaming else None
        self.recorded = 0

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state not in (WAITING, BODY):
            # A 408 on an idle connection, or anything after a complete reply: this
            # connection is out of step with its requests, so it is never used again.
            self.break_off()
            return
        self.got_bytes = True
        self.last_activity = self.client.loop.time()
        record = self.record
        if record is not None:
            self.recorded += len(data)
            if self.recorded > RECORD_BYTES:
                self.record = None
            else:
                record.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError(f"{self.client.name}: unexpected protocol upgrade"))
        except httptools.HttpParserError:
            if self.state == DONE:
                self.break_off()  # garbage after a complete reply: the reply stands
            else:
                self.fail(UpstreamError(f"{self.client.name}: malformed upstream reply"))
        if self.out_of_step:
            self.break_off()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.state == IDLE:
            self.state = BROKEN
        elif self.state == BODY and self.until_eof:
            self.state = DONE  # the server's clean close is this body's end (RFC 9112 6.3)
            self.keep_alive = False
            self.wake()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self.state
        if state in (WAITING, BODY):
            name = self.client.name
            self.error = (UpstreamError(f"{name}: upstream reply broken off")
                          if self.got_bytes else
                          UpstreamConnectFailed(f"{name}: upstream closed the connection "
                                                "before replying"))
            self.state = BROKEN
        elif state == IDLE:
            self.state = BROKEN
        self.wake()

    # ---- httptools callbacks (called only from feed_data)
    def on_message_begin(self) -> None:
        if self.state == DONE:
            self.out_of_step = True  # a second reply to one request

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state != WAITING:
            return  # trailers (after a chunked body) never overwrite the headers
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        if self.state != WAITING:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # 1xx interim (100 Continue, 103 Early Hints): the final reply is still to
            # come. A 101 is refused by the parser right after this (HttpParserUpgrade).
            self.headers = {}
            return
        self.status = status
        # Only meaningful inside the parser's callbacks, so read it here.
        self.keep_alive = self.parser.should_keep_alive()
        headers = self.headers
        self.until_eof = ("content-length" not in headers
                          and "chunked" not in headers.get("transfer-encoding", "").lower()
                          and status not in (204, 304))
        alive = headers.get("keep-alive")
        if alive is not None:
            self.server_idle_s = _timeout_of(alive)
        self.state = BODY
        self.wake()

    def on_body(self, body: bytes) -> None:
        if self.state != BODY:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_AT:
            if self.streaming:
                if not self.paused and self.transport is not None:
                    self.paused = True
                    self.transport.pause_reading()
            elif self.buffered > self.client.max_reply_bytes:
                self.fail(UpstreamError(f"{self.client.name}: upstream reply larger than "
                                        f"{self.client.max_reply_bytes >> 20} MiB"))
                return
        if self.streaming:
            self.wake()

    def on_message_complete(self) -> None:
        if self.state == BODY:
            self.state = DONE
            self.wake()
        # In WAITING this ends a 1xx interim reply: keep waiting for the final one.

    # ----
    def reusable(self) -> bool:
        return self.state == DONE and self.keep_alive and not self.closed and not self.eof

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: UpstreamError) -> None:
        if self.error is None and self.state != DONE:
            self.error = error
        self.break_off()
        self.wake()

    def break_off(self) -> None:
        """Never use this connection again; a reply already complete stands."""
        if self.state != DONE:
            self.state = BROKEN
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def wait(self) -> None:
        """Until something new happened (headers, body, completion, error)."""
        if self.error is not None:
            raise self.error
        if self.state == BROKEN:
            raise UpstreamError(f"{self.client.name}: upstream connection lost")
        self.waiter = self.client.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data


def _timeout_of(keep_alive: str) -> float | None:
    """``timeout=5, max=100`` -> 5.0 (RFC 2068 19.7.1.1, still sent by many servers)."""
    for part in keep_alive.split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "timeout":
            try:
                return max(0.0, float(value.strip()))
            except ValueError:
                return None
    return None
