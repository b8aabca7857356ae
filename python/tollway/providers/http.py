"""The HTTP client behind the providers, kept small so it can be swapped.

:class:`HttpClient` is everything a provider needs: a full request, a
streamed request, and close. :class:`AiohttpClient` implements it with one
pooled ``aiohttp.ClientSession`` per provider (keep-alive, a large connection
limit, no cookie jar). Transport failures come out as tollway's own upstream
errors, so callers never see a library's exception type; their messages name
the provider and never a header.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamError, UpstreamTimeout


class Timeouts:
    __slots__ = ("connect", "first_byte", "total")

    def __init__(self, connect: float, first_byte: float, total: float) -> None:
        self.connect = connect
        self.first_byte = first_byte  # until headers; also the longest gap between chunks
        self.total = total


class Reply:
    """A complete response."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class StreamReply(Protocol):
    status: int
    headers: Mapping[str, str]

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        ...

    async def read(self) -> bytes:
        """The whole (remaining) body, e.g. an error reply."""
        ...

    def abort(self) -> None:
        """Drop the connection now: the upstream sees the request cancelled."""
        ...

    def release(self) -> None:
        """Done after reading everything: the connection may be reused."""
        ...


class HttpClient(Protocol):
    async def request(
        self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str]
    ) -> Reply: ...

    async def stream(
        self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str]
    ) -> StreamReply: ...

    async def start(self) -> None:
        """Open pools inside the running loop (lifespan startup)."""
        ...

    async def aclose(self) -> None: ...


class _AiohttpStream:
    __slots__ = ("_client", "_resp", "headers", "status")

    def __init__(self, client: AiohttpClient, resp: aiohttp.ClientResponse) -> None:
        self._client = client
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._resp.content.iter_any():
                yield data
        except Exception as exc:
            raise self._client.translate(exc) from None

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except Exception as exc:
            raise self._client.translate(exc) from None

    def abort(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class AiohttpClient:
    """One pooled session for one provider."""

    def __init__(self, name: str, timeouts: Timeouts, max_connections: int,
                 keepalive_s: float = 15.0) -> None:
        self.name = name
        self._keepalive_s = keepalive_s
        self._timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.first_byte
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop (lifespan), never at import.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=self._keepalive_s,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False, auto_decompress=True,
        )
        return self._session

    def translate(self, exc: BaseException) -> UpstreamError:
        name = self.name
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamConnectFailed(f"{name}: connect timed out")
        if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
            return UpstreamTimeout(f"{name}: upstream timed out")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamConnectFailed(f"{name}: cannot connect to upstream")
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return UpstreamConnectFailed(f"{name}: upstream closed the connection")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return UpstreamError(f"{name}: upstream reply broken off")
        if isinstance(exc, aiohttp.ClientError | OSError):
            return UpstreamConnectFailed(f"{name}: upstream connection failed")
        return UpstreamError(f"{name}: upstream request failed")

    async def request(
        self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str]
    ) -> Reply:
        session = self._session or self._open()
        try:
            async with session.request(method, url, data=body, headers=headers) as resp:
                data = await resp.read()
                return Reply(resp.status, resp.headers, data)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self.translate(exc) from None

    async def stream(
        self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str]
    ) -> StreamReply:
        session = self._session or self._open()
        try:
            resp = await session.request(method, url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self.translate(exc) from None
        return _AiohttpStream(self, resp)

    async def start(self) -> None:
        if self._session is None:
            self._open()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
