"""The protocol suite: every HTTP client tollway ships, against exact bytes on loopback.

Each request carries its own id and each scripted reply echoes it, so a reply
given to the wrong call shows. The rule under test: each call gets its own
reply or a clear upstream error, never another's.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from tollway.errors import UpstreamConnectFailed, UpstreamError
from tollway.providers.http import CLIENTS, HttpClient, Timeouts, make_client
from tollway.testing.scripted import (
    CLOSE,
    HANG,
    RESET,
    Request,
    ScriptedUpstream,
    Step,
    chunked,
    ok,
)

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-secret-77"}
_ids = itertools.count()


def own_body(req: Request) -> bytes:
    """The reply body that belongs to this request."""
    return b'{"answer-to":' + req.body + b"}"


class Rig:
    """A scripted upstream and one client of the kind under test."""

    def __init__(self, kind: str, up: ScriptedUpstream) -> None:
        self.kind = kind
        self.up = up
        self.client: HttpClient = make_client(kind, "up", Timeouts(2.0, 2.0, 10.0), 50,
                                              env={})

    async def call(self) -> tuple[bytes, bytes, int]:
        """One whole-body call: (what was sent, what came back, status)."""
        sent = b'"req-%d"' % next(_ids)
        reply = await self.client.request("POST", URL(self.up.url()), sent, HEADERS)
        return sent, reply.body, reply.status

    async def own(self) -> bytes:
        sent, got, status = await self.call()
        assert got == b'{"answer-to":' + sent + b"}", (sent, got)
        assert status == 200
        return got


@pytest.fixture
def script() -> list[Sequence[Step] | None]:
    """Answers in order, one a request; ``None`` or the end of the list: a plain 200."""
    return []


@pytest.fixture
def up(script: list[Sequence[Step] | None]) -> Iterator[ScriptedUpstream]:
    def play(req: Request) -> Sequence[Step]:
        steps = script.pop(0) if script else None
        if steps is None:
            return [ok(own_body(req))]
        return [s(req) if callable(s) else s for s in steps]  # type: ignore[operator]

    with ScriptedUpstream(play) as server:
        yield server


@pytest.fixture(params=CLIENTS)
async def rig(request: pytest.FixtureRequest, up: ScriptedUpstream) -> AsyncIterator[Rig]:
    r = Rig(request.param, up)
    await r.client.start()
    yield r
    await r.client.aclose()


def own_ok(req: Request) -> bytes:
    return ok(own_body(req))


# ---------------------------------------------------------------- interim replies


async def test_1xx_interim_replies_are_skipped(rig: Rig, script: list[object]) -> None:
    script += [
        [b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n", own_ok],
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n", 0.01, own_ok],
    ]
    for _ in range(4):  # the off-by-one of the bug would show from the second call on
        await rig.own()
    assert len({r.connection for r in rig.up.requests}) == 1  # and the connection is reused


async def test_101_is_an_error(rig: Rig, script: list[object]) -> None:
    script.append([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                   b"Connection: Upgrade\r\n\r\n", own_ok])
    with pytest.raises(UpstreamError):
        await rig.call()
    await rig.own()


# ---------------------------------------------------------------- idle connections


async def test_a_408_on_an_idle_connection_is_not_the_next_reply(rig: Rig,
                                                                  script: list[object]) -> None:
    script.append([own_ok, 0.05, b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                   b"Connection: close\r\n\r\n", CLOSE])
    await rig.own()
    await rig.up.until_played(1)  # the 408 and the close arrive while the connection is idle
    await rig.own()
    await rig.own()


async def test_bytes_on_an_idle_connection_end_it(rig: Rig, script: list[object]) -> None:
    # The stray reply stays open and looks valid: a client that parses it takes it as the
    # next call's answer.
    script.append([own_ok, 0.05, ok(b'"stray"')])
    await rig.own()
    await rig.up.until_played(1)
    await rig.own()
    conns = [r.connection for r in rig.up.requests]
    assert conns[0] != conns[1]


async def test_bytes_right_after_a_reply_end_the_connection(rig: Rig,
                                                             script: list[object]) -> None:
    script.append([lambda req: own_ok(req) + ok(b'"stray"')])  # in the same segment
    await rig.own()
    await rig.own()
    await rig.own()


async def test_a_close_on_an_idle_connection(rig: Rig, script: list[object]) -> None:
    script.append([own_ok, 0.05, CLOSE])
    await rig.own()
    await rig.up.until_played(1)
    await rig.own()


# ---------------------------------------------------------------- end of the connection


async def test_connection_close_is_honoured(rig: Rig, script: list[object]) -> None:
    # The server says close but keeps the socket open: the client must not reuse it.
    script.append([lambda req: ok(own_body(req), extra=b"Connection: close\r\n")])
    await rig.own()
    await rig.own()
    conns = [r.connection for r in rig.up.requests]
    assert conns[0] != conns[1]


async def test_the_servers_keep_alive_timeout_is_honoured(rig: Rig,
                                                          script: list[object]) -> None:
    # timeout=1: the connection is dropped a margin before the server would close it.
    script.append([lambda req: ok(own_body(req), extra=b"Keep-Alive: timeout=1, max=9\r\n")])
    await rig.own()
    await rig.own()
    await rig.own()
    conns = [r.connection for r in rig.up.requests]
    assert conns[0] != conns[1] == conns[2]


async def test_http_1_0_replies(rig: Rig, script: list[object]) -> None:
    script += [
        [lambda req: b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
         % (len(own_body(req)), own_body(req))],
        [lambda req: b"HTTP/1.0 200 OK\r\n\r\n" + own_body(req), CLOSE],  # no length: EOF
    ]
    await rig.own()
    await rig.own()
    await rig.own()
    conns = [r.connection for r in rig.up.requests]
    assert len(set(conns)) == 3  # a 1.0 reply without keep-alive is never reused


async def test_a_body_without_length_ends_on_a_clean_close(rig: Rig,
                                                           script: list[object]) -> None:
    script.append([lambda req: b"HTTP/1.1 200 OK\r\n\r\n" + own_body(req)[:5], 0.02,
                   lambda req: own_body(req)[5:], CLOSE])
    await rig.own()
    await rig.own()


# ---------------------------------------------------------------- chunked


async def test_chunked_with_extensions_and_trailers(rig: Rig, script: list[object]) -> None:
    script += [[lambda req: chunked(own_body(req), trailer=b"X-Tag: trailer\r\nX-Sum: 1\r\n")]
               ] * 2
    sent = b'"req-chunked"'
    reply = await rig.client.request("POST", URL(rig.up.url()), sent, HEADERS)
    assert reply.body == b'{"answer-to":' + sent + b"}"
    assert reply.headers.get("x-tag") == "head"  # the trailer did not overwrite it
    await rig.own()
    await rig.own()
    assert len({r.connection for r in rig.up.requests}) == 1


# ---------------------------------------------------------------- resets


async def test_reset_before_the_reply(rig: Rig, script: list[object]) -> None:
    script.append([RESET])
    with pytest.raises(UpstreamError):
        await rig.call()
    await rig.own()


@pytest.mark.parametrize("framing", ["length", "chunked", "until-close"])
async def test_reset_during_the_body(rig: Rig, script: list[object], framing: str) -> None:
    head = {"length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n",
            "until-close": b"HTTP/1.1 200 OK\r\n\r\n"}[framing]
    script.append([head + b'{"partial":', 0.05, RESET])
    with pytest.raises(UpstreamError):  # never a complete 200 with half a body
        await rig.call()
    await rig.own()


async def test_reset_after_the_body(rig: Rig, script: list[object]) -> None:
    script.append([own_ok, 0.02, RESET])
    await rig.own()
    await rig.up.until_played(1)
    await rig.own()


async def test_a_reused_connection_closed_after_the_write_is_an_error_not_a_resend(
        rig: Rig, script: list[object]) -> None:
    """The server may have run the request: the client never sends it again itself."""
    script += [None, [CLOSE]]
    await rig.own()
    with pytest.raises(UpstreamConnectFailed):
        await rig.call()
    assert len(rig.up.requests) == 2  # written once
    await rig.own()


async def test_a_pooled_connection_found_dead_is_replaced_before_writing(
        rig: Rig, script: list[object]) -> None:
    script.append([own_ok, CLOSE])
    await rig.own()
    await rig.up.until_played(1)  # the close arrived: nothing is written into that connection
    await rig.own()
    assert len(rig.up.requests) == 2


# ---------------------------------------------------------------- splits


def _sequence(req: Request) -> bytes:
    """Interim reply, chunked body with extensions and trailers: all the framing at once."""
    return (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            + chunked(own_body(req), size=5, trailer=b"X-Tag: trailer\r\n"))


async def test_every_reply_split_at_every_byte(rig: Rig, script: list[object]) -> None:
    probe = Request(0, b"", b'"req-000"')
    for raw in (_sequence(probe), own_ok(probe)):
        for cut in range(1, len(raw)):
            maker = _sequence if raw.startswith(b"HTTP/1.1 103") else own_ok
            script.append([lambda req, c=cut, m=maker: m(req)[:c], 0.001,  # type: ignore[misc]
                           lambda req, c=cut, m=maker: m(req)[c:]])  # type: ignore[misc]
            sent = b'"req-%03d"' % (cut % 1000)
            reply = await rig.client.request("POST", URL(rig.up.url()), sent, HEADERS)
            assert reply.body == b'{"answer-to":' + sent + b"}", cut
            assert reply.status == 200 and reply.headers.get("x-tag") in (None, "head")
    assert len({r.connection for r in rig.up.requests}) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=6))
def test_replies_split_anywhere_many_times(cuts: list[int]) -> None:
    """Several replies back to back, each cut at several points, every client, both loops."""
    def play(req: Request) -> list[Step]:
        raw = _sequence(req)
        points = sorted({c % len(raw) for c in cuts} - {0})
        out: list[Step] = []
        for a, b in zip([0, *points], [*points, len(raw)], strict=True):
            out += [raw[a:b], 0.0005]
        return out

    async def run(kind: str, up: ScriptedUpstream) -> None:
        r = Rig(kind, up)
        try:
            for _ in range(3):
                await r.own()
        finally:
            await r.client.aclose()

    with ScriptedUpstream(play) as up:
        for kind in CLIENTS:
            for loop_factory in (asyncio.new_event_loop, uvloop.new_event_loop):
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    runner.run(run(kind, up))


# ---------------------------------------------------------------- many at once


async def test_concurrent_calls_each_get_their_own_reply(rig: Rig,
                                                         script: list[object]) -> None:
    odd: list[object] = [
        [b"HTTP/1.1 103 Early Hints\r\n\r\n", own_ok],
        [lambda req: chunked(own_body(req), trailer=b"X-Tag: t\r\n")],
        [own_ok, 0.01, b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n", CLOSE],
        [lambda req: ok(own_body(req), extra=b"Connection: close\r\n")],
        [RESET],
        None,
    ]
    script += odd * 10
    results = await asyncio.gather(*(rig.call() for _ in range(60)), return_exceptions=True)
    answered = 0
    for result in results:
        if isinstance(result, BaseException):
            assert isinstance(result, UpstreamError)
            continue
        sent, got, status = result
        if status == 408:
            # The server's 408 raced a request written into the connection while it was
            # idle (no client can tell them apart): a timeout error for that call.
            assert got == b""
            continue
        assert (status, got) == (200, b'{"answer-to":' + sent + b"}")
        answered += 1
    # 40 scripts answer (the 103, chunked, 408-after-a-reply and close ones); a 408 can cost
    # the one call that raced it, so fewer may: enough that the check above is not vacuous.
    assert answered >= 30


# ---------------------------------------------------------------- size and memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_whole_reply_of_3_mb(rig: Rig, script: list[object]) -> None:
    big = b"x" * (3 << 20)
    script += [[ok(big)], [lambda req: chunked(big, size=1 << 16)]]
    for _ in range(2):
        reply = await rig.client.request("POST", URL(rig.up.url()), b"{}", HEADERS)
        assert reply.status == 200 and reply.body == big


async def test_a_100_mb_stream_with_bounded_memory(rig: Rig, script: list[object]) -> None:
    total, piece = 100 << 20, b"y" * (1 << 20)
    script.append([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total]
                  + [piece] * 100)
    stream = await rig.client.stream("POST", URL(rig.up.url()), b"{}", HEADERS)
    async with stream:
        base = _rss()
        peak, got = 0, 0
        async for chunk in stream.chunks():
            if got == 0:
                await asyncio.sleep(0.5)  # a slow reader: an unbounded client buffers on
            got += len(chunk)
            peak = max(peak, _rss() - base)
        assert got == total
    assert peak < 48 << 20, f"the stream grew memory by {peak >> 20} MiB"


async def test_a_slow_reader_is_not_an_upstream_timeout(rig: Rig, script: list[object]) -> None:
    """Paused for a slow reader, the upstream is not silent: no first-byte timeout."""
    client = make_client(rig.kind, "up", Timeouts(2.0, 0.2, 10.0), 5, env={})
    body = b"w" * (4 << 20)
    script.append([ok(body)])
    try:
        got = b""
        async with await client.stream("POST", URL(rig.up.url()), b"{}", HEADERS) as stream:
            async for chunk in stream.chunks():
                if not got:
                    await asyncio.sleep(0.6)  # three silences' worth, with reading paused
                got += chunk
        assert got == body
    finally:
        await client.aclose()


async def test_an_abandoned_stream_frees_its_connection(rig: Rig, script: list[object]) -> None:
    script.append([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10, HANG])
    async with await rig.client.stream("POST", URL(rig.up.url()), b"{}", HEADERS) as s:
        async for _ in s.chunks():
            break
    await rig.own()
    conns = [r.connection for r in rig.up.requests]
    assert conns[0] != conns[1]


async def test_next_gives_what_arrived_joined_then_none(rig: Rig, script: list[object]) -> None:
    """``next()``, the relay's read: each call the bytes that arrived since the last (several
    pieces joined), None at the end; the connection is reused after a whole body."""
    body = b"".join(b"data: %d\n\n" % i for i in range(50))
    script.append([lambda req: chunked(body, size=5)])
    async with await rig.client.stream("POST", URL(rig.up.url()), b"{}", HEADERS) as stream:
        got = b""
        while (data := await stream.next()) is not None:
            assert data
            got += data
        assert got == body
        assert await stream.next() is None
    await rig.own()
    assert rig.up.connections == 1


async def test_next_raises_when_the_body_is_broken_off(rig: Rig, script: list[object]) -> None:
    script.append([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10, RESET])
    async with await rig.client.stream("POST", URL(rig.up.url()), b"{}", HEADERS) as stream:
        with pytest.raises(UpstreamError):
            while await stream.next() is not None:
                pass
