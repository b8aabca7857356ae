"""The publisher on a real nats-server: one event per record, outbox, NATS outages.

The contract tests run on both ways of publishing: the publisher's own raw
connection (``wire``) and the nats-py client (``nats-py``, the fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import json
import os
import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from support import HANG_S
from tollway.events import outbox as outbox_module
from tollway.events.broker import (
    EmbeddedNats,
    connect,
    ensure_stream,
    nats_server_binary,
    stream_config,
)
from tollway.events.metrics import EventMetrics
from tollway.events.outbox import Outbox
from tollway.events.publisher import Publisher
from tollway.events.schema import CallCompleted, CallFailed, CallRejected, event_from_record

from .helpers import make_record, read_stream


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


@pytest.fixture(params=[True, False], ids=["wire", "nats-py"])
def raw(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _via(raw: bool) -> str:
    return "wire" if raw else "nats-py"


async def _publisher(tmp_path: Path, nc: NatsClient | None, **kw: object) -> Publisher:
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    reg = CollectorRegistry()
    pub = Publisher(outbox, metrics=EventMetrics(reg), instance="test", **kw)  # type: ignore[arg-type]
    await pub.start(nc)
    return pub


async def _stop(pub: Publisher) -> None:
    await pub.stop()
    pub.outbox.close()


async def test_every_record_becomes_exactly_one_event(tmp_path: Path, nc: NatsClient,
                                                      raw: bool) -> None:
    pub = await _publisher(tmp_path, nc, raw=raw)
    outcomes = ["completed", "failed", "rejected"]
    for i in range(300):
        pub.submit(make_record(i, tenant=f"t{i % 3}", outcome=outcomes[i % 3]))  # type: ignore[arg-type]
    assert await pub.flush(10)
    msgs = await read_stream(nc)
    assert len(msgs) == 300
    events = [e for _, _, e in msgs]
    assert Counter(e.request_id for e in events if e) == {f"req-t{i % 3}-{i}": 1
                                                          for i in range(300)}
    # Nats-Msg-Id is the event id; the subject carries outcome and tenant.
    for _seq, headers, e in msgs:
        assert e is not None and headers["Nats-Msg-Id"] == e.event_id
    by_type = Counter(type(e) for e in events)
    assert by_type == {CallCompleted: 100, CallFailed: 100, CallRejected: 100}
    rejected = await read_stream(nc, "tollway.call.rejected.t2")
    assert len(rejected) == 100
    reg = pub.metrics.registry
    assert _value(reg, "tollway_events_published_total") == 300
    assert _value(reg, "tollway_events_duplicates_total") == 0
    assert pub.via == _via(raw)
    await _stop(pub)
    assert pub.outbox.pending == 0


def _lines(pub: Publisher) -> list[str]:
    """Request ids of the lines in the publisher's outbox file, as a restart would see them."""
    assert pub.outbox.path is not None
    return [json.loads(line.split(b"\t", 2)[2])["request_id"]
            for line in pub.outbox.path.read_bytes().splitlines()]


async def test_every_event_is_in_the_outbox_when_submit_returns(tmp_path: Path,
                                                                nc: NatsClient) -> None:
    pub = await _publisher(tmp_path, nc)
    for i in range(20):  # no await: nothing published yet
        pub.submit(make_record(i))
        assert _lines(pub) == [f"req-acme-{k}" for k in range(i + 1)], \
            "written before submit returns: a process killed now loses none of them"
    assert await pub.flush(10)
    assert len(await read_stream(nc)) == 20
    assert pub.outbox.pending == 0 and pub.outbox.unsent_bytes == 0, "all marked sent"
    await _stop(pub)


async def test_queue_overflow_goes_to_the_outbox_then_to_nats(tmp_path: Path, nc: NatsClient,
                                                               raw: bool) -> None:
    pub = await _publisher(tmp_path, nc, queue_size=25, raw=raw)
    for i in range(100):  # no await: the task cannot drain, the queue overflows
        pub.submit(make_record(i))
    reg = pub.metrics.registry
    assert _lines(pub) == [f"req-acme-{i}" for i in range(100)]
    assert _value(reg, "tollway_events_outbox_depth") == 100, "sent from the file from now on"
    assert _value(reg, "tollway_events_queue_depth") == 0
    assert await pub.flush(10)
    assert _value(reg, "tollway_events_spilled_total", reason="queue_full") == 100
    msgs = await read_stream(nc)
    ids = [e.request_id for _, _, e in msgs if e]
    assert ids == [f"req-acme-{i}" for i in range(100)], "order kept through the outbox"
    assert _value(reg, "tollway_events_dropped_total", reason="outbox_unwritable") == 0
    assert _value(reg, "tollway_events_outbox_depth") == 0
    pub.submit(make_record(100))  # the outbox is drained: back to publishing from memory
    assert pub.queued == 1
    assert await pub.flush(10)
    assert _value(reg, "tollway_events_spilled_total", reason="queue_full") == 100
    await _stop(pub)


@pytest.mark.timeout(30)  # a submit waiting for the fsync would wait for ever
async def test_the_response_path_never_waits_for_an_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def hanging_fsync(fd: int) -> None:  # the disk takes its time
        syncing.set()
        release.wait(20)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", hanging_fsync)
    pub = await _publisher(tmp_path, None)  # NATS down: the task syncs the outbox when idle
    pub.submit(make_record(0))
    for _ in range(400):
        if syncing.is_set():
            break
        await asyncio.sleep(0.005)
    assert syncing.is_set(), "the writer thread is inside fsync"
    for i in range(1, 60):  # calls keep settling: each submit returns at once
        pub.submit(make_record(i))
    assert _lines(pub) == [f"req-acme-{i}" for i in range(60)], "written while the disk syncs"
    release.set()
    await _stop(pub)
    assert pub.outbox.pending == 60


async def test_events_the_outbox_cannot_take_are_published_from_memory(
        tmp_path: Path, nc: NatsClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    pub = await _publisher(tmp_path, nc)
    monkeypatch.setattr(outbox_module, "_write_all", disk_full)
    for i in range(10):
        pub.submit(make_record(i))
    assert await pub.flush(10)
    reg = pub.metrics.registry
    assert [e.request_id for _, _, e in await read_stream(nc) if e] == [
        f"req-acme-{i}" for i in range(10)]
    assert _value(reg, "tollway_events_not_journaled_total", reason="outbox_unwritable") == 10
    assert _value(reg, "tollway_events_dropped_total", reason="outbox_unwritable") == 0
    await _stop(pub)


async def test_the_outbox_cap_drops_the_newest_counts_and_logs_them(
        tmp_path: Path, nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path / "outbox", max_bytes=8192)
    outbox.open()
    reg = CollectorRegistry()
    pub = Publisher(outbox, metrics=EventMetrics(reg), instance="test")
    await pub.start(None)  # NATS unreachable
    for i in range(100):
        pub.submit(make_record(i))
        if i % 10 == 9:
            await asyncio.sleep(0)

    def dropped() -> float:
        return _value(reg, "tollway_events_dropped_total", reason="outbox_full")

    # Refused events are dropped as the publisher finds NATS away, and logged: wait for
    # every event to be kept or counted (HANG_S is the hang detector, not a bound).
    deadline = time.monotonic() + HANG_S
    while (outbox.pending + dropped() < 100 or "reached its cap" not in caplog.text) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    kept, dropped_n = outbox.pending, dropped()
    assert 0 < kept < 100 and kept + dropped_n == 100, "every event kept or counted"
    assert outbox.unsent_bytes <= 8192
    assert _value(reg, "tollway_events_outbox_bytes") == outbox.unsent_bytes
    assert _value(reg, "tollway_events_outbox_max_bytes") == 8192
    assert "reached its cap of 8192" in caplog.text
    # NATS back: what was kept goes out, in order, and the outbox takes events again.
    client = await connect(nats_server.url)
    await ensure_stream(client.jetstream(), stream_config())
    await pub.attach(client)
    assert await pub.flush(10)
    pub.submit(make_record(100))
    assert await pub.flush(10)
    ids = [e.request_id for _, _, e in await read_stream(client) if e]
    assert ids == [f"req-acme-{i}" for i in range(kept)] + ["req-acme-100"]
    await _stop(pub)
    await client.close()


async def test_nats_down_then_back_stores_each_event_once(tmp_path: Path, raw: bool) -> None:
    srv = EmbeddedNats(tmp_path / "nats")
    srv.start()
    try:
        client = await connect(srv.url)
        await ensure_stream(client.jetstream(), stream_config())
        pub = await _publisher(tmp_path, client, publish_timeout_s=0.5, raw=raw)

        async def produce(start: int, n: int) -> None:
            for i in range(start, start + n):
                pub.submit(make_record(i))
                if i % 10 == 0:
                    await asyncio.sleep(0.002)

        await produce(0, 200)
        srv.kill()  # a crash: whatever was in flight has no ack
        await produce(200, 200)  # records keep flowing while NATS is away
        for _ in range(100):  # acks in flight time out (0.5 s), then it all goes to the outbox
            if pub.outbox.pending >= 200:
                break
            await asyncio.sleep(0.05)
        assert pub.outbox.pending >= 200
        srv.start()  # same port and store: the client reconnects
        await produce(400, 200)
        assert await pub.flush(20)
        msgs = await read_stream(client)
        counts = Counter(e.request_id for _, _, e in msgs if e)
        assert set(counts) == {f"req-acme-{i}" for i in range(600)}
        assert max(counts.values()) == 1, "no event stored twice"
        assert [e.request_id for _, _, e in msgs if e] == [f"req-acme-{i}" for i in range(600)], \
            "the batch in flight at the crash went to the outbox ahead of later events"
        assert pub.outbox.pending == 0
        assert pub.via == _via(raw)
        await _stop(pub)
        await client.close()
    finally:
        srv.stop()


async def test_outbox_survives_a_restart_of_the_gateway(tmp_path: Path, nats_server: EmbeddedNats,
                                                        raw: bool) -> None:
    # First process: NATS unreachable (never connected), events land in the outbox.
    pub = await _publisher(tmp_path, None)
    for i in range(50):
        pub.submit(make_record(i))
    await _stop(pub)
    assert pub.outbox.pending == 50
    # Second process: same data folder, NATS up: the outbox is sent first.
    client = await connect(nats_server.url)
    await ensure_stream(client.jetstream(), stream_config())
    pub2 = await _publisher(tmp_path, client, raw=raw)
    pub2.submit(make_record(50))
    assert await pub2.flush(10)
    msgs = await read_stream(client)
    assert [e.request_id for _, _, e in msgs if e] == [f"req-acme-{i}" for i in range(51)]
    await _stop(pub2)
    await client.close()


async def test_no_stream_is_recreated_and_nothing_is_lost(tmp_path: Path, nc: NatsClient,
                                                           raw: bool) -> None:
    js = nc.jetstream()

    async def recreate() -> None:
        await ensure_stream(js, stream_config())

    pub = await _publisher(tmp_path, nc, on_no_stream=recreate, publish_timeout_s=0.5, raw=raw)
    await js.delete_stream("TOLLWAY")
    for i in range(20):
        pub.submit(make_record(i))
    assert await pub.flush(10)
    msgs = await read_stream(nc)
    assert len(msgs) == 20
    assert pub.via == _via(raw)
    await _stop(pub)


async def test_records_after_shutdown_land_in_the_outbox(tmp_path: Path, nc: NatsClient,
                                                         raw: bool) -> None:
    pub = await _publisher(tmp_path, nc, raw=raw)
    pub.submit(make_record(0))
    await pub.stop()
    pub.submit(make_record(1))  # a call that settled while the app was shutting down
    assert pub.outbox.pending == 1
    reg = pub.metrics.registry
    assert _value(reg, "tollway_events_spilled_total", reason="shutdown") == 1
    pub.outbox.close()
    pub.submit(make_record(2))  # too late even for the outbox: counted, never silent
    assert _value(reg, "tollway_events_dropped_total", reason="outbox_unwritable") == 1
    assert len(await read_stream(nc)) == 1


# ---- acks: duplicates and refusals ----------------------------------------------------------
async def test_a_resent_event_is_acked_as_a_duplicate_and_stored_once(tmp_path: Path,
                                                                     nc: NatsClient,
                                                                     raw: bool) -> None:
    pub = await _publisher(tmp_path, nc, raw=raw)
    event = event_from_record(make_record(0), "dup-0123456789", "test")
    pub.submit(event)
    pub.submit(make_record(1))
    pub.submit(event)  # a resend, as from the outbox after a lost ack
    assert await pub.flush(10)
    msgs = await read_stream(nc)
    assert [e.request_id for _, _, e in msgs if e] == ["req-acme-0", "req-acme-1"]
    reg = pub.metrics.registry
    assert _value(reg, "tollway_events_published_total") == 3
    assert _value(reg, "tollway_events_duplicates_total") == 1
    assert pub.outbox.pending == 0
    await _stop(pub)


async def test_an_event_the_stream_refuses_is_dropped_and_counted(tmp_path: Path, nc: NatsClient,
                                                                  raw: bool) -> None:
    js = nc.jetstream()
    await js.update_stream(dataclasses.replace(stream_config(), max_msg_size=4096))
    pub = await _publisher(tmp_path, nc, raw=raw)
    pub.submit(make_record(0))
    pub.submit(make_record(1, outcome="failed", error_message="x" * 8000))  # a 400 from the stream
    pub.submit(make_record(2))
    assert await pub.flush(10)
    msgs = await read_stream(nc)
    assert [e.request_id for _, _, e in msgs if e] == ["req-acme-0", "req-acme-2"]
    reg = pub.metrics.registry
    assert _value(reg, "tollway_events_dropped_total", reason="rejected_by_stream") == 1
    assert _value(reg, "tollway_events_published_total") == 2
    assert pub.outbox.pending == 0, "a refusal is not retried forever"
    await _stop(pub)


async def test_an_event_larger_than_the_server_takes_is_dropped_not_sent(tmp_path: Path,
                                                                         raw: bool) -> None:
    srv = EmbeddedNats(tmp_path / "nats", max_payload=16 * 1024)
    srv.start()
    try:
        client = await connect(srv.url)
        await ensure_stream(client.jetstream(), stream_config())
        pub = await _publisher(tmp_path, client, raw=raw)
        for i in range(3):
            pub.submit(make_record(i, outcome="failed",
                                   error_message="x" * (40_000 if i == 1 else 10)))
        assert await pub.flush(10)
        # The server closes a connection that sends it more than max_payload: the publisher
        # never sends it, so the batch around it goes through on the first try.
        reg = pub.metrics.registry
        assert _value(reg, "tollway_events_dropped_total", reason="rejected_by_stream") == 1
        assert _value(reg, "tollway_events_spilled_total", reason="publish_failed") == 0
        msgs = await read_stream(client)
        assert [e.request_id for _, _, e in msgs if e] == ["req-acme-0", "req-acme-2"]
        await _stop(pub)
        await client.close()
    finally:
        srv.stop()


# ---- the raw connection: cut mid-batch, closed on stop, fallbacks ---------------------------
class _CuttingProxy:
    """A TCP proxy to the NATS server that cuts, once, the connection carrying the
    ``cut_at``-th HPUB frame, right after forwarding it: the server stores those events,
    their acks never come back, and the client sees a reset. With ``stall``, the connection
    stays open instead, and nothing the server says on it reaches the client any more."""

    def __init__(self, url: str, cut_at: int, *, stall: bool = False) -> None:
        host, _, port = url.rpartition("//")[2].rpartition(":")
        self.target = (host, int(port))
        self.cut_at: int | None = cut_at
        self.stall = stall
        self.hpubs = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for cw, sw in list(self._conns):
            cw.transport.abort()
            sw.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        conn = (cw, sw)
        self._conns.add(conn)
        state = "open"  # or "cut", "stalled"

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       upstream: bool) -> None:
            nonlocal state
            with contextlib.suppress(OSError):
                while data := await src.read(1 << 16):
                    if state == "cut":
                        return
                    if state == "stalled" and not upstream:
                        continue  # nothing the server says after the cut reaches the client
                    if upstream and self.cut_at is not None:
                        self.hpubs += data.count(b"HPUB ")
                        if self.hpubs >= self.cut_at:
                            self.cut_at = None
                            self.cuts += 1
                            state = "stalled" if self.stall else "cut"
                            dst.write(data)
                            await dst.drain()
                            if state == "cut":
                                return
                            continue
                    dst.write(data)
                    await dst.drain()

        pumps = [asyncio.create_task(pump(cr, sw, True)), asyncio.create_task(pump(sr, cw, False))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cw.transport.abort()  # the client sees a reset
            sw.close()  # the server reads what was forwarded, then the end
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._conns.discard(conn)


@contextlib.asynccontextmanager
async def _through_a_failing_proxy(tmp_path: Path, nats_server: EmbeddedNats, nc: NatsClient,
                                   *, stall: bool, **kw: Any) -> AsyncIterator[Publisher]:
    """400 records published through a proxy that fails the connection once mid-way: the
    stream holds each exactly once; the batch in flight went to the outbox, and what the
    server had stored came back as duplicates when resent. Yields the publisher to be
    stopped while its connection and the proxy are still up."""
    proxy = _CuttingProxy(nats_server.url, cut_at=150, stall=stall)
    client = await connect(await proxy.start())  # the gateway's connection goes through it
    try:
        pub = await _publisher(tmp_path, client, **kw)
        for i in range(400):
            pub.submit(make_record(i))
            if i % 20 == 19:
                await asyncio.sleep(0.002)
        assert await pub.flush(20)
        assert proxy.cuts == 1
        counts = Counter(e.request_id for _, _, e in await read_stream(nc) if e)
        assert set(counts) == {f"req-acme-{i}" for i in range(400)}, "nothing lost"
        assert max(counts.values()) == 1, "nothing stored twice"
        reg = pub.metrics.registry
        assert _value(reg, "tollway_events_spilled_total", reason="publish_failed") >= 1
        assert _value(reg, "tollway_events_duplicates_total") >= 1
        assert _value(reg, "tollway_events_published_total") == 400
        yield pub
    finally:
        await client.close()
        await proxy.close()


async def test_a_connection_cut_mid_batch_loses_nothing_and_stores_nothing_twice(
        tmp_path: Path, nats_server: EmbeddedNats, nc: NatsClient, raw: bool) -> None:
    async with _through_a_failing_proxy(tmp_path, nats_server, nc, stall=False, raw=raw,
                                        publish_timeout_s=1.0) as pub:
        assert pub.via == _via(raw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await _stop(pub)
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], \
            "the raw connection is closed on stop"


async def test_acks_that_stop_coming_time_out_and_the_batch_is_resent_once(
        tmp_path: Path, nats_server: EmbeddedNats, nc: NatsClient) -> None:
    # The raw connection only: nats-py keeps a stalled connection until its pings fail.
    async with _through_a_failing_proxy(tmp_path, nats_server, nc, stall=True,
                                        publish_timeout_s=0.5) as pub:
        assert pub.via == "wire", "a new raw connection after the silent one was given up"
        await _stop(pub)


def test_the_raw_connection_works_on_uvloop(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:  # the gateway serves on uvloop, whose transports differ
        client = await connect(nats_server.url)
        await ensure_stream(client.jetstream(), stream_config())
        pub = await _publisher(tmp_path, client)
        for i in range(100):
            pub.submit(make_record(i))
        assert await pub.flush(10)
        assert pub.via == "wire"
        assert len(await read_stream(client)) == 100
        await _stop(pub)
        await client.close()

    uvloop.run(scenario())


@contextlib.asynccontextmanager
async def _server_with(tmp_path: Path, conf: str) -> AsyncIterator[str]:
    """A JetStream nats-server with extra configuration; its host:port."""
    run = tmp_path / "custom-run"
    run.mkdir()
    path = tmp_path / "custom.conf"
    path.write_text(f'listen: "127.0.0.1:-1"\nports_file_dir: {json.dumps(str(run))}\n'
                    f'jetstream {{ store_dir: {json.dumps(str(tmp_path / "custom-js"))} }}\n'
                    + conf)
    proc = subprocess.Popen([nats_server_binary(), "-c", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            ports = list(run.glob("*.ports"))
            if ports and ports[0].read_text().strip():
                break
            await asyncio.sleep(0.05)
        url = json.loads(ports[0].read_text())["nats"][0]
        yield url.rpartition("//")[2]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_raw_connection_uses_the_clients_credentials_or_falls_back(
        tmp_path: Path) -> None:
    async with _server_with(tmp_path, 'authorization { token: "s3cret-token" }\n') as hostport:
        static = await nats.connect(f"nats://s3cret-token@{hostport}")
        # A token from a callback cannot be copied: the publisher stays on nats-py.
        dynamic = await nats.connect(f"nats://{hostport}", token=lambda: "s3cret-token")
        try:
            await ensure_stream(static.jetstream(), stream_config())
            for n, (client, via) in enumerate(((static, "wire"), (dynamic, "nats-py"))):
                pub = await _publisher(tmp_path / via, client)
                for i in range(n * 10, n * 10 + 10):
                    pub.submit(make_record(i))
                assert await pub.flush(10)
                assert pub.via == via
                assert _value(pub.metrics.registry, "tollway_events_published_total") == 10
                await _stop(pub)
            msgs = await read_stream(static)
            assert [e.request_id for _, _, e in msgs if e] == [f"req-acme-{i}"
                                                               for i in range(20)]
        finally:
            await static.close()
            await dynamic.close()


async def test_events_go_through_nats_py_while_the_raw_connection_is_refused(
        tmp_path: Path) -> None:
    async with _server_with(tmp_path, "max_connections: 1\n") as hostport:
        client = await connect(f"nats://{hostport}")  # takes the only connection
        try:
            await ensure_stream(client.jetstream(), stream_config())
            pub = await _publisher(tmp_path, client)
            for i in range(30):
                pub.submit(make_record(i))
            assert await pub.flush(10)
            assert pub.via == "nats-py"
            reg = pub.metrics.registry
            assert _value(reg, "tollway_events_published_total") == 30
            assert _value(reg, "tollway_events_spilled_total", reason="nats_down") == 0
            msgs = await read_stream(client)
            assert len(msgs) == 30
            await _stop(pub)
        finally:
            await client.close()
