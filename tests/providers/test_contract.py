"""The providers' HTTP clients against the simulated OpenAI upstream: timeouts, faults, reuse.

The byte-level protocol cases are in test_protocol.py."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamError, UpstreamTimeout
from tollway.providers.http import CLIENTS, HttpClient, Timeouts, make_client
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


@pytest.fixture(params=CLIENTS)
async def client(request: pytest.FixtureRequest, up: FakeUpstream) -> AsyncIterator[HttpClient]:
    up.clear()
    up.chunk_delay_s = 0.0
    up.reply_words = None
    timeouts = Timeouts(connect=2.0, first_byte=0.5, total=3.0)
    impl = make_client(request.param, "up", timeouts, 100, env={})
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
    # The reply comes at 2 s, before the total timeout (3 s): only the first-byte timeout
    # (0.5 s) can end the call in a timeout. No bound on the elapsed time: a loaded machine
    # stretches it, and the reply would have arrived had that timeout not fired.
    up.add_fault(Fault(kind="timeout", delay_s=2.0))
    with pytest.raises(UpstreamTimeout):
        await client.request("POST", url(up), BODY, HEADERS)


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
