"""The HTTP client behind the providers: one protocol, implementations chosen by name.

:class:`HttpClient` is everything a provider needs: a whole request, a
streamed request, and close. Two implementations pass one protocol test suite
(``tests/providers/test_protocol.py``) before it may be chosen. Today that is
``raw``, tollway's own HTTP/1.1 client (:mod:`.raw`; its README says what of
HTTP/1.1 it implements and what not). The project's README says why a
maintained client is not the default: aiohttp failed the suite, pyreqwest costs
1.7-1.9x the CPU per call. A client takes proxies from ``HTTPS_PROXY`` /
``HTTP_PROXY`` / ``NO_PROXY`` (:mod:`.proxy`) and an optional CA bundle
(:mod:`.tls`). Transport failures come out as tollway's own upstream errors, so
callers never see a library's exception type; their messages name the provider
and never a header, a key or a proxy's credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Protocol

from yarl import URL

# The clients a provider may name in `http_client`: each passes the protocol suite,
# which runs over this tuple; config validation refuses any other name.
CLIENTS = ("raw",)
DEFAULT_CLIENT = "raw"


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
    """A response whose body is read as it arrives.

    ``async with`` releases it on every path: reused when read whole, else aborted.
    """

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
        """Done: the connection is reused if the body was read whole, else dropped."""
        ...

    async def __aenter__(self) -> StreamReply: ...

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...


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


def make_client(kind: str, name: str, timeouts: Timeouts, max_connections: int, *,
                keepalive_s: float = 4.0, ca_file: str | None = None,
                env: Mapping[str, str] | None = None) -> HttpClient:
    """The client called ``kind`` (one of :data:`CLIENTS`) for the provider ``name``.

    ``env`` holds the proxy variables (default: the process environment).
    """
    from tollway.providers.http.proxy import Proxies
    from tollway.providers.http.tls import tls_context

    proxies = Proxies.from_env(env)
    # Without a bundle the client makes the default context on its first https
    # connection: loading the system's CAs costs tens of milliseconds.
    ssl_context = tls_context(ca_file) if ca_file is not None else None
    if kind == "raw":
        from tollway.providers.http.raw import RawHttpClient

        return RawHttpClient(name, timeouts, max_connections, keepalive_s=keepalive_s,
                             ssl_context=ssl_context, proxies=proxies)
    raise ValueError(f"unknown http_client {kind!r}; one of {', '.join(CLIENTS)}")


__all__ = ["CLIENTS", "DEFAULT_CLIENT", "HttpClient", "Reply", "StreamReply", "Timeouts",
           "make_client"]
