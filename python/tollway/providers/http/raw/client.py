"""The pool of :class:`Connection` s for one provider, and the two calls on it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from types import TracebackType

from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamTimeout
from tollway.providers.http.protocol import Reply, Timeouts
from tollway.providers.http.proxy import Proxies, Proxy
from tollway.providers.http.raw.connection import BODY, DONE, IDLE, WAITING, Connection
from tollway.providers.http.raw.tunnel import open_tunnel
from tollway.providers.http.tls import tls_context

_Origin = tuple[str, int, bool]
# Idle connections are dropped this long before the server's own idle timeout would
# close them, so that a request is not written into a connection the server is closing.
_IDLE_MARGIN_S = 1.0


class _Deadline:
    """One timer per request: first byte / longest silence, and the total."""

    __slots__ = ("conn", "handle", "silence", "total_at")

    def __init__(self, conn: Connection, timeouts: Timeouts) -> None:
        loop = conn.client.loop
        now = loop.time()
        self.conn = conn
        self.silence = timeouts.first_byte
        self.total_at = now + timeouts.total
        conn.last_activity = now
        self.handle = loop.call_at(min(now + self.silence, self.total_at), self._check)

    def _check(self) -> None:
        conn = self.conn
        if conn.state != WAITING and conn.state != BODY:
            return
        loop = conn.client.loop
        now = loop.time()
        if conn.paused:
            conn.last_activity = now  # our reader is slow, not the upstream
        quiet_until = conn.last_activity + self.silence
        if now >= self.total_at or now >= quiet_until:
            conn.fail(UpstreamTimeout(f"{conn.client.name}: upstream timed out"))
            return
        self.handle = loop.call_at(min(quiet_until, self.total_at), self._check)

    def cancel(self) -> None:
        self.handle.cancel()


class RawStream:
    """A streamed reply; ``async with`` gives the connection back on every path."""

    __slots__ = ("_client", "_conn", "_deadline", "_done", "headers", "status")

    def __init__(self, client: RawHttpClient, conn: Connection, deadline: _Deadline) -> None:
        self._client = client
        self._conn = conn
        self._deadline = deadline
        self._done = False
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    async def next(self) -> bytes | None:
        """What arrived since the last call (every piece, joined), waiting for something;
        None at the body's end. The relay reads a stream with this: no generator between
        it and the connection."""
        conn = self._conn
        while not conn.chunks:
            if conn.state == DONE:
                return None
            await conn.wait()
        return conn.take()

    async def chunks(self) -> AsyncIterator[bytes]:
        while (data := await self.next()) is not None:
            yield data

    async def read(self) -> bytes:
        conn = self._conn
        while conn.state != DONE:
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

    async def __aenter__(self) -> RawStream:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class RawHttpClient:
    """A pool of keep-alive connections for one provider."""

    def __init__(self, name: str, timeouts: Timeouts, max_connections: int, *,
                 keepalive_s: float = 4.0, ssl_context: ssl.SSLContext | None = None,
                 proxies: Proxies | None = None, max_reply_bytes: int = 256 << 20) -> None:
        self.name = name
        # A whole-body reply past this is an upstream error, not a memory problem.
        self.max_reply_bytes = max_reply_bytes
        self.timeouts = timeouts
        self.keepalive_s = keepalive_s
        self._idle: dict[_Origin, list[Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._conns: set[Connection] = set()
        self._ssl = ssl_context  # default: the system's trust store, made on first TLS use
        self._proxies = proxies or Proxies(None, None)
        self._heads: dict[tuple[str, URL], tuple[_Origin, Proxy | None, bytes]] = {}
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
            conn.break_off()
        self._conns.clear()
        self._idle.clear()

    # ---- connections
    async def _connect(self, origin: _Origin, proxy: Proxy | None) -> Connection:
        host, port, tls = origin
        if tls and self._ssl is None:
            self._ssl = tls_context()
        tls_ctx = self._ssl if tls else None

        def factory() -> Connection:
            return Connection(self, origin)

        try:
            async with asyncio.timeout(self.timeouts.connect):
                if proxy is None:
                    _, conn = await self.loop.create_connection(
                        factory, host, port, ssl=tls_ctx, server_hostname=host if tls else None)
                elif tls_ctx is not None:
                    sock = await open_tunnel(self.loop, proxy, host, port, self.name)
                    _, conn = await self.loop.create_connection(
                        factory, sock=sock, ssl=tls_ctx, server_hostname=host)
                else:
                    _, conn = await self.loop.create_connection(factory, proxy.host, proxy.port)
        except TimeoutError:
            raise UpstreamConnectFailed(f"{self.name}: connect timed out") from None
        except ssl.SSLError:
            raise UpstreamConnectFailed(f"{self.name}: TLS handshake with the upstream failed "
                                        "(certificate not trusted?)") from None
        except OSError:
            raise UpstreamConnectFailed(f"{self.name}: cannot connect to upstream") from None
        self._conns.add(conn)
        return conn

    def _pop_idle(self, origin: _Origin) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if (conn.state == IDLE and not conn.closed and now < conn.idle_until
                    and transport is not None and not transport.is_closing()):
                return conn
            self._forget(conn)
        return None

    def _release(self, conn: Connection) -> None:
        """Back to the pool after a whole reply, with keep-alive and nothing extra read."""
        self._slots.release()
        if not conn.reusable() or conn.chunks:
            self._forget(conn)
            return
        conn.state = IDLE
        keep = self.keepalive_s
        if conn.server_idle_s is not None:
            keep = min(keep, conn.server_idle_s - _IDLE_MARGIN_S)
        conn.idle_until = self.loop.time() + keep
        self._idle.setdefault(conn.origin, []).append(conn)

    def _discard(self, conn: Connection) -> None:
        self._slots.release()
        self._forget(conn)

    def _forget(self, conn: Connection) -> None:
        conn.break_off()
        self._conns.discard(conn)

    def _head(self, method: str, url: URL) -> tuple[_Origin, Proxy | None, bytes]:
        key = (method, url)
        found = self._heads.get(key)
        if found is None:
            tls = url.scheme == "https"
            host = url.raw_host or ""
            port = url.port or (443 if tls else 80)
            proxy = self._proxies.for_url(url.scheme, host, port)
            authority = f"[{host}]" if ":" in host else host  # an IPv6 literal
            if url.explicit_port:
                authority = f"{authority}:{url.port}"
            path = url.raw_path_qs or "/"
            lines = [f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"]
            if proxy is not None and not tls:
                # Through a proxy, plain http names the whole URL (RFC 9112 3.2.2).
                lines = [f"{method} http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n"]
                if proxy.authorization:
                    lines.append(f"Proxy-Authorization: {proxy.authorization}\r\n")
            found = self._heads[key] = ((host, port, tls), proxy, "".join(lines).encode())
        return found

    async def _send(self, method: str, url: URL, body: bytes | None,
                    headers: Mapping[str, str], streaming: bool
                    ) -> tuple[Connection, _Deadline]:
        """Write the request once and wait for the final response headers.

        The request is written exactly once: a pooled connection found dead is
        dropped *before* writing, and a connection that closes after the write is
        an error for the dispatcher to retry or not (the server may have run it).
        """
        origin, proxy, head = self._head(method, url)
        lines = [head]
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
            conn = self._pop_idle(origin) or await self._connect(origin, proxy)
            conn.begin(streaming)
            deadline = _Deadline(conn, self.timeouts)
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                while conn.state == WAITING:
                    await conn.wait()
            except BaseException:
                deadline.cancel()
                self._forget(conn)
                raise
            return conn, deadline
        except BaseException:
            self._slots.release()
            raise

    async def request(self, method: str, url: URL, body: bytes | None,
                      headers: Mapping[str, str]) -> Reply:
        conn, deadline = await self._send(method, url, body, headers, streaming=False)
        try:
            while conn.state != DONE:
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
                     headers: Mapping[str, str]) -> RawStream:
        conn, deadline = await self._send(method, url, body, headers, streaming=True)
        return RawStream(self, conn, deadline)


__all__ = ["RawHttpClient", "RawStream"]
