"""A lean HTTP/1.1 client on asyncio protocols and httptools: the other ``HttpClient``.

aiohttp spends most of a proxied request's client-side CPU in layers the
gateway does not use (cookie jars, redirects, multipart, tracing hooks,
per-request timer contexts). This client does only what a provider call
needs: keep-alive connections pooled per origin (TLS when the URL is
https), a request written in one ``write``, the response parsed by
httptools (chunked or sized), and the body handed over whole or chunk by
chunk. It has the same three timeouts as the aiohttp client (connect; first
byte, which is also the longest silence between two chunks; total), checked
by one lazily re-armed timer per request instead of a timer per chunk.

A request on a reused idle connection that the server closed before sending
a single byte is sent once more on a new connection: that is the keep-alive
race (the server timed the idle connection out as the request left), in
which the server cannot have seen the request.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import cast

import httptools
from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamError, UpstreamTimeout
from tollway.providers.http import Reply, Timeouts

_PAUSE_AT = 1 << 20  # buffered stream bytes before reading from the socket pauses
_Origin = tuple[str, int, bool]


class _Conn(asyncio.Protocol):
    """One connection; carries one request at a time."""

    def __init__(self, client: RawHttpClient, origin: _Origin) -> None:
        self.client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.got_bytes = False
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.last_activity = 0.0

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            if self.headers_done and self._until_eof():
                self.complete = True
            else:
                name = self.client.name
                self.error = (UpstreamError(f"{name}: upstream reply broken off")
                              if self.got_bytes else
                              UpstreamConnectFailed(f"{name}: upstream closed the connection"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = self.client.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError(f"{self.client.name}: unexpected protocol upgrade"))
        except httptools.HttpParserError:
            self._fail(UpstreamError(f"{self.client.name}: malformed upstream reply"))

    # ---- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Only meaningful inside the parser's callbacks, so read it here.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # ----
    def _until_eof(self) -> bool:
        return "content-length" not in self.headers and "chunked" not in self.headers.get(
            "transfer-encoding", "")

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        self.abort()
        self._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def wait(self) -> None:
        """Until something new happened (headers, body, completion, error)."""
        if self.error is not None:
            raise self.error
        loop = self.client.loop
        self.waiter = loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data


class _Deadline:
    """One timer per request: first byte / longest silence, and the total."""

    __slots__ = ("conn", "handle", "silence", "total_at")

    def __init__(self, conn: _Conn, timeouts: Timeouts) -> None:
        loop = conn.client.loop
        now = loop.time()
        self.conn = conn
        self.silence = timeouts.first_byte
        self.total_at = now + timeouts.total
        conn.last_activity = now
        self.handle = loop.call_at(min(now + self.silence, self.total_at), self._check)

    def _check(self) -> None:
        conn = self.conn
        if conn.complete or conn.closed:
            return
        loop = conn.client.loop
        now = loop.time()
        quiet_until = conn.last_activity + self.silence
        if now >= self.total_at or now >= quiet_until:
            conn._fail(UpstreamTimeout(f"{conn.client.name}: upstream timed out"))
            return
        self.handle = loop.call_at(min(quiet_until, self.total_at), self._check)

    def cancel(self) -> None:
        self.handle.cancel()


class _RawStream:
    __slots__ = ("_client", "_conn", "_deadline", "_done", "headers", "status")

    def __init__(self, client: RawHttpClient, conn: _Conn, deadline: _Deadline) -> None:
        self._client = client
        self._conn = conn
        self._deadline = deadline
        self._done = False
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            await conn.wait()

    async def read(self) -> bytes:
        conn = self._conn
        while not conn.complete:
            await conn.wait()
        return conn.take()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._deadline.cancel()
            self._client._discard(self._conn)

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._deadline.cancel()
            self._client._release(self._conn)


class RawHttpClient:
    """A pool of keep-alive connections for one provider."""

    def __init__(self, name: str, timeouts: Timeouts, max_connections: int,
                 keepalive_s: float = 15.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.timeouts = timeouts
        self.keepalive_s = keepalive_s
        self._idle: dict[_Origin, list[_Conn]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._conns: set[_Conn] = set()
        self._ssl = ssl_context  # default: the system's trust store, made on first TLS use
        self._heads: dict[tuple[str, URL], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def aclose(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        self._idle.clear()

    # ---- connections
    async def _connect(self, origin: _Origin) -> _Conn:
        host, port, tls = origin
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.timeouts.connect):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self, origin), host, port,
                    ssl=self._ssl if tls else None, server_hostname=host if tls else None)
        except TimeoutError:
            raise UpstreamConnectFailed(f"{self.name}: connect timed out") from None
        except OSError:
            raise UpstreamConnectFailed(f"{self.name}: cannot connect to upstream") from None
        self._conns.add(conn)
        return conn

    def _pop_idle(self, origin: _Origin) -> _Conn | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                conn.reused = True
                return conn
            conn.abort()
            self._conns.discard(conn)
        return None

    def _release(self, conn: _Conn) -> None:
        """Back to the pool when the reply was read whole and the server keeps it open."""
        self._slots.release()
        if conn.closed or not conn.complete or not conn.keep_alive:
            conn.abort()
            self._conns.discard(conn)
            return
        conn._reset()
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.origin, []).append(conn)

    def _discard(self, conn: _Conn) -> None:
        self._slots.release()
        conn.abort()
        self._conns.discard(conn)

    def _head(self, method: str, url: URL) -> bytes:
        key = (method, url)
        head = self._heads.get(key)
        if head is None:
            target = url.raw_path_qs or "/"
            host = url.raw_host or ""
            if ":" in host:
                host = f"[{host}]"  # an IPv6 literal
            if url.explicit_port:
                host = f"{host}:{url.port}"
            head = self._heads[key] = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode()
        return head

    async def _send(self, method: str, url: URL, body: bytes | None,
                    headers: Mapping[str, str]) -> tuple[_Conn, _Deadline]:
        """Write the request and wait for the response headers."""
        tls = url.scheme == "https"
        origin = (url.raw_host or "", url.port or (443 if tls else 80), tls)
        lines = [self._head(method, url)]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
        else:
            lines.append(b"\r\n")
        data = b"".join(lines)
        await self._slots.acquire()
        try:
            for _ in range(2):
                conn = self._pop_idle(origin) or await self._connect(origin)
                deadline = _Deadline(conn, self.timeouts)
                assert conn.transport is not None
                conn.transport.write(data)
                try:
                    while not conn.headers_done:
                        await conn.wait()
                    return conn, deadline
                except UpstreamConnectFailed:
                    deadline.cancel()
                    conn.abort()
                    self._conns.discard(conn)
                    if conn.reused and not conn.got_bytes:
                        continue  # the keep-alive race: the server never saw it
                    raise
                except BaseException:
                    deadline.cancel()
                    conn.abort()
                    self._conns.discard(conn)
                    raise
            raise UpstreamConnectFailed(f"{self.name}: upstream closed the connection")
        except BaseException:
            self._slots.release()
            raise

    async def request(self, method: str, url: URL, body: bytes | None,
                      headers: Mapping[str, str]) -> Reply:
        conn, deadline = await self._send(method, url, body, headers)
        try:
            while not conn.complete:
                await conn.wait()
        except BaseException:
            deadline.cancel()
            self._discard(conn)
            raise
        deadline.cancel()
        reply = Reply(conn.status, conn.headers, conn.take())
        self._release(conn)
        return reply

    async def stream(self, method: str, url: URL, body: bytes | None,
                     headers: Mapping[str, str]) -> _RawStream:
        conn, deadline = await self._send(method, url, body, headers)
        return _RawStream(self, conn, deadline)
