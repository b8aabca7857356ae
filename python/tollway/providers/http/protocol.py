"""The protocol every HTTP client of the providers implements (re-exported by the package)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Protocol

from yarl import URL


class Timeouts:
    __slots__ = ("connect", "first_byte", "total")

    def __init__(self, connect: float, first_byte: float, total: float) -> None:
        self.connect = connect
        self.first_byte = first_byte  # until headers; also the longest gap between chunks
        self.total = total


class Reply:
    """A complete response; header names in lower case (the dispatcher reads them so)."""

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
    headers: Mapping[str, str]  # names in lower case, as in Reply

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        ...

    async def next(self) -> bytes | None:
        """The body bytes that arrived since the last call, joined (waiting until some
        have); None once the body ended. The same bytes as :meth:`chunks`, one call a
        read."""
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
