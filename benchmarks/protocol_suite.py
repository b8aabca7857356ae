"""Run the HTTP clients' protocol suite on a maintained client that tollway does not ship.

The README compares the own client with pyreqwest on cost; this script shows
how pyreqwest fares on correctness, through the smallest adapter to tollway's
``HttpClient`` (translating errors, nothing else), so that the comparison
is between clients that both give each call its own reply.

    pip install -e '.[bench,test]'
    python benchmarks/protocol_suite.py               # pyreqwest, the protocol suite
    python benchmarks/protocol_suite.py -k reset      # extra arguments go to pytest

2026-12-02, pyreqwest 0.15.1, on both loops: every case of "its own reply or an
error" passes (1xx, 408 and bytes on idle connections, Connection: close,
HTTP/1.0, no-length bodies, chunked trailers, resets, hypothesis splits, 3 MB,
100 MB bounded). Five fail: a ``101`` is handed over as the reply (an adapter
could refuse it); the server's ``Keep-Alive: timeout`` is not honoured; in the
split-at-every-byte run a second connection was opened (a reuse check, not a
wrong reply); the read timeout counts time in which a slow reader keeps
reading paused (a slow caller would time the upstream out); and an abandoned
stream of this adapter did not free its connection in time.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

import tollway.providers.http as http
from tollway.errors import UpstreamConnectFailed, UpstreamError, UpstreamTimeout
from tollway.providers.http import Reply, Timeouts

ROOT = Path(__file__).resolve().parent.parent


def _translate(name: str, exc: BaseException) -> UpstreamError:
    from pyreqwest import exceptions as e

    if isinstance(exc, e.ConnectTimeoutError | e.ConnectError):
        return UpstreamConnectFailed(f"{name}: cannot connect to upstream")
    if isinstance(exc, e.RequestTimeoutError):
        return UpstreamTimeout(f"{name}: upstream timed out")
    return UpstreamError(f"{name}: upstream failed ({type(exc).__name__})")


class _Stream:
    def __init__(self, name: str, opened: Any, resp: Any) -> None:
        self._name, self._opened, self._resp = name, opened, resp
        self.status: int = resp.status
        self.headers: Mapping[str, str] = {k.lower(): v for k, v in resp.headers.items()}

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self._resp.body_reader.read_chunk()) is not None:
                yield bytes(chunk)
        except Exception as exc:
            raise _translate(self._name, exc) from None

    async def read(self) -> bytes:
        try:
            return bytes(await self._resp.body_reader.bytes())
        except Exception as exc:
            raise _translate(self._name, exc) from None

    def abort(self) -> None:
        task = asyncio.ensure_future(self._opened.__aexit__(None, None, None))
        task.add_done_callback(lambda t: t.exception())

    release = abort

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._opened.__aexit__(None, None, None)


class PyreqwestClient:
    def __init__(self, name: str, timeouts: Timeouts, max_connections: int) -> None:
        from pyreqwest.client import ClientBuilder

        self.name = name
        self._client = (ClientBuilder().max_connections(max_connections).gzip(False)
                        .http1_only().no_proxy()
                        .connect_timeout(timedelta(seconds=timeouts.connect))
                        .read_timeout(timedelta(seconds=timeouts.first_byte))
                        .timeout(timedelta(seconds=timeouts.total)).build())

    def _build(self, method: str, url: URL, body: bytes | None,
               headers: Mapping[str, str]) -> Any:
        builder = self._client.request(method, str(url)).headers(dict(headers))
        return builder.body_bytes(body) if body is not None else builder

    async def request(self, method: str, url: URL, body: bytes | None,
                      headers: Mapping[str, str]) -> Reply:
        try:
            resp = await self._build(method, url, body, headers).build().send()
            data = bytes(await resp.bytes())
        except Exception as exc:
            raise _translate(self.name, exc) from None
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)

    async def stream(self, method: str, url: URL, body: bytes | None,
                     headers: Mapping[str, str]) -> _Stream:
        opened = self._build(method, url, body, headers).build_streamed()
        try:
            resp = await opened.__aenter__()
        except Exception as exc:
            raise _translate(self.name, exc) from None
        return _Stream(self.name, opened, resp)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        await self._client.close()


def main() -> int:
    shipped = http.make_client

    def make_client(kind: str, name: str, timeouts: Timeouts, max_connections: int,
                    **kw: Any) -> Any:
        if kind == "pyreqwest":
            return PyreqwestClient(name, timeouts, max_connections)
        return shipped(kind, name, timeouts, max_connections, **kw)

    # Before the suite is imported: it reads both names at import time.
    http.CLIENTS = ("pyreqwest",)
    http.make_client = make_client
    suite = str(ROOT / "tests" / "providers" / "test_protocol.py")
    return int(pytest.main([suite, "-q", "-p", "no:cacheprovider",
                            "-W", "ignore::pytest.PytestAssertRewriteWarning", *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
