"""The ``aiohttp`` implementation of :class:`~tollway.providers.http.HttpClient`.

One pooled ``aiohttp.ClientSession`` per provider (keep-alive, a large
connection limit, no cookie jar, no redirects). Proxies come from
:class:`~tollway.providers.http.proxy.Proxies` (not aiohttp's ``trust_env``,
which does not bypass loopback), so both clients pick the same route.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamError, UpstreamTimeout
from tollway.providers.http import Reply, Timeouts
from tollway.providers.http.proxy import Proxies


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
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()  # a half-read body: the connection cannot be reused

    async def __aenter__(self) -> _AiohttpStream:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class AiohttpClient:
    """One pooled session for one provider."""

    def __init__(self, name: str, timeouts: Timeouts, max_connections: int, *,
                 keepalive_s: float = 4.0, ssl_context: ssl.SSLContext | None = None,
                 proxies: Proxies | None = None) -> None:
        self.name = name
        self._keepalive_s = keepalive_s
        self._ssl: ssl.SSLContext | bool = ssl_context or True
        self._proxies = proxies or Proxies(None, None)
        self._routes: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.first_byte
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop (lifespan), never at import.
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=self._keepalive_s,
            ttl_dns_cache=300, ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False, auto_decompress=True,
        )
        return self._session

    def _route(self, url: URL) -> dict[str, Any]:
        """The per-request proxy arguments for this URL's origin."""
        key = (url.scheme, url.raw_host or "", url.port or 0)
        route = self._routes.get(key)
        if route is None:
            proxy = self._proxies.for_url(*key)
            route = {"allow_redirects": False}
            if proxy is not None:
                route["proxy"] = proxy.url()
                if proxy.authorization:
                    route["proxy_headers"] = {"Proxy-Authorization": proxy.authorization}
            self._routes[key] = route
        return route

    def translate(self, exc: BaseException) -> UpstreamError:
        name = self.name
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamConnectFailed(f"{name}: connect timed out")
        if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
            return UpstreamTimeout(f"{name}: upstream timed out")
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            return UpstreamConnectFailed(f"{name}: cannot connect to the proxy")
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return UpstreamConnectFailed(f"{name}: the proxy refused the tunnel "
                                         f"(HTTP {exc.status})")
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
            return UpstreamConnectFailed(f"{name}: TLS handshake with the upstream failed "
                                         "(certificate not trusted?)")
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
        resp = await self._send(method, url, body, headers)
        try:
            data = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self.translate(exc) from None
        finally:
            resp.release()
        return Reply(resp.status, resp.headers, data)

    async def stream(
        self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str]
    ) -> _AiohttpStream:
        return _AiohttpStream(self, await self._send(method, url, body, headers))

    async def _send(self, method: str, url: URL, body: bytes | None,
                    headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        session = self._session or self._open()
        try:
            resp = await session.request(method, url, data=body, headers=headers,
                                         **self._route(url))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self.translate(exc) from None
        if resp.status < 200:
            # aiohttp hands a 101 over as the reply (1xx interim ones it skips); nothing
            # here asked for an upgrade, so the connection is dropped.
            resp.close()
            raise UpstreamError(f"{self.name}: unexpected protocol upgrade")
        return resp

    async def start(self) -> None:
        if self._session is None:
            self._open()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
