"""The publish wire's parser: every reply it handles, cut at every byte, reads as uncut.

TCP hands a reader bytes in pieces of any size; a parser that loses track at a piece
boundary settles an ack on the wrong event or none. These tests feed one transcript of
everything the wire handles (handshake, PING, +OK, -ERR, a second INFO, acks in every
form, frames for others, late acks, payloads holding protocol text) to the parser in
pieces, on a real socket (what the wire writes back is read from its peer), and compare
the outcome with the transcript fed whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from typing import NamedTuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollway.events.nats.bulk import BulkReader, Endpoint
from tollway.events.nats.wire import DUP, FATAL, OK, RETRY, PublishWire
from tollway.events.outbox import OutboxEntry

INFO = b'INFO {"server_id":"x","version":"2.10.0","headers":true,"max_payload":1048576}\r\n'
HANDSHAKE = INFO + b"+OK\r\nPING\r\nPONG\r\n"
ENTRIES = [OutboxEntry("tollway.call.completed.t", f"id{i}", b'{"i":%d}' % i) for i in range(8)]
EXPECTED = [OK, DUP, FATAL, RETRY, RETRY, OK, OK, RETRY]


def _msg(subject: bytes, body: bytes, reply: bytes = b"") -> bytes:
    return b"MSG %s 1 %s%d\r\n%s\r\n" % (subject, reply + b" " if reply else b"", len(body),
                                         body)


def _hmsg(subject: bytes, hdr: bytes, body: bytes) -> bytes:
    return b"HMSG %s 1 %d %d\r\n%s%s\r\n" % (subject, len(hdr), len(hdr) + len(body), hdr,
                                             body)


def replies(prefix: bytes) -> bytes:
    """The server's side after the batch of ENTRIES went out with reply ``prefix<n>``,
    tokens 1..8, one ack of each form (EXPECTED), with other frames in between."""
    r = [prefix + b"%d" % n for n in range(1, 9)]
    return b"".join([
        _msg(r[0], b'{"stream":"TOLLWAY","seq":1}'),
        b"ping\r\n",  # any case
        _msg(r[1], b'{"stream":"TOLLWAY","seq":1,"duplicate": true}'),
        _msg(b"elsewhere.x", b"MSG " + r[2] + b" 1 2\r\n{}\r\n"),  # protocol text as payload
        _msg(r[2], b'{"error":{"code":400,"err_code":10054,"description":"too big"}}'),
        b"+OK\r\n",
        _msg(r[3], b'{"error":{"code":503,"description":"stream offline"}}'),
        _hmsg(r[4], b"NATS/1.0 503\r\n\r\n", b""),  # no responders: no stream listens
        b"-ERR 'Slow Consumer'\r\n",
        _hmsg(r[5], b"NATS/1.0\r\nX-Trace: a\r\n\r\n", b'{"stream":"TOLLWAY","seq":2}'),
        _msg(prefix + b"99", b'{"stream":"TOLLWAY","seq":9}'),  # an ack for no entry
        INFO,  # a later INFO (cluster change) is not a second handshake
        _msg(r[6], b'{"stream":"TOLLWAY","seq":3}', reply=b"_INBOX.r"),  # with a reply
        b"PING\r\n",
        _hmsg(r[7], b"NATS/1.0 408 Request Timeout\r\n\r\n", b""),
    ])


TOTAL = len(HANDSHAKE) + len(replies(b"_INBOX." + b"0" * 22 + b"."))  # the wire's inbox form


class Outcome(NamedTuple):
    results: list[int]
    no_responders: int
    errors: list[str]
    server_info: dict[str, object]
    sent: bytes  # what the wire wrote after the batch (PONGs)
    closed: bool


async def _drain(peer: socket.socket, wire: PublishWire) -> bytes:
    """What the wire wrote so far. An older uvloop (0.19) buffers the first writes of a
    transport made from a socket until the loop runs, so wait until it has none left."""
    transport = wire._transport
    for _ in range(1000):
        if transport is None or transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.001)
    out = b""
    while True:
        try:
            data = peer.recv(1 << 16)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


async def feed(cuts: set[int]) -> Outcome:
    """A wire on a socket pair, fed HANDSHAKE + replies cut at ``cuts`` (offsets into
    the whole); the batch of ENTRIES is published between the two."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    wire = PublishWire("split test")
    await asyncio.get_running_loop().create_connection(lambda: wire, sock=ours)
    try:
        pieces = sorted(c for c in cuts if 0 < c < len(HANDSHAKE))
        for a, b in zip([0, *pieces], [*pieces, len(HANDSHAKE)], strict=True):
            wire.data_received(HANDSHAKE[a:b])
        sub = re.search(rb"SUB (\S+)\* 1\r\n", await _drain(peer, wire))
        assert sub is not None, "the handshake subscribes to the ack inbox"
        publishing = asyncio.create_task(wire.publish(ENTRIES, timeout=5.0))
        await asyncio.sleep(0)  # the batch is written; publish waits for the acks
        assert (await _drain(peer, wire)).count(b"HPUB ") == len(ENTRIES)
        data = replies(sub[1])
        offset = len(HANDSHAKE)
        pieces = sorted(c - offset for c in cuts if 0 < c - offset < len(data))
        for a, b in zip([0, *pieces], [*pieces, len(data)], strict=True):
            wire.data_received(data[a:b])
        results = await publishing
        return Outcome(results, wire.no_responders, list(wire.errors), wire.server_info,
                       await _drain(peer, wire), wire.closed)
    finally:
        await wire.close()
        peer.close()


async def test_the_transcript_whole_settles_every_ack_as_its_form_says() -> None:
    whole = await feed(set())
    assert whole.results == EXPECTED
    assert whole.no_responders == 1
    assert whole.errors == ["Slow Consumer"]
    assert whole.server_info["version"] == "2.10.0"
    assert whole.sent == b"PONG\r\nPONG\r\n"  # one per PING of the replies
    assert not whole.closed


async def test_every_single_cut_reads_as_the_whole() -> None:
    whole = await feed(set())
    for cut in range(1, TOTAL):
        assert await feed({cut}) == whole, f"cut at byte {cut}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(min_value=1, max_value=TOTAL - 1), max_size=40))
def test_any_cuts_read_as_the_whole(cuts: set[int]) -> None:
    async def both() -> tuple[Outcome, Outcome]:
        return await feed(set()), await feed(cuts)

    whole, cut = asyncio.run(both())
    assert cut == whole


def test_the_transcript_is_valid_json_where_it_says_so() -> None:
    # The acks' bodies are what nats-server sends; a typo would test a different reply.
    bodies = re.findall(rb"\r\n(\{.*?\})\r\n", replies(b"_INBOX.x."))
    assert len(bodies) == 8
    for body in bodies:
        json.loads(body)


# ---- the bulk reader ---------------------------------------------------------------------
class _Handshaker:
    """A loopback server that does the NATS handshake (INFO, PONG for each PING) and keeps
    what the client sends; the test hands the client everything else at its parser."""

    def __init__(self) -> None:
        self.received = b""
        self._pongs = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Endpoint:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return Endpoint("127.0.0.1", self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(INFO)
        with contextlib.suppress(OSError):
            while data := await r.read(1 << 16):
                self.received += data
                if self._pongs < 1 and b"PING\r\n" in self.received:
                    self._pongs = 1
                    w.write(b"PONG\r\n")
        w.close()


def _delivery(subject: bytes, sseq: int, cseq: int, pending: int, body: bytes, *,
              long_form: bool = False) -> bytes:
    ack = (b"$JS.ACK.hub.ACCHASH.TOLLWAY.C1.1.%d.%d.1700000000000000000.%d.x7"
           if long_form else b"$JS.ACK.TOLLWAY.C1.1.%d.%d.1700000000000000000.%d")
    hdr = b"NATS/1.0\r\nNats-Msg-Id: e%d\r\n\r\n" % sseq
    return b"HMSG %s 2 %s %d %d\r\n%s%s\r\n" % (subject, ack % (sseq, cseq, pending), len(hdr),
                                               len(hdr) + len(body), hdr, body)


def bulk_replies(inbox: bytes) -> bytes:
    """The server's side of a read of stream sequences 1..7 (3 and 6 deleted)."""
    d = inbox + b".d.2"  # the read's delivery subject (subscription 2)
    fc = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
    stalled = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Consumer-Stalled: $JS.FC.TOLLWAY.st\r\n\r\n"
    return b"".join([
        _msg(inbox + b".1", b'{"name":"C1","num_pending":5}'),  # the consumer was created
        _delivery(d, 1, 1, 4, b'{"n":1}'),
        b"PING\r\n",
        _delivery(d, 2, 2, 3, b'{"n":2}'),
        b"HMSG %s 2 $JS.FC.TOLLWAY.fc %d %d\r\n%s\r\n" % (d, len(fc), len(fc), fc),
        _msg(inbox + b".d.1", b"a read gone by"),  # a subscription of no read: ignored
        _delivery(d, 4, 3, 2, b'{"n":4}', long_form=True),  # domain and account in the ack
        b"+OK\r\n",
        _delivery(d, 5, 4, 1, b"HMSG x 2 9 9\r\n\r\nMSG y 1 0\r\n"),  # protocol text as data
        b"HMSG %s 2 %d %d\r\n%s\r\n" % (d, len(stalled), len(stalled), stalled),
        _delivery(d, 7, 5, 0, b'{"n":7}'),
    ])


class BulkOutcome(NamedTuple):
    seqs: list[int]
    payloads: list[bytes]
    flow_controls: int
    answers: list[bytes]  # what the reader said back, in order (PONG, flow control)


async def bulk_feed(cuts: set[int]) -> BulkOutcome:
    server = _Handshaker()
    reader = await BulkReader.connect(await server.start(), timeout=5.0)
    try:
        sub = re.search(rb"SUB (\S+)\.\* 1\r\n", server.received)
        assert sub is not None
        seqs: list[int] = []
        payloads: list[bytes] = []

        async def read() -> None:
            async with contextlib.aclosing(reader.read("TOLLWAY", stop_seq=7)) as batches:
                async for batch in batches:
                    seqs.extend(batch.seqs)
                    payloads.extend(batch.payloads)

        reading = asyncio.create_task(read())
        while b"CONSUMER.CREATE" not in server.received:
            await asyncio.sleep(0.001)
        seen = len(server.received)
        data = bulk_replies(sub[1])
        pieces = sorted(c for c in cuts if 0 < c < len(data))
        for a, b in zip([0, *pieces], [*pieces, len(data)], strict=True):
            reader._conn.data_received(data[a:b])
            while reader._conn.chunks and not reading.done():  # parsed before the next piece
                await asyncio.sleep(0)
        await reading
        await reader.close()
        while b"CONSUMER.DELETE" not in server.received:  # all it wrote has arrived
            await asyncio.sleep(0.001)
        answers = re.findall(rb"PONG|PUB \$JS\.FC\.\S+", server.received[seen:])
        return BulkOutcome(seqs, payloads, reader.flow_controls, answers)
    finally:
        await reader.close()
        await server.close()


BULK_TOTAL = len(bulk_replies(b"_INBOX." + b"0" * 16))


async def test_the_bulk_transcript_whole_reads_every_delivery_once() -> None:
    whole = await bulk_feed(set())
    assert whole.seqs == [1, 2, 4, 5, 7]
    assert whole.payloads[3] == b"HMSG x 2 9 9\r\n\r\nMSG y 1 0\r\n"
    assert whole.flow_controls == 2
    assert whole.answers == [b"PONG", b"PUB $JS.FC.TOLLWAY.fc", b"PUB $JS.FC.TOLLWAY.st"]


async def test_every_single_cut_of_the_bulk_transcript_reads_as_the_whole() -> None:
    whole = await bulk_feed(set())
    for cut in range(1, BULK_TOTAL):
        assert await bulk_feed({cut}) == whole, f"cut at byte {cut}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.integers(min_value=1, max_value=BULK_TOTAL - 1), max_size=40))
def test_any_cuts_of_the_bulk_transcript_read_as_the_whole(cuts: set[int]) -> None:
    async def both() -> tuple[BulkOutcome, BulkOutcome]:
        return await bulk_feed(set()), await bulk_feed(cuts)

    whole, cut = asyncio.run(both())
    assert cut == whole
