"""The native relay: a chat completions stream handed to the Rust core after its first token.

Python relays a stream's head and events up to its first token (dispatch.py), as it
always does. Then, when it is safe and simple, the rest goes from the upstream's socket
to the client's with no Python per chunk: ``tollway._core.Relay`` (rust_core/src/relay.rs)
runs one thread with one epoll over every stream handed to it, decodes the upstream's
body framing, finds the events, ``[DONE]``, the usage chunk and error events in the
bytes, and writes each read's complete events to the client as one HTTP/1.1 chunk, as
uvicorn would have. When the stream ends it tells this loop (an eventfd), and the
dispatcher goes on exactly as after the Python relay: the tap holds what the stream
said (done, error, usage, the forwarded events for counting), the last message goes out
through uvicorn, the upstream connection is closed (never reused).

The hand-off happens only when all of these hold, else the Python relay goes on:
``[streams] native_relay`` is on; the tap is the chat completions one with no output
limit and no registry tool calls to collect; no responder keeps what goes out (the
response cache storing a stream); the upstream reply is on a plain-HTTP socket (not
TLS), its first bytes were kept (:data:`..raw.connection.RECORD_BYTES`), nothing is
paused, failed or ended; the client is on uvicorn's own cycle (the ASGI send is not
wrapped), chunked, with nothing left in the transport's write buffer and reading not
paused by uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from tollway._core import Relay
from tollway.errors import UpstreamError, UpstreamTimeout
from tollway.pipeline.stream import MAX_EVENT_BYTES, SseTap, _chunk
from tollway.pipeline.taps import Tap
from tollway.pipeline.upstream import HeldStream
from tollway.providers.http.raw.client import RawStream
from tollway.providers.http.raw.connection import BODY

log = logging.getLogger("tollway.pipeline")

ENDED, BROKEN, CLIENT_LEFT, TIMED_OUT, NOT_EVENTS = range(5)
NOT_YET = "not yet"  # take(): not now, maybe at the stream's next read
TRIES = 8  # reads a stream may wait for its hand-off before it stays in Python


class ClientLeft(Exception):
    """The client left while the native relay had the stream."""


def forget(up: HeldStream) -> None:
    """The stream stays in Python: its client need not keep its bytes."""
    reply = up.reply
    if type(reply) is RawStream:
        reply._conn.record = None


class NativeRelay:
    """The Rust relay serving one event loop, and the streams waiting on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.core = Relay()
        self.waiting: dict[int, asyncio.Future[tuple[Any, ...]]] = {}
        self.taken = 0  # streams handed over so far
        loop.add_reader(self.core.notify_fd, self._ended)

    def _ended(self) -> None:
        self._resolve(self.core.finished())

    def _resolve(self, outcomes: list[tuple[Any, ...]]) -> None:
        for outcome in outcomes:
            fut = self.waiting.pop(outcome[0], None)
            if fut is not None and not fut.done():
                fut.set_result(outcome)

    def close(self) -> None:
        """Stop the relay's thread; a stream it still had ends as if its client left
        (what was relayed is still counted and billed)."""
        with contextlib.suppress(Exception):  # the loop may be closed already
            self.loop.remove_reader(self.core.notify_fd)
        self._resolve(self.core.close())

    def take(self, relay_to: object, up: HeldStream, tap: Tap) -> Any | None:
        """Hand the stream over if it is safe: the handle to :meth:`wait` on, else None
        (never), or :data:`NOT_YET` (bytes still on their way to the client)."""
        if not isinstance(tap, SseTap) or type(tap) is not SseTap:
            return None  # another surface's tap (Messages, Responses) stays in Python
        if tap.limit or tap.done or tap.error or tap.cut:
            return None
        if tap.tool_calls is not None:
            return None  # registry tools' arguments are collected from the events it reads
        reply = up.reply
        if type(reply) is not RawStream:
            return None
        # uvicorn's RequestResponseCycle (httptools or h11 protocol): its attributes.
        cycle: Any = relay_to
        transport = getattr(cycle, "transport", None)
        flow = getattr(cycle, "flow", None)
        if (transport is None or flow is None or getattr(cycle, "chunked_encoding", None)
                is not True or cycle.response_complete or cycle.disconnected
                or transport.is_closing()):
            return None
        if flow.read_paused or flow.write_paused or transport.get_write_buffer_size():
            # Bytes still on their way to the client (uvloop before 0.21 writes at the end
            # of the loop's turn): the next read's turn may find them gone.
            return NOT_YET
        conn = reply._conn
        record = conn.record
        conn.record = None  # kept no longer, whatever happens here
        if (record is None or conn.state != BODY or conn.paused or conn.eof or conn.closed
                or conn.error is not None or conn.transport is None):
            return None
        up_transport = conn.transport
        if up_transport.get_extra_info("sslcontext") is not None:
            return None
        up_sock = up_transport.get_extra_info("socket")
        client_sock = transport.get_extra_info("socket")
        if up_sock is None or client_sock is None:
            return None
        deadline = reply._deadline
        loop = self.loop
        up_transport.pause_reading()
        transport.pause_reading()
        try:
            stream_id = self.core.start(
                up_sock.fileno(), client_sock.fileno(), b"".join(record), conn.buffered,
                tap._buf, tap.keep_usage, deadline.silence,
                max(0.001, deadline.total_at - loop.time()))
        except ValueError as exc:  # a framing it does not know: Python relays on
            log.debug("native relay refused a stream: %s", exc)
            up_transport.resume_reading()
            transport.resume_reading()
            return None
        # The relay has the stream's bytes from here: Python reads neither socket.
        conn.chunks.clear()
        conn.buffered = 0
        tap._buf = b""
        deadline.cancel()
        fut: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        self.waiting[stream_id] = fut
        self.taken += 1
        return (stream_id, fut, transport)

    async def wait(self, handle: Any, tap: Tap, provider: str) -> None:
        """Until the handed-over stream ends; its outcome is put in the tap. Raises
        ClientLeft, or UpstreamError when the provider broke it (before ``[DONE]``)."""
        assert isinstance(tap, SseTap)
        stream_id, fut, transport = handle
        try:
            outcome = await fut
        except BaseException:
            self.waiting.pop(stream_id, None)
            self.core.cancel(stream_id)  # from here the relay touches neither socket
            raise
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        _, end, done, error, usage, collected, message = outcome
        if collected:
            tap._hold(collected)
        if done:
            tap.done = True
        if error:
            tap.error = True
        if usage is not None:
            with contextlib.suppress(msgspec.MsgspecError):
                chunk = _chunk.decode(usage)
                if chunk.usage is not None:
                    tap.usage = chunk.usage
        if end == CLIENT_LEFT:
            raise ClientLeft
        if end == ENDED or done:
            return  # whole (or broken off after [DONE]: the client has it all)
        if end == TIMED_OUT:
            raise UpstreamTimeout(f"{provider}: upstream timed out")
        if end == NOT_EVENTS:
            raise UpstreamError("provider sent something other than an event stream "
                                f"(no event end in {MAX_EVENT_BYTES} bytes)")
        raise UpstreamError(f"{provider}: {message}")

