"""The gateway's HTTP/1.1 server protocol: uvicorn's httptools one, with limits and deadlines.

On httptools, uvicorn bounds neither the size of a request head nor the time a client takes
to send it or its body; a connection that never sends a byte stays open for good, and nothing
caps how many are open. :func:`protocol_class` binds a ``[server]`` config to a subclass that
adds, per connection:

- the head: at most ``max_url_bytes`` of request target (else 414), ``max_headers`` fields
  and ``max_header_bytes`` for request line and headers together (else 431). Bytes are
  counted as they arrive, so a head that never ends is refused once past the limit, not
  buffered;
- ``header_timeout_s`` from the connection, or from the first byte of a later request, to
  the end of the head: 408, or a silent close when nothing came at all;
- ``body_timeout_s`` from the end of the head to the end of the body: 408;
- ``max_connections`` open at once: a request on a connection past the cap gets 503 with
  ``Retry-After``;
- ``keepalive_timeout_s`` is uvicorn's own idle timeout (:mod:`tollway.server` passes it).

A refusal is the OpenAI error envelope with ``connection: close``, one log line and a count
in ``tollway_rejections_total{reason}``. Malformed HTTP (uvicorn's plain-text 400) gets the
envelope too. The connection is then closed the lingering way: the reply goes out, the write
side is shut, and what the client still sends is read and dropped for a moment; closing with
unread input would reset the connection, and the client could lose the reply.

Only methods and attributes that uvicorn's protocol has kept since 0.30 (the lowest version
pyproject.toml allows) are overridden or read. The cost is a few attribute reads and calls
per request and one timer per connection: 2-5 us of server CPU per request more than
uvicorn's protocol (``benchmarks/protocol.py``, a trivial app; a gateway call costs
300-600 us).
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable
from itertools import chain
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tollway.config import ServerConfig
from tollway.context import CYCLE_KEY
from tollway.errors import (
    HeadersTooLarge,
    InvalidRequest,
    RequestTimeout,
    TollwayError,
    TooManyConnections,
    UrlTooLong,
    error_body,
)

log = logging.getLogger("tollway.http")

# How long a refused connection is still read (and dropped) after the reply, at most.
LINGER_S = 1.0
RETRY_AFTER_S = 1  # what a client refused for the connection cap is told to wait


def _ignore(reason: str) -> None:
    pass


class Gate:
    """What the connections of one server share: how many it admitted that are still open,
    and what counts a refusal."""

    __slots__ = ("on_refused", "open")

    def __init__(self, on_refused: Callable[[str], None] = _ignore) -> None:
        self.open = 0
        self.on_refused = on_refused


class GuardedHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[ServerConfig] = ServerConfig()
    gate: ClassVar[Gate] = Gate()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_body = False  # the head of the current request is complete, its body not
        self._head_bytes = 0  # received since the current head began (an upper bound)
        # The head deadline while reading a head, the body deadline while reading a body,
        # the lingering close once refused.
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._refused = False

    # ---- the connection ------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.gate.open < self.limits.max_connections:
            self.gate.open += 1
            self._admitted = True
        # uvicorn arms no timer here: a connection that never sends a byte would stay open.
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._admitted:
            self._admitted = False
            self.gate.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        if not self._in_body:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refused:
            return
        if self._in_body:
            if self._timer is None:
                self._timer = self.loop.call_later(self.limits.body_timeout_s, self._deadline)
        elif self._head_bytes:  # a head begun and not complete
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse_head_size()
            elif self._timer is None:
                self._timer = self.loop.call_later(self.limits.header_timeout_s, self._deadline)

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request (uvicorn has logged it)."""
        self._refuse("invalid_http", InvalidRequest(
            "malformed HTTP request: the request line, a header or the chunked body framing "
            "does not parse", code="invalid_http"), reading_body=self._in_body)

    # ---- parser callbacks ----------------------------------------------------
    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_body = True
        self._head_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        limits = self.limits
        headers = self.headers
        if len(self.url) > limits.max_url_bytes:
            self._refuse_url()
        elif len(headers) > limits.max_headers:
            self._refuse("too_many_headers", HeadersTooLarge(
                f"the request has {len(headers)} header fields; the limit is "
                f"{limits.max_headers}"))
        # Names, values and `: ` + CRLF each (the bytes counted as they arrived may have
        # missed the start of a head that came behind another request's body).
        elif (len(self.url) + sum(map(len, chain.from_iterable(headers))) + 4 * len(headers)
              > limits.max_header_bytes):
            self._refuse_head_size()
        elif not self._admitted:
            self._refuse("too_many_connections", TooManyConnections(
                f"the gateway has {limits.max_connections} connections open, its limit; "
                f"retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)}))
        else:
            super().on_headers_complete()
            # The request's response cycle, for the native stream relay (it writes a
            # handed-over stream's chunks to this cycle's socket itself).
            self.scope[CYCLE_KEY] = self.cycle  # type: ignore[literal-required]

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().on_message_complete()

    # ---- refusals ------------------------------------------------------------
    def _deadline(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        limits = self.limits
        if self._in_body:
            if self.pipeline:  # queued behind an earlier request: its body is not read yet
                self._timer = self.loop.call_later(limits.body_timeout_s, self._deadline)
                return
            if self.cycle.response_started:  # answered without the whole body: nothing to say
                self.transport.close()
                return
            self._refuse("body_timeout", RequestTimeout(
                f"the request body did not arrive within {limits.body_timeout_s:g} s"),
                reading_body=True)
        elif self._head_bytes:
            self._refuse("header_timeout", RequestTimeout(
                f"the request headers did not arrive within {limits.header_timeout_s:g} s"))
        else:  # a connection that has sent nothing since it opened
            log.info("closed a connection that sent nothing",
                     extra={"timeout_s": limits.header_timeout_s})
            self.transport.close()

    def _refuse_url(self) -> None:
        self._refuse("url_too_long", UrlTooLong(
            f"the request target is longer than {self.limits.max_url_bytes} bytes"))

    def _refuse_head_size(self) -> None:
        if len(self.url) > self.limits.max_url_bytes:
            self._refuse_url()
            return
        self._refuse("headers_too_large", HeadersTooLarge(
            f"the request line and headers are larger than {self.limits.max_header_bytes} "
            "bytes"))

    def _refuse(self, reason: str, exc: TollwayError, *, reading_body: bool = False) -> None:
        """Answer ``exc`` if the connection can still carry an answer, and close.

        ``reading_body``: the refused request is the one uvicorn's current cycle serves
        (else that cycle, if any, is an earlier request's)."""
        self._refused = True
        self._cancel_timer()
        status, body = error_body(exc)
        log.warning("request refused", extra={
            "status": status, "reason": reason, "client": self.client[0] if self.client else None})
        self.gate.on_refused(reason)
        cycle = self.cycle
        if reading_body:
            if cycle.response_started:  # the app has answered (or is answering) already
                self.transport.close()
                return
            cycle.disconnected = True  # the app reading the body sees a disconnect ...
            cycle.message_event.set()  # ... and what it sends from now on is dropped
        elif cycle is not None and not cycle.response_complete:
            self.transport.close()  # an earlier request's reply is under way
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode()),
                 b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
        lines.extend(b"%s: %s\r\n" % (k.lower().encode(), v.encode())
                     for k, v in (exc.headers or {}).items())
        lines += [b"\r\n", body]
        transport = self.transport
        transport.write(b"".join(lines))
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def protocol_class(server: ServerConfig,
                   on_refused: Callable[[str], None] | None = None) -> type[GuardedHttpProtocol]:
    """A protocol class for one server: its limits, and its own count of open connections."""

    class Bound(GuardedHttpProtocol):
        limits = server
        gate = Gate(on_refused or _ignore)

    return Bound
