"""One contract for both HTTP clients behind the providers (aiohttp and tollway's raw one)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamError, UpstreamTimeout
from tollway.providers.http import HttpClient, Timeouts
from tollway.providers.http.aiohttp_client import AiohttpClient
from tollway.providers.http.raw import RawHttpClient
from tollway.testing.upstream import FakeUpstream, Fault

BODY = json.dumps({"model": "gpt-4o-mini",
                   "messages": [{"role": "user", "content": "a b c"}]}).encode()
STREAM = json.dumps({"model": "gpt-4o-mini", "stream": True,
                     "messages": [{"role": "user", "content": "a b c"}]}).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(params=["aiohttp", "raw"])
async def client(request: pytest.FixtureRequest, up: FakeUpstream) -> AsyncIterator[HttpClient]:
    up.clear()
    up.chunk_delay_s = 0.0
    up.reply_words = None
    timeouts = Timeouts(connect=2.0, first_byte=0.5, total=3.0)
    impl: HttpClient = (AiohttpClient("up", timeouts, 100) if request.param == "aiohttp"
                        else RawHttpClient("up", timeouts, 100))
    await impl.start()
    yield impl
    await impl.aclose()


def url(up: FakeUpstream, path: str = "/chat/completions") -> URL:
    return URL(up.base_url + path)


async def test_request_and_keep_alive(client: HttpClient, up: FakeUpstream) -> None:
    opened = up.connections_opened
    for _ in range(5):
        reply = await client.request("POST", url(up), BODY, HEADERS)
        assert reply.status == 200
        assert json.loads(reply.body)["choices"][0]["message"]["content"] == "a b c"
        assert reply.headers.get("content-type", "").startswith("application/json")
    assert up.connections_opened - opened == 1  # one pooled connection, reused
    sent = up.requests[-1]
    assert sent.raw_body == BODY and sent.headers["authorization"] == "Bearer k"
    models = await client.request("GET", url(up, "/models"), None, {"Authorization": "Bearer k"})
    assert models.status == 200 and json.loads(models.body)["object"] == "list"


async def test_stream_chunks_then_reuse(client: HttpClient, up: FakeUpstream) -> None:
    up.chunk_delay_s = 0.01
    stream = await client.stream("POST", url(up), STREAM, HEADERS)
    assert stream.status == 200
    parts = [chunk async for chunk in stream.chunks()]
    assert len(parts) > 1  # as it arrives, not all at once
    assert b"".join(parts).rstrip().endswith(b"data: [DONE]")
    stream.release()
    opened = up.connections_opened
    assert (await client.request("POST", url(up), BODY, HEADERS)).status == 200
    assert up.connections_opened == opened


async def test_error_status_body_is_readable(client: HttpClient, up: FakeUpstream) -> None:
    up.add_fault(Fault(status=503, retry_after=3))
    reply = await client.request("POST", url(up), BODY, HEADERS)
    assert reply.status == 503 and reply.headers.get("retry-after") == "3"
    assert json.loads(reply.body)["error"]["message"]
    up.add_fault(Fault(status=429))
    stream = await client.stream("POST", url(up), STREAM, HEADERS)
    assert stream.status == 429 and b"error" in await stream.read()
    stream.abort()


async def test_first_byte_timeout(client: HttpClient, up: FakeUpstream) -> None:
    up.add_fault(Fault(kind="timeout", delay_s=2.0))
    t = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await client.request("POST", url(up), BODY, HEADERS)
    assert time.monotonic() - t < 1.5


async def test_silence_between_chunks_times_out(client: HttpClient, up: FakeUpstream) -> None:
    up.chunk_delay_s = 1.0  # longer than first_byte = 0.5
    up.reply_words = 5
    stream = await client.stream("POST", url(up), STREAM, HEADERS)
    with pytest.raises(UpstreamTimeout):
        async for _ in stream.chunks():
            pass
    stream.abort()


async def test_connect_refused(client: HttpClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UpstreamConnectFailed):
            await client.request("POST", URL(f"http://127.0.0.1:{port}/v1/x"), BODY, HEADERS)


async def test_reset_and_cut(client: HttpClient, up: FakeUpstream) -> None:
    up.add_fault(Fault(kind="reset"))
    with pytest.raises(UpstreamConnectFailed):
        await client.request("POST", url(up), BODY, HEADERS)
    up.add_fault(Fault(kind="cut_stream", after_chunks=2))
    stream = await client.stream("POST", url(up), STREAM, HEADERS)
    with pytest.raises(UpstreamError):
        async for _ in stream.chunks():
            pass
    stream.abort()
    assert (await client.request("POST", url(up), BODY, HEADERS)).status == 200


async def test_abort_drops_the_connection(client: HttpClient, up: FakeUpstream) -> None:
    up.chunk_delay_s = 0.05
    up.reply_words = 40
    stream = await client.stream("POST", url(up), STREAM, HEADERS)
    async for _ in stream.chunks():
        break
    opened = up.connections_opened
    stream.abort()
    # The next call cannot reuse the aborted connection.
    up.chunk_delay_s = 0.0
    assert (await client.request("POST", url(up), BODY, HEADERS)).status == 200
    assert up.connections_opened == opened + 1


async def test_raw_client_over_tls_reuses_the_connection(tmp_path: Path) -> None:
    """https base URLs (OpenAI, OpenRouter): TLS with SNI and certificate checks, keep-alive."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    connections = 0
    reply = b'{"ok":true}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    client = RawHttpClient("tls", Timeouts(2, 2, 5), 10, ssl_context=trusting)
    try:
        for _ in range(3):
            got = await client.request("POST", URL(f"https://localhost:{port}/v1/chat"), BODY,
                                       HEADERS)
            assert got.status == 200 and got.body == reply
        assert connections == 1
        untrusted = RawHttpClient("tls", Timeouts(2, 2, 5), 10)  # the system's CAs only
        with pytest.raises(UpstreamConnectFailed):
            await untrusted.request("POST", URL(f"https://localhost:{port}/v1/chat"), BODY,
                                    HEADERS)
        await untrusted.aclose()
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
