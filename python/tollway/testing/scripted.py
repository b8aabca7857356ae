"""A scripted HTTP/1.1 upstream on loopback: it sends exactly the bytes a test says.

Where :mod:`tollway.testing.upstream` is a well-behaved OpenAI server, this one
is for the protocol suite of the HTTP clients: a test gives a *script*, a
function from each request received to the steps that answer it, and the
server plays them byte for byte (1xx interim replies, replies split at any
offset, a ``408`` on an idle connection, resets, HTTP/1.0). It runs on its own
event loop in a thread, so async client tests and a gateway in a thread can
both use it. Each request records which connection it came on.

    def script(req: Request) -> list[Step]:
        return [b"HTTP/1.1 103 Early Hints\\r\\n\\r\\n", ok(req.body)]

    with ScriptedUpstream(script) as up:
        ...  # call up.url("/v1/chat/completions")
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CLOSE = _Mark("CLOSE")  # a clean close (FIN) after what was written
RESET = _Mark("RESET")  # a TCP reset (RST): SO_LINGER 0, then close
HANG = _Mark("HANG")  # stop answering this connection; keep it open
Step = bytes | float | _Mark  # bytes are written (and drained), a float is a pause in seconds


@dataclass(frozen=True)
class Request:
    connection: int  # 1 for the server's first connection, 2 for the next, ...
    head: bytes
    body: bytes

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]


Script = Callable[[Request], Sequence[Step]]


def ok(body: bytes, *, extra: bytes = b"") -> bytes:
    """A plain 200 reply with a length."""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def chunked(body: bytes, *, size: int = 7, trailer: bytes = b"") -> bytes:
    """A chunked 200 reply, chunks of ``size`` bytes with extensions, then trailers."""
    parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Tag: head\r\n\r\n"]
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        parts.append(b"%x;n=%d;q=\"a b\"\r\n%s\r\n" % (len(piece), i, piece))
    parts.append(b"0\r\n" + trailer + b"\r\n")
    return b"".join(parts)


class ScriptedUpstream:
    """The server; a context manager that runs it on a loop in a thread."""

    def __init__(self, script: Script, ssl_context: ssl.SSLContext | None = None) -> None:
        self.script = script
        self._ssl = ssl_context
        self.requests: list[Request] = []
        self.connections = 0
        # Answers played to their last step (a CLOSE's FIN sent): a test that needs a 408 or
        # a close to have arrived waits for this, not for a pause a loaded machine outlasts.
        self.played = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def until_played(self, n: int, timeout: float = 60.0) -> None:
        """Wait (on the caller's loop) until ``n`` answers were played, then one more turn of
        that loop, so a client on it has taken in what they sent."""
        deadline = time.monotonic() + timeout
        while self.played < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.played} answers played, wanted {n}")
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)

    def url(self, path: str = "/v1/chat/completions", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                req = Request(number, head, await reader.readexactly(length))
                self.requests.append(req)
                go_on = await self._play(self.script(req), writer)
                self.played += 1
                if not go_on:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                ssl.SSLError):
            writer.transport.abort()
        finally:
            self._writers.discard(writer)

    async def _play(self, steps: Sequence[Step], writer: asyncio.StreamWriter) -> bool:
        """Play one answer; False when the connection is done."""
        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            elif isinstance(step, float | int):
                await asyncio.sleep(step)
            elif step is CLOSE:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                await asyncio.sleep(0.05)  # let the FIN arrive before the socket goes
                writer.close()
                return False
            elif step is RESET:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            elif step is HANG:
                await asyncio.Event().wait()
        return True
