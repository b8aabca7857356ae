"""The bulk stream reader against a real nats-server: every message, in order, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient

import tollway.events.nats.bulk
from support import panics_once
from tollway.events.broker import (
    EmbeddedNats,
    connect,
    ensure_kv,
    ensure_stream,
    nats_server_binary,
    stream_config,
)
from tollway.events.nats.bulk import Batch, BulkError, BulkReader, BulkUnavailable, Endpoint
from tollway.events.nats.wire import PublishWire
from tollway.events.projections import default_projections
from tollway.events.projections.runner import ProjectionRunner
from tollway.events.replay import replay
from tollway.events.schema import STREAM, decode

from .conftest import FIXTURES


def fixture_lines() -> list[bytes]:
    return (FIXTURES / "calls.jsonl").read_bytes().splitlines()


async def publish_lines(nc: NatsClient, lines: list[bytes]) -> None:
    js = nc.jetstream()
    for start in range(0, len(lines), 200):
        futs = []
        for line in lines[start:start + 200]:
            e = decode(line)
            assert e is not None
            futs.append(await js.publish_async(e.subject(), line,
                                               headers={"Nats-Msg-Id": e.event_id}))
        await asyncio.gather(*futs)


def pure_fold(messages: list[tuple[int, bytes]]) -> list[Any]:
    projs = default_projections()
    for seq, line in messages:
        e = decode(line)
        assert e is not None
        for p in projs:
            p.apply(seq, e)
    return projs


async def read_all(target: Any, **kw: Any) -> tuple[list[int], list[bytes], BulkReader]:
    reader = await BulkReader.connect(target)
    seqs: list[int] = []
    payloads: list[bytes] = []
    try:
        async with contextlib.aclosing(reader.read(STREAM, **kw)) as batches:
            async for batch in batches:
                assert isinstance(batch, Batch) and batch.seqs
                assert len(batch.seqs) == len(batch.payloads)
                seqs += batch.seqs
                payloads += batch.payloads
    finally:
        await reader.close()
    return seqs, payloads, reader


async def consumers(nc: NatsClient) -> int:
    return (await nc.jetstream().stream_info(STREAM)).state.consumer_count


async def wait_no_consumers(nc: NatsClient) -> None:
    async with asyncio.timeout(5):
        while await consumers(nc):
            await asyncio.sleep(0.05)


# ---- the reader --------------------------------------------------------------------------------
async def test_reads_every_message_in_order_with_its_sequence(nc: NatsClient) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    seqs, payloads, _ = await read_all(nc)
    assert seqs == list(range(1, len(lines) + 1))
    assert payloads == lines
    await wait_no_consumers(nc)  # the reader deleted its consumer


async def test_deleted_messages_are_skipped_in_the_middle_and_at_the_end(nc: NatsClient) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    js = nc.jetstream()
    gone = {2, 3, 100, 101, 102, 400, len(lines) - 1, len(lines)}
    for seq in gone:
        assert await js.delete_msg(STREAM, seq)
    want = [(s, line) for s, line in enumerate(lines, 1) if s not in gone]
    seqs, payloads, _ = await read_all(nc)  # stops at the stream's last_seq (deleted)
    assert list(zip(seqs, payloads, strict=True)) == want
    seqs, payloads, _ = await read_all(nc, start_seq=99, stop_seq=103)
    assert seqs == [99, 103] and payloads == [lines[98], lines[102]]


async def test_a_start_in_the_middle_and_a_stop_before_the_end(nc: NatsClient) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    seqs, payloads, _ = await read_all(nc, start_seq=300, stop_seq=512)
    assert seqs == list(range(300, 513)) and payloads == lines[299:512]
    seqs, _, _ = await read_all(nc, start_seq=len(lines))
    assert seqs == [len(lines)]
    seqs, _, _ = await read_all(nc, start_seq=len(lines) + 1)
    assert seqs == []


async def test_an_empty_stream_and_an_empty_range(nc: NatsClient) -> None:
    seqs, payloads, _ = await read_all(nc)
    assert seqs == [] and payloads == []
    await publish_lines(nc, fixture_lines()[:10])
    seqs, _, _ = await read_all(nc, start_seq=7, stop_seq=6)
    assert seqs == []
    js = nc.jetstream()
    await js.purge_stream(STREAM)  # first_seq 11, last_seq 10: nothing left at all
    seqs, _, _ = await read_all(nc)
    assert seqs == []
    await wait_no_consumers(nc)


async def test_any_payload_and_headers_come_back_byte_for_byte(nc: NatsClient) -> None:
    js = nc.jetstream()
    odd = [
        b"",  # empty
        b"no headers at all",  # a MSG frame, not HMSG
        b"\r\nHMSG tollway.x 2 $JS.ACK.TOLLWAY.c.1.9.9.1.0 10 20\r\nNATS/1.0\r\n\r\n",
        bytes(range(256)) * 40,  # binary, CRLFs included
        b"x" * 70_000,  # larger than one read of the socket
    ]
    await js.publish("tollway.t.a", odd[0], headers={"Nats-Msg-Id": "a"})
    await js.publish("tollway.t.b", odd[1])
    await js.publish("tollway.t.c", odd[2], headers={"Nats-Msg-Id": "c", "X-Other": "1 2 3"})
    await js.publish("tollway.t.d", odd[3], headers={"A": "b", "C": "d", "E": "f"})
    await js.publish("tollway.t.e", odd[4])
    seqs, payloads, _ = await read_all(nc)
    assert seqs == [1, 2, 3, 4, 5] and payloads == odd


async def test_flow_control_is_answered_on_a_read_larger_than_its_window(
        nc: NatsClient) -> None:
    # The server asks at 16 MiB in flight and stops at 32 MiB until answered.
    js = nc.jetstream()
    body = b"y" * 16_000
    for start in range(0, 2600, 200):
        futs = [await js.publish_async(f"tollway.t.{i % 7}", body)
                for i in range(start, start + 200)]
        await asyncio.gather(*futs)
    seqs, payloads, reader = await read_all(nc)
    assert seqs == list(range(1, 2601))
    assert all(p == body for p in payloads)
    assert reader.flow_controls >= 1


async def test_leaving_a_read_early_deletes_its_consumer(nc: NatsClient) -> None:
    await publish_lines(nc, fixture_lines())
    reader = await BulkReader.connect(nc)
    async with contextlib.aclosing(reader.read(STREAM, batch_bytes=4096)) as batches:
        async for batch in batches:
            assert batch.seqs[0] == 1
            assert await consumers(nc) == 1
            break
    await wait_no_consumers(nc)
    # The connection is still good for another read.
    async with contextlib.aclosing(reader.read(STREAM, start_seq=600)) as batches:
        got = [s async for b in batches for s in b.seqs]
    assert got == list(range(600, len(fixture_lines()) + 1))
    await reader.close()


async def test_a_missing_stream_is_an_error(nc: NatsClient) -> None:
    reader = await BulkReader.connect(nc)
    with pytest.raises(BulkError, match="stream not found"):
        async with contextlib.aclosing(reader.read("NOPE")) as batches:
            async for _ in batches:
                pass
    await reader.close()


def test_endpoints_from_urls() -> None:
    assert Endpoint.from_url("nats://127.0.0.1:4333") == Endpoint("127.0.0.1", 4333)
    assert Endpoint.from_url("nats://u:p@h:1") == Endpoint("h", 1, user="u", password="p")
    assert Endpoint.from_url("nats://s3cret@h") == Endpoint("h", 4222, token="s3cret")
    assert Endpoint.from_url("localhost:5") == Endpoint("localhost", 5)
    for url in ("tls://h:4222", "ws://h:80"):
        with pytest.raises(BulkUnavailable):
            Endpoint.from_url(url)


# ---- authentication: a server started with credentials ----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def auth_server(tmp_path: Path, *args: str) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js",
                             "-sd", str(tmp_path / "js"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=0.2) as s:
                if s.recv(4) == b"INFO":
                    break
            proc.poll()
            assert proc.returncode is None, "nats-server exited"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def client(url: str, **kw: Any) -> AsyncIterator[NatsClient]:
    c = await nats.connect(url, connect_timeout=2, allow_reconnect=False, **kw)
    try:
        js = c.jetstream()
        await ensure_stream(js, stream_config())
        await ensure_kv(js)
        yield c
    finally:
        await c.close()


async def test_user_and_password_from_the_url(tmp_path: Path) -> None:
    lines = fixture_lines()[:50]
    with auth_server(tmp_path, "--user", "tollway", "--pass", "pa55") as port:
        async with client(f"nats://tollway:pa55@127.0.0.1:{port}") as nc:
            await publish_lines(nc, lines)
            seqs, payloads, _ = await read_all(nc)
            assert seqs == list(range(1, 51)) and payloads == lines
            with pytest.raises(BulkError, match=r"(?i)authorization"):
                await BulkReader.connect(f"nats://tollway:wrong@127.0.0.1:{port}")


async def test_a_token_from_the_url_and_a_callable_token_falls_back(tmp_path: Path) -> None:
    lines = fixture_lines()
    with auth_server(tmp_path, "--auth", "t0ken") as port:
        async with client(f"nats://t0ken@127.0.0.1:{port}") as nc:
            await publish_lines(nc, lines)
            seqs, _, _ = await read_all(nc)
            assert seqs == list(range(1, len(lines) + 1))
        # A token nats-py computes per connection cannot be reused: replay uses nats-py.
        async with client(f"nats://127.0.0.1:{port}", token=lambda: "t0ken") as nc:
            with pytest.raises(BulkUnavailable):
                await BulkReader.connect(nc)
            result = await replay(nc, save=False)
            assert result.messages == len(lines) and result.bulk_messages == 0
            want = [p.view for p in pure_fold(list(enumerate(lines, 1)))]
            assert [p.view for p in result.projections] == want
            runner = ProjectionRunner(nc, default_projections(), bulk_min_backlog=1)
            await runner.start()
            assert await runner.catch_up(10)
            assert runner.bulk_applied == 0 and runner.applied == len(lines)
            assert runner.tail == "nats-py"
            assert [p.view for p in runner.projections] == want
            await runner.stop()


# ---- replay and the runner's catch-up ------------------------------------------------------
async def test_a_bulk_replay_equals_a_nats_py_replay_and_the_pure_fold(nc: NatsClient) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    js = nc.jetstream()
    for seq in (5, 6, 333):
        await js.delete_msg(STREAM, seq)
    kept = [(s, line) for s, line in enumerate(lines, 1) if s not in (5, 6, 333)]
    kv = await js.key_value("tollway_checkpoints")
    fast = await replay(nc, kv=kv)
    assert fast.bulk_messages == fast.messages == len(kept)
    assert fast.last_seq == len(lines)
    slow = await replay(nc, save=False, bulk=False)
    assert slow.bulk_messages == 0 and slow.messages == len(kept)
    want = [p.view for p in pure_fold(kept)]
    assert [p.view for p in fast.projections] == want
    assert [p.view for p in slow.projections] == want
    # The checkpoints it wrote are what a starting runner resumes from.
    runner = ProjectionRunner(nc, default_projections(), kv=kv)
    await runner.load_checkpoints()
    assert [p.view for p in runner.projections] == want


async def test_the_runner_catches_up_in_bulk_then_follows_live(nc: NatsClient) -> None:
    lines = fixture_lines()
    kv = await nc.jetstream().key_value("tollway_checkpoints")
    await publish_lines(nc, lines[:400])
    first = ProjectionRunner(nc, default_projections(), kv=kv, bulk_min_backlog=100)
    await first.start()
    assert not first.subscribed  # the backlog is folded in bulk first
    assert await first.catch_up(10)
    async with asyncio.timeout(5):
        while not first.caught_up:  # then it subscribes after the last sequence
            await asyncio.sleep(0.01)
    assert first.bulk_applied == 400 and first.tail == "reader"
    await publish_lines(nc, lines[400:500])  # live, through a reader in follow mode
    assert await first.wait_for(500, 10)
    assert first.bulk_applied == 400 and first.applied == 500
    await first.stop()  # checkpoints at 500
    await publish_lines(nc, lines[500:])
    second = ProjectionRunner(nc, default_projections(), kv=kv, bulk_min_backlog=100)
    await second.start()
    assert await second.catch_up(10)
    assert second.bulk_applied == second.applied == len(lines) - 500
    assert [p.view for p in second.projections] == [
        p.view for p in pure_fold(list(enumerate(lines, 1)))]
    await second.stop()


async def test_the_live_tail_restarts_where_it_stopped_then_falls_back_to_nats_py(
        nc: NatsClient) -> None:
    lines = fixture_lines()
    runner = ProjectionRunner(nc, default_projections(), idle_heartbeat_s=0.5)
    await runner.start()

    cut: list[BulkReader] = []

    async def cut_the_readers_connection() -> None:
        async with asyncio.timeout(5):  # a reader following, not one already cut
            while (runner._reader is None or not runner._reader.consumer
                   or runner._reader in cut):
                await asyncio.sleep(0.01)
        cut.append(runner._reader)
        transport = runner._reader._conn.transport
        assert transport is not None
        transport.abort()  # as if the server had dropped it

    await publish_lines(nc, lines[:100])
    assert await runner.wait_for(100, 10) and runner.tail == "reader"
    await cut_the_readers_connection()
    await publish_lines(nc, lines[100:200])
    assert await runner.wait_for(200, 10), "a new reader goes on from sequence 101"
    assert runner.tail == "reader"
    for _ in range(3):  # three failures in a row with NATS up ...
        await cut_the_readers_connection()
    async with asyncio.timeout(5):
        while runner.tail != "nats-py":  # ... and nats-py follows for a while instead
            await asyncio.sleep(0.01)
    await publish_lines(nc, lines[200:])
    assert await runner.wait_for(len(lines), 10)
    assert runner.applied == len(lines), "nothing folded twice across the restarts"
    assert [p.view for p in runner.projections] == [
        p.view for p in pure_fold(list(enumerate(lines, 1)))]
    await runner.stop()


async def test_feed_batch_is_feed_message_by_message(nc: NatsClient) -> None:
    lines = fixture_lines()
    # Not an event, a type this version does not know, and a newer schema version.
    odd = {50: b"{not json", 51: b'{"type":"call.teleported","event_id":"x","occurred_at":1}',
           52: lines[51].replace(b'"schema_version":1', b'"schema_version":99')}
    payloads = [odd.get(i, line) for i, line in enumerate(lines)]
    seqs = list(range(1, len(lines) + 1))
    one = ProjectionRunner(nc, default_projections())
    for seq, data in zip(seqs, payloads, strict=True):
        one.feed(seq, data)
    batch = ProjectionRunner(nc, default_projections())
    for start in range(0, len(seqs), 97):
        batch.feed_batch(seqs[start:start + 97], payloads[start:start + 97])
    assert [p.view for p in batch.projections] == [p.view for p in one.projections]
    assert (batch.last_seq, batch.applied, batch.decode_errors) == (len(lines), len(lines), 1)
    assert (one.last_seq, one.applied, one.decode_errors) == (len(lines), len(lines), 1)


async def test_a_url_is_enough(nats_server: EmbeddedNats) -> None:
    async with client(nats_server.url) as nc:
        await publish_lines(nc, fixture_lines()[:3])
    seqs, payloads, _ = await read_all(nats_server.url)
    assert seqs == [1, 2, 3] and payloads == fixture_lines()[:3]


async def test_a_panic_in_the_frame_scanner_leaves_the_views_to_nats_py(
        nc: NatsClient, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = fixture_lines()[:400]
    await publish_lines(nc, lines)
    monkeypatch.setattr(tollway.events.nats.bulk, "scan_js_deliveries",
                        panics_once(tollway.events.nats.bulk.scan_js_deliveries))
    runner = ProjectionRunner(nc, default_projections(), bulk_min_backlog=100)
    await runner.start()
    assert await runner.catch_up(10)
    assert runner.bulk_applied == 0 and runner.applied == len(lines)  # all through nats-py
    assert [p.view for p in runner.projections] == [
        p.view for p in pure_fold(list(enumerate(lines, 1)))]
    await runner.stop()


async def test_the_nodes_of_a_cluster_are_tried_in_turn(nats_server: EmbeddedNats,
                                                         nc: NatsClient) -> None:


    with socket.socket() as s:  # a port nobody listens on: a node that is down
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    live = Endpoint.from_url(nats_server.url)
    # The client's server first, then the rest of its pool, with its credentials.
    client = await connect([nats_server.url, f"nats://127.0.0.1:{dead}"])
    try:
        eps = Endpoint.all_of_client(client)
        assert [(e.host, e.port) for e in eps] == [(live.host, live.port), ("127.0.0.1", dead)]
        reader = await BulkReader.connect(client)
        await reader.close()
    finally:
        await client.close()
    wire = await PublishWire.open_any([Endpoint("127.0.0.1", dead), live], timeout=5.0)
    try:
        assert not wire.closed and wire.server_info.get("port") == live.port
    finally:
        await wire.close()
    with pytest.raises(BulkError):
        await PublishWire.open_any([Endpoint("127.0.0.1", dead)], timeout=5.0)
