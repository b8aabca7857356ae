"""Reading a JetStream stream in bulk: the NATS client protocol on a raw asyncio connection.

A replay folds every message of the stream. Through nats-py each delivered
message costs tens of microseconds of Python before the fold sees it (its
protocol parser, a ``Msg`` object, JetStream metadata, a callback per
message), which held an end-to-end replay to about a fifth of what decode +
fold can do. :class:`BulkReader` reads a range of a stream on a connection of
its own: it creates an ephemeral push consumer (no acks, flow control, idle
heartbeats), cuts the deliveries out of the received bytes in Rust
(``tollway._core.scan_js_deliveries``, a scan of each control line; the
generic frame parser here handles everything else: flow control, heartbeats,
API replies, PING) and hands out batches of stream sequences and payloads.
With ``follow=True`` it does not stop at the end of the stream but keeps
handing out what is published after: the projection runner's live tail,
where it takes the place of a nats-py subscription for the same reason
(folding its own events was a sixth of a busy gateway's time).

Scope: plain TCP to a server with header support, anonymous or with the
user/password or token of the nats-py connection (``nats://user:pass@host``,
``nats://token@host``, the forms ``broker.connect`` passes on). TLS, nkeys,
JWTs and websockets raise :class:`BulkUnavailable`: callers fall back to
nats-py. One reader serves one task at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from bisect import bisect_right
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, cast
from urllib.parse import urlparse

import msgspec
from nats.aio.client import Client as NatsClient

from tollway._core import scan_js_deliveries
from tollway.events.schema import STREAM

API = "$JS.API"
MAX_CONTROL_LINE = 64 * 1024  # a longer line without CRLF is a broken stream, not a slow one


class BulkError(RuntimeError):
    """The bulk read failed (protocol or server error, connection lost, stalled)."""


class BulkUnavailable(BulkError):
    """This server or connection cannot be read in bulk (TLS, nkeys, no headers); use nats-py."""


class Batch(NamedTuple):
    seqs: list[int]  # stream sequences, ascending
    payloads: list[bytes]


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int = 4222
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """``nats://[user[:password]@|token@]host[:port]`` (a bare ``host:port`` too)."""
        if "://" not in url:
            url = "nats://" + url
        u = urlparse(url)
        if u.scheme != "nats":
            raise BulkUnavailable(f"bulk reads speak plain nats://, not {u.scheme}://")
        return cls._of(u.hostname, u.port, u.username, u.password)

    @classmethod
    def of_client(cls, nc: NatsClient) -> Endpoint:
        """Where and as whom a connected nats-py client is, authenticated as nats-py does it."""
        u = nc.connected_url
        if u is None:
            raise BulkError("the NATS client is not connected")
        if u.scheme != "nats" or nc.options.get("tls") is not None:
            raise BulkUnavailable(f"bulk reads speak plain nats://, not {u.scheme}:// or TLS")
        if any(getattr(nc, a, None) is not None
               for a in ("_signature_cb", "_user_jwt_cb", "_public_nkey")):
            raise BulkUnavailable("bulk reads do not do nkey or JWT authentication")
        opts = nc.options
        user, password, token = opts.get("user"), opts.get("password"), opts.get("token")
        if callable(user) or callable(password) or callable(token):
            raise BulkUnavailable("bulk reads take only static credentials")
        if user is not None and password is not None:
            return cls._of(u.hostname, u.port, str(user), str(password))
        if token is not None:
            return cls(host=u.hostname or "127.0.0.1", port=u.port or 4222, token=str(token))
        return cls._of(u.hostname, u.port, u.username, u.password)

    @classmethod
    def all_of_client(cls, nc: NatsClient) -> list[Endpoint]:
        """The server a nats-py client is connected to, then the other servers of its pool
        (the configured URLs and those the cluster announced), with the same credentials
        unless a URL carries its own: what a raw connection tries in turn."""
        first = cls.of_client(nc)
        out = [first]
        for u in nc.servers:
            if u.scheme != "nats":
                continue
            if u.username is not None:
                ep = cls._of(u.hostname, u.port, u.username, u.password)
            else:
                ep = replace(first, host=u.hostname or "127.0.0.1",
                                         port=u.port or 4222)
            if all((ep.host, ep.port) != (o.host, o.port) for o in out):
                out.append(ep)
        return out

    @classmethod
    def _of(cls, host: str | None, port: int | None, user: str | None,
            password: str | None) -> Endpoint:
        # As nats-py: a user name without a password in the URL is a token.
        if user is not None and password is None:
            return cls(host=host or "127.0.0.1", port=port or 4222, token=user)
        return cls(host=host or "127.0.0.1", port=port or 4222, user=user, password=password)


class _Conn(asyncio.Protocol):
    """Received bytes as a list of chunks, and a future to wait on for more."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.lost: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        if self.chunks or self.lost is not None:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


def cut_message(data: bytes, pos: int, eol: int, op: bytes, args: bytes
                ) -> tuple[int, tuple[bytes, bytes, bytes, bytes, bytes]] | None:
    """A ``MSG``/``HMSG`` frame whose control line ends at ``eol``: (position after it,
    (subject, sid, reply, header, payload)), or None while it is incomplete."""
    parts = args.split()
    try:
        if op == b"HMSG":
            if len(parts) not in (4, 5):
                raise ValueError
            reply = parts[2] if len(parts) == 5 else b""
            hlen, tlen = int(parts[-2]), int(parts[-1])
        else:
            if len(parts) not in (3, 4):
                raise ValueError
            reply = parts[2] if len(parts) == 4 else b""
            hlen, tlen = 0, int(parts[-1])
    except ValueError:
        raise BulkError(f"protocol error: {data[pos:eol][:120]!r}") from None
    start = eol + 2
    end = start + tlen
    if end + 2 > len(data):
        return None
    return end + 2, (parts[0], parts[1], reply, data[start:start + hlen], data[start + hlen:end])


_json = msgspec.json.Decoder()


class BulkReader:
    """One raw NATS connection that reads stream ranges fast. ``async with`` closes it."""

    def __init__(self, endpoint: Endpoint, *, name: str = "tollway bulk reader",
                 timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout  # connect, API requests, and the longest silence while reading
        self.server_info: dict[str, Any] = {}
        self._conn = _Conn()
        self._buf = b""
        self._pos = 0
        self._inbox = f"_INBOX.{os.urandom(8).hex()}"
        self._inbox_sid = b"1"
        self._next_sid = 2
        self._next_token = 0
        self._requests: dict[bytes, asyncio.Future[tuple[bytes, bytes]]] = {}
        self._pongs = 0
        self.flow_controls = 0  # flow control requests answered (tests)
        # The read in progress.
        self._deliver_sid = b""
        self._seqs: list[int] = []
        self._payloads: list[bytes] = []
        self._delivered = 0  # consumer sequence of the last delivery parsed
        self._pending = -1  # the server's count of messages after it
        self._idle = False  # an idle heartbeat came: the consumer had nothing left to send
        self.consumer = ""  # name of the consumer of the read in progress, once created

    # ---- connection --------------------------------------------------------------------------
    @classmethod
    async def connect(cls, target: NatsClient | str | Endpoint, *,
                      name: str = "tollway bulk reader", timeout: float = 5.0) -> BulkReader:
        """A reader connected to ``target``: the server a nats-py client is connected to (with
        its credentials), a ``nats://`` URL, or an :class:`Endpoint`."""
        if isinstance(target, Endpoint):
            eps = [target]
        elif isinstance(target, str):
            eps = [Endpoint.from_url(target)]
        else:
            # A cluster: the client's server first, then the others in turn (the one it was
            # on may have just died, before the client noticed).
            eps = Endpoint.all_of_client(target)
        for i, ep in enumerate(eps):
            reader = cls(ep, name=name, timeout=timeout)
            try:
                await reader._open()
            except BulkError:
                await reader.close()
                if i == len(eps) - 1:
                    raise
                continue
            except BaseException:
                await reader.close()
                raise
            return reader
        raise BulkError("no server to connect to")  # not reached: eps is never empty

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            async with asyncio.timeout(self.timeout):
                await loop.create_connection(lambda: self._conn, ep.host, ep.port)
                while (eol := self._buf.find(b"\r\n")) < 0:
                    await self._fill()
                line, self._buf = self._buf[:eol], self._buf[eol + 2:]
                if not line.startswith(b"INFO "):
                    raise BulkError(f"not a NATS server: {line[:80]!r}")
                self.server_info = _json.decode(line[5:])
                if self.server_info.get("tls_required"):
                    raise BulkUnavailable("the server requires TLS")
                if not self.server_info.get("headers"):
                    raise BulkUnavailable("the server does not support headers")
                opts: dict[str, Any] = {
                    "verbose": False, "pedantic": False, "lang": "python",
                    "version": "tollway-bulk", "protocol": 1, "headers": True,
                    "no_responders": True, "echo": False, "name": self.name,
                }
                if ep.user is not None:
                    opts["user"], opts["pass"] = ep.user, ep.password or ""
                elif ep.token is not None:
                    opts["auth_token"] = ep.token
                self._write(b"CONNECT " + msgspec.json.encode(opts) + b"\r\nPING\r\nSUB "
                            + self._inbox.encode() + b".* " + self._inbox_sid + b"\r\n")
                while self._pongs == 0:
                    await self._fill()
                    self._parse(1 << 30)
        except TimeoutError:
            raise BulkError(f"no answer from nats://{ep.host}:{ep.port} in "
                            f"{self.timeout:.0f}s") from None
        except OSError as exc:
            raise BulkError(f"cannot connect to nats://{ep.host}:{ep.port}: {exc}") from exc

    async def close(self) -> None:
        t = self._conn.transport
        if t is not None and not t.is_closing():
            t.close()  # flushes what is written first (a consumer delete, say)

    async def __aenter__(self) -> BulkReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _write(self, data: bytes) -> None:
        t = self._conn.transport
        if t is None or t.is_closing():
            raise BulkError("connection closed")
        t.write(data)

    async def _fill(self) -> None:
        """Wait for more bytes and append them to the unparsed buffer."""
        conn = self._conn
        await conn.wait()
        if conn.chunks:
            rest = self._buf[self._pos:] if self._pos else self._buf
            self._buf = rest + b"".join(conn.chunks) if rest else b"".join(conn.chunks)
            self._pos = 0
            conn.chunks.clear()
        elif conn.lost is not None:
            raise BulkError(f"connection lost: {conn.lost}")

    # ---- JetStream API -----------------------------------------------------------------------
    async def request(self, subject: str, payload: bytes = b"") -> Any:
        """A JetStream API call: the decoded JSON reply (raises BulkError on an API error)."""
        self._next_token += 1
        token = str(self._next_token).encode()
        fut: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._requests[token] = fut
        self._write(b"PUB %s %s.%s %d\r\n%s\r\n" % (subject.encode(), self._inbox.encode(),
                                                   token, len(payload), payload))
        try:
            async with asyncio.timeout(self.timeout):
                while not fut.done():
                    self._parse(1 << 30)
                    if not fut.done():
                        await self._fill()
        except TimeoutError:
            raise BulkError(f"no reply to {subject} in {self.timeout:.0f}s") from None
        finally:
            self._requests.pop(token, None)
        hdr, body = fut.result()
        if hdr.startswith(b"NATS/1.0 503"):
            raise BulkUnavailable("JetStream is not enabled on this server (no responders)")
        reply = _json.decode(body) if body else {}
        if isinstance(reply, dict) and reply.get("error"):
            err = reply["error"]
            raise BulkError(f"{subject}: {err.get('description', err)} "
                            f"(code {err.get('err_code', err.get('code'))})")
        return reply

    async def stream_info(self, stream: str = STREAM) -> dict[str, Any]:
        info: dict[str, Any] = await self.request(f"{API}.STREAM.INFO.{stream}")
        return info

    # ---- reading -----------------------------------------------------------------------------
    async def read(
        self,
        stream: str = STREAM,
        *,
        start_seq: int = 1,
        stop_seq: int | None = None,
        filter_subject: str | None = None,
        # Small enough that a flow-control request waits for at most one batch's fold
        # while the server holds back (1 MB batches left the reader idle a third of a
        # replay), large enough to fold in tight loops: ~130k events/s against ~90k.
        batch_bytes: int = 1 << 18,
        idle_heartbeat_s: float = 1.0,
        follow: bool = False,
    ) -> AsyncGenerator[Batch, None]:
        """Every message of ``stream`` with ``start_seq <= seq <= stop_seq``, in order, in
        batches of about ``batch_bytes`` of frames.

        ``stop_seq`` defaults to the stream's last sequence when the read starts, so the read
        ends even while the stream grows. Deleted messages are simply absent; a read past the
        last stored message ends when the server reports nothing pending. Wrap the iterator in
        ``contextlib.aclosing`` when leaving it early: closing deletes the consumer.

        ``follow=True`` reads on past the end, for ever: each batch is what arrived, handed
        out as soon as it did. It raises :class:`BulkError` when the consumer goes silent
        (no idle heartbeat for a while: the server lost it) or a delivery is missing; start
        again from the last sequence seen. :attr:`pending` is the server's count of messages
        not yet delivered.
        """
        if follow:
            stop_seq = 1 << 63
        elif stop_seq is None:
            stop_seq = int((await self.stream_info(stream))["state"]["last_seq"])
        start_seq = max(1, start_seq)
        if stop_seq < start_seq:
            return
        sid = str(self._next_sid).encode()
        self._next_sid += 1
        deliver = f"{self._inbox}.d.{sid.decode()}"  # not under the replies' wildcard
        self._write(b"SUB %s %s\r\n" % (deliver.encode(), sid))
        self._deliver_sid = sid
        self._seqs, self._payloads = [], []
        self._delivered, self._pending, self._idle = 0, -1, False
        config: dict[str, Any] = {
            "deliver_policy": "by_start_sequence", "opt_start_seq": start_seq,
            "ack_policy": "none", "max_deliver": 1, "replay_policy": "instant",
            "deliver_subject": deliver, "flow_control": True,
            "idle_heartbeat": int(idle_heartbeat_s * 1e9),
            "mem_storage": True, "num_replicas": 1,
            # Removed by the server soon after this connection goes away, however it goes.
            "inactive_threshold": int(max(5.0, 5 * idle_heartbeat_s) * 1e9),
        }
        if filter_subject:
            config["filter_subject"] = filter_subject
        name = ""
        silence = max(self.timeout, 5 * idle_heartbeat_s)
        try:
            created = await self.request(
                f"{API}.CONSUMER.CREATE.{stream}",
                msgspec.json.encode({"stream_name": stream, "config": config}))
            name = self.consumer = str(created["name"])
            if self._pending < 0:
                self._pending = int(created.get("num_pending", 0))
            done = not follow and int(created.get("num_pending", 0)) == 0 and not self._seqs
            more = True  # complete frames may be left in the buffer
            while not done:
                if not more and not self._seqs:
                    try:
                        async with asyncio.timeout(silence):
                            await self._fill()
                    except TimeoutError:
                        raise BulkError(f"consumer {name} on {stream} silent for "
                                        f"{silence:.0f}s") from None
                else:
                    await asyncio.sleep(0)  # between batches, let other tasks run
                more = self._parse(batch_bytes)
                seqs, payloads = self._seqs, self._payloads
                self._seqs, self._payloads = [], []
                if seqs:
                    if seqs[-1] >= stop_seq:
                        if seqs[-1] > stop_seq:
                            cut = bisect_right(seqs, stop_seq)
                            seqs, payloads = seqs[:cut], payloads[:cut]
                        done = True
                    elif (self._pending == 0 and self._pos >= len(self._buf)
                          and not follow):
                        done = await self._nothing_left(stream, name)
                    if seqs:
                        yield Batch(seqs, payloads)
                elif self._idle:
                    self._idle = False
                    if not follow:
                        done = await self._nothing_left(stream, name)
        finally:
            self._deliver_sid = b""
            self.consumer = ""
            with contextlib.suppress(BulkError):
                self._write(b"UNSUB %s\r\n" % sid)
                if name:  # fire and forget: the reply lands on the inbox and is dropped
                    self._write(b"PUB %s.CONSUMER.DELETE.%s.%s %s.x 0\r\n\r\n" % (
                        API.encode(), stream.encode(), name.encode(), self._inbox.encode()))

    @property
    def pending(self) -> int:
        """Messages the consumer of the read in progress has not delivered yet (-1: unknown)."""
        return self._pending

    async def _nothing_left(self, stream: str, name: str) -> bool:
        """Whether the consumer has delivered everything (asked, rather than trusting a hint)."""
        info = await self.request(f"{API}.CONSUMER.INFO.{stream}.{name}")
        return int(info.get("num_pending", 0)) == 0 and not self._seqs

    # ---- parsing -----------------------------------------------------------------------------
    def _parse(self, limit: int) -> bool:
        """Consume the complete frames of the buffer (about ``limit`` bytes of them at most):
        deliveries go to ``_seqs``/``_payloads``, the rest is answered or dispatched.

        True when it stopped at the limit (complete frames may be left), False when it needs
        more bytes.
        """
        data, pos = self._buf, self._pos
        n = len(data)
        end_at = min(n, pos + limit)
        sid = self._deliver_sid
        while pos < end_at:
            if sid:
                # The common frame, a delivery on this read's subscription, in Rust.
                try:
                    seqs, payloads, pos, delivered, pending = scan_js_deliveries(
                        data, pos, end_at, sid, self._delivered)
                except ValueError as exc:
                    raise BulkError(str(exc)) from None
                if seqs:
                    self._seqs += seqs
                    self._payloads += payloads
                    self._delivered, self._pending = delivered, pending
                if pos >= end_at:
                    break
            nxt = self._frame(data, pos)
            if nxt < 0:
                break
            pos = nxt
        more = pos >= end_at and pos < n
        self._pos = pos
        if pos >= n:
            self._buf, self._pos = b"", 0
        return more

    def _frame(self, data: bytes, pos: int) -> int:
        """Handle the one frame at ``pos``; the position after it, or -1 if incomplete."""
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            if len(data) - pos > MAX_CONTROL_LINE:
                raise BulkError("protocol error: control line too long")
            return -1
        op, _, args = data[pos:eol].partition(b" ")
        op = op.upper()
        if op == b"HMSG" or op == b"MSG":
            msg = cut_message(data, pos, eol, op, args)
            if msg is None:
                return -1
            end, (subject, sid, reply, hdr, body) = msg
            self._message(subject, sid, reply, hdr, body)
            return end
        if op == b"PING":
            self._write(b"PONG\r\n")
        elif op == b"PONG":
            self._pongs += 1
        elif op == b"-ERR":
            raise BulkError(f"server error: {args.decode(errors='replace')}")
        elif op not in (b"+OK", b"INFO"):
            raise BulkError(f"protocol error: {data[pos:eol][:120]!r}")
        return eol + 2

    def _message(self, subject: bytes, sid: bytes, reply: bytes, hdr: bytes,
                 body: bytes) -> None:
        if sid == self._inbox_sid:
            fut = self._requests.get(subject.rpartition(b".")[2])
            if fut is not None and not fut.done():
                fut.set_result((hdr, body))
            return
        if sid != self._deliver_sid or not sid:
            return  # a subscription of an earlier read, still draining
        if reply.startswith(b"$JS.ACK."):
            t = reply.split(b".")
            if len(t) == 9:
                sseq, cseq, pending = t[5], t[6], t[8]
            elif len(t) >= 12:
                sseq, cseq, pending = t[7], t[8], t[10]
            else:
                raise BulkError(f"unexpected reply subject {reply[:120]!r}")
            if int(cseq) != self._delivered + 1:  # an ordered consumer counts 1, 2, 3...
                raise BulkError(f"deliveries missing: consumer sequence {int(cseq)} where "
                                f"{self._delivered + 1} was next")
            self._seqs.append(int(sseq))
            self._payloads.append(body)
            self._delivered, self._pending = int(cseq), int(pending)
        elif reply:
            self._write(b"PUB %s 0\r\n\r\n" % reply)  # flow control: we kept up to here
            self.flow_controls += 1
        elif hdr.startswith(b"NATS/1.0 100"):
            stalled = _header(hdr, b"Nats-Consumer-Stalled")
            if stalled:
                self._write(b"PUB %s 0\r\n\r\n" % stalled)
                self.flow_controls += 1
            else:
                self._idle = True
        else:
            status = hdr.split(b"\r\n", 1)[0].decode(errors="replace")
            raise BulkError(f"consumer stopped: {status}")


def _header(hdr: bytes, name: bytes) -> bytes:
    for line in hdr.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return b""


async def read_stream(
    target: NatsClient | str | Endpoint,
    stream: str = STREAM,
    *,
    start_seq: int = 1,
    stop_seq: int | None = None,
    timeout: float = 5.0,
) -> AsyncGenerator[Batch, None]:
    """:meth:`BulkReader.read` on a connection of its own, closed at the end."""
    reader = await BulkReader.connect(target, timeout=timeout)
    try:
        async with contextlib.aclosing(reader.read(stream, start_seq=start_seq,
                                                   stop_seq=stop_seq)) as batches:
            async for batch in batches:
                yield batch
    finally:
        await reader.close()


__all__ = ["Batch", "BulkError", "BulkReader", "BulkUnavailable", "Endpoint", "cut_message",
           "read_stream"]
