"""Publishing to JetStream on a raw asyncio NATS connection of the publisher's own.

Through nats-py each PubAck costs a pass through its read loop and parser, a
``Msg`` object with parsed headers, an asyncio queue and a subscription task
before the publisher's callback sees it: tens of microseconds per event, about
as much as building and encoding the event. :class:`PublishWire` speaks the
client protocol itself: one ``HPUB`` frame per event (``Nats-Msg-Id`` header,
reply subject ``<inbox>.<token>``), a whole batch written at once, and the acks
cut out of the received bytes in the protocol callback, one anchored regex
match per ``MSG`` frame, with no task in between. Anything else the server
sends (PING, INFO, ``-ERR``, no-responders status replies) goes through a
generic frame parser.

Scope as :mod:`tollway.events.nats.bulk`: plain TCP, anonymous or the static
user/password or token of the nats-py connection (:meth:`Endpoint.of_client`);
otherwise :class:`BulkUnavailable` tells the publisher to stay on nats-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Sequence
from typing import Any, cast

import msgspec

from tollway.events.nats.bulk import (
    MAX_CONTROL_LINE,
    BulkError,
    BulkUnavailable,
    Endpoint,
    cut_message,
)
from tollway.events.outbox import OutboxEntry

# One result per published entry. RETRY and NO_ACK (and anything above) mean "send it again".
OK, DUP, FATAL, RETRY, NO_ACK = 0, 1, 2, 3, 4

_SID = b"1"  # the one subscription: <inbox>.* for the acks
# "NATS/1.0\r\n" + "Nats-Msg-Id: " + id + "\r\n\r\n"
HEADER_OVERHEAD = 27


def classify(payload: bytes) -> int:
    """A JetStream PubAck (or API error) payload as OK, DUP, RETRY or FATAL."""
    if b'"error"' in payload:
        # 5xx-ish (stream offline, leader election) is worth retrying; 4xx is about the
        # message itself and would fail forever.
        return RETRY if b'"code":503' in payload or b'"code":500' in payload else FATAL
    if not payload:
        return RETRY
    return DUP if _is_duplicate(payload) else OK


def _is_duplicate(payload: bytes) -> bool:
    # nats-server writes `"duplicate": true` (with a space; omitted when false); any JSON
    # encoder might leave the space out.
    return b'"duplicate": true' in payload or b'"duplicate":true' in payload


class PublishWire(asyncio.Protocol):
    """One raw NATS connection that publishes batches and collects their acks.

    One batch at a time: :meth:`publish` writes it and waits for its acks. Acks that
    come after the batch was given up on are ignored (their entries were resent, and
    ``Nats-Msg-Id`` makes the stream drop the second copy).
    """

    def __init__(self, name: str = "tollway publisher") -> None:
        self.name = name
        self.server_info: dict[str, Any] = {}
        self.max_payload = 1 << 20
        self.lost: BaseException | None = None
        self.no_responders = 0  # 503 status replies: no stream listens on the subject
        self.errors: list[str] = []  # -ERR lines from the server, for the caller to log
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox = b"_INBOX." + os.urandom(11).hex().encode()
        self._reply = self._inbox + b"."
        # One anchored match per ack frame: a regex run over whole batches of acks (the JSON
        # matched too) measured slower than this short pattern plus a slice.
        self._ack = re.compile(rb"MSG " + re.escape(self._reply) + rb"(\d+) " + _SID
                               + rb" (\d+)\r\n").match
        self._rest = b""
        self._next_token = 1
        # The batch in flight: entry i was published with reply token base + i.
        self._base = 0
        self._results: list[int] = []
        self._outstanding = 0
        self._waiter: asyncio.Future[None] | None = None
        # One timer for all batches, re-armed when it fires early, instead of one per batch
        # (a timer handle per batch is a measurable share of what a small batch costs).
        self._deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._creds: Endpoint | None = None

    # ---- connection --------------------------------------------------------------------------
    @classmethod
    async def open(cls, endpoint: Endpoint, *, name: str = "tollway publisher",
                   timeout: float = 2.0) -> PublishWire:
        """A connected wire, subscribed to its ack inbox.

        Raises BulkUnavailable when this server or these credentials cannot be spoken to
        this way (TLS, no headers, refused credentials), BulkError when it is unreachable.
        """
        wire = cls(name)
        wire._creds = endpoint
        loop = asyncio.get_running_loop()
        ep = endpoint
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: wire, ep.host, ep.port)
                await wire._ready
        except TimeoutError:
            await wire.close()
            raise BulkError(f"no answer from nats://{ep.host}:{ep.port} in "
                            f"{timeout:.1f}s") from None
        except OSError as exc:
            await wire.close()
            raise BulkError(f"cannot connect to nats://{ep.host}:{ep.port}: {exc}") from exc
        except BaseException:
            await wire.close()
            raise
        finally:
            wire._creds = None  # not kept around once used
        return wire

    @classmethod
    async def open_any(cls, endpoints: Sequence[Endpoint], *, name: str = "tollway publisher",
                       timeout: float = 2.0) -> PublishWire:
        """:meth:`open` on each of ``endpoints`` in turn (the nodes of a cluster) until one
        answers; the last BulkError when none does."""
        for i, ep in enumerate(endpoints):
            try:
                return await cls.open(ep, name=name, timeout=timeout)
            except BulkUnavailable:
                raise
            except BulkError:
                if i == len(endpoints) - 1:
                    raise
        raise BulkError("no server to connect to")

    @property
    def closed(self) -> bool:
        t = self._transport
        return self.lost is not None or t is None or t.is_closing()

    async def close(self, timeout: float = 1.0) -> None:
        """Close the connection and wait until its socket is released."""
        t = self._transport
        if t is None:
            return
        if not t.is_closing():
            t.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._closed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's TCPTransport does not derive from asyncio's.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self._ready.done():
            self._ready.set_exception(BulkError(f"connection lost: {self.lost}"))
            self._ready.exception()  # retrieved: the opener may have given up already
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)

    def _handshake(self, info: bytes) -> None:
        try:
            self.server_info = msgspec.json.decode(info)
        except msgspec.DecodeError:
            raise BulkError(f"not a NATS server: INFO {info[:80]!r}") from None
        if self.server_info.get("tls_required"):
            raise BulkUnavailable("the server requires TLS")
        if not self.server_info.get("headers"):
            raise BulkUnavailable("the server does not support headers")
        self.max_payload = int(self.server_info.get("max_payload", self.max_payload))
        opts: dict[str, Any] = {
            "verbose": False, "pedantic": False, "lang": "python",
            "version": "tollway-wire", "protocol": 1, "headers": True,
            "no_responders": True, "echo": False, "name": self.name,
        }
        ep = self._creds
        if ep is not None and ep.user is not None:
            opts["user"], opts["pass"] = ep.user, ep.password or ""
        elif ep is not None and ep.token is not None:
            opts["auth_token"] = ep.token
        self._write(b"CONNECT " + msgspec.json.encode(opts) + b"\r\nSUB " + self._reply
                    + b"* " + _SID + b"\r\nPING\r\n")

    def _fail(self, exc: BaseException) -> None:
        """Give up on the connection (protocol error, refused handshake)."""
        if not self._ready.done():
            self._ready.set_exception(exc)
            self._ready.exception()
        if self.lost is None:
            self.lost = exc
        t = self._transport
        if t is not None:
            t.abort()
        self._wake()

    def _write(self, data: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing():
            raise BulkError("connection closed")
        t.write(data)

    # ---- publishing --------------------------------------------------------------------------
    async def publish(self, entries: Sequence[OutboxEntry], timeout: float) -> list[int]:
        """Publish ``entries`` pipelined and wait (up to ``timeout``) for their acks.

        One result per entry; NO_ACK for those without an ack when the connection was lost
        or the time ran out. Entries larger than the server takes are FATAL, unsent (the
        server would close the connection over them).
        """
        n = len(entries)
        results = [NO_ACK] * n
        if self.closed or self._waiter is not None:
            return results
        base = self._next_token
        self._next_token = base + n
        reply, limit = self._reply, self.max_payload
        frames = []
        outstanding = n
        for i, (subject, event_id, payload) in enumerate(entries):
            eid = event_id.encode()
            hlen = HEADER_OVERHEAD + len(eid)
            total = hlen + len(payload)
            if total > limit:
                results[i] = FATAL
                outstanding -= 1
                continue
            frames.append(b"HPUB %s %s%d %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n%s\r\n"
                          % (subject.encode(), reply, base + i, hlen, total, eid, payload))
        if not outstanding:
            return results
        self._base, self._results, self._outstanding = base, results, outstanding
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._deadline = loop.time() + timeout
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadline, self._check_deadline)
        try:
            self._write(b"".join(frames))
            await waiter
        except BulkError:
            pass  # what has no ack says so
        finally:
            self._waiter = None
            self._results = []  # late acks find nothing to settle
            self._outstanding = 0
        return results

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self._waiter is None or self.lost is not None:
            return  # idle: re-armed by the next batch
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._wake()  # the batch in flight ran out of time
        else:
            self._watchdog = loop.call_at(self._deadline, self._check_deadline)

    # ---- receiving ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._rest:
            data = self._rest + data
            self._rest = b""
        try:
            pos = self._parse(data)
        except BulkError as exc:
            self._fail(exc)
            return
        if pos < len(data):
            if len(data) - pos > MAX_CONTROL_LINE and data.find(b"\r\n", pos) < 0:
                self._fail(BulkError("protocol error: control line too long"))
                return
            self._rest = data[pos:]
        if self._outstanding <= 0:
            self._wake()

    def _parse(self, data: bytes) -> int:
        """Consume the complete frames of ``data``; the position of the first incomplete one."""
        match = self._ack
        results, base = self._results, self._base
        count = len(results)
        n = len(data)
        pos = 0
        settled = 0
        while pos < n:
            m = match(data, pos)
            if m is None:
                nxt = self._frame(data, pos)
                if nxt < 0:
                    break
                pos = nxt
                continue
            st = m.end()
            end = st + int(m[2])
            if end + 2 > n:
                break
            i = int(m[1]) - base
            if 0 <= i < count and results[i] == NO_ACK:
                p = data[st:end]
                if b'"error"' in p or not p:
                    results[i] = classify(p)
                else:
                    results[i] = DUP if b'"duplicate"' in p and _is_duplicate(p) else OK
                settled += 1
            pos = end + 2
        if settled:
            self._outstanding -= settled
        return pos

    def _frame(self, data: bytes, pos: int) -> int:
        """Handle the one frame at ``pos``; the position after it, or -1 if incomplete."""
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return -1
        op, _, args = data[pos:eol].partition(b" ")
        op = op.upper()
        if op == b"MSG" or op == b"HMSG":
            msg = cut_message(data, pos, eol, op, args)
            if msg is None:
                return -1
            end, (subject, _sid, _reply, hdr, body) = msg
            self._reply_frame(subject, hdr, body)
            return end
        if op == b"PING":
            self._write(b"PONG\r\n")
        elif op == b"PONG":
            if not self._ready.done():
                self._ready.set_result(None)
        elif op == b"INFO":
            if not self.server_info:
                self._handshake(args)
        elif op == b"-ERR":
            text = args.decode(errors="replace").strip().strip("'")
            if not self._ready.done():
                refused = "authorization" in text.lower() or "authentication" in text.lower()
                raise (BulkUnavailable if refused else BulkError)(f"server refused: {text}")
            if len(self.errors) < 16:  # the caller drains them after each batch
                self.errors.append(text)  # a fatal one is followed by the server closing
        elif op != b"+OK":
            raise BulkError(f"protocol error: {data[pos:eol][:120]!r}")
        return eol + 2

    def _reply_frame(self, subject: bytes, hdr: bytes, body: bytes) -> None:
        """An ack in a form the fast path does not match (headers, a status reply)."""
        if not subject.startswith(self._reply):
            return
        try:
            i = int(subject[len(self._reply):]) - self._base
        except ValueError:
            return
        results = self._results
        if not 0 <= i < len(results) or results[i] != NO_ACK:
            return
        if hdr.startswith(b"NATS/1.0 503"):
            self.no_responders += 1
            results[i] = RETRY
        elif hdr[8:9] == b" " and not body:  # another status reply (timeout, ...)
            results[i] = RETRY
        else:
            results[i] = classify(body)
        self._outstanding -= 1


__all__ = ["DUP", "FATAL", "NO_ACK", "OK", "RETRY", "BulkError", "BulkUnavailable",
           "PublishWire", "classify"]
