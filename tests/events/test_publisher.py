"""The publisher on a real nats-server: one event per record, outbox, NATS outages."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from tollway.events.broker import EmbeddedNats, connect, ensure_stream, stream_config
from tollway.events.metrics import EventMetrics
from tollway.events.outbox import Outbox
from tollway.events.publisher import Publisher
from tollway.events.schema import CallCompleted, CallFailed, CallRejected

from .helpers import make_record, read_stream


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


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


async def test_every_record_becomes_exactly_one_event(tmp_path: Path, nc: NatsClient) -> None:
    pub = await _publisher(tmp_path, nc)
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
    await _stop(pub)
    assert pub.outbox.pending == 0


async def test_queue_overflow_goes_to_the_outbox_then_to_nats(tmp_path: Path,
                                                               nc: NatsClient) -> None:
    pub = await _publisher(tmp_path, nc, queue_size=10)
    for i in range(100):  # no await: the task cannot drain, the queue overflows
        pub.submit(make_record(i))
    assert pub.outbox.pending >= 90
    reg = pub.metrics.registry
    assert _value(reg, "tollway_events_spilled_total", reason="queue_full") >= 90
    assert await pub.flush(10)
    msgs = await read_stream(nc)
    ids = [e.request_id for _, _, e in msgs if e]
    assert sorted(ids) == sorted(f"req-acme-{i}" for i in range(100))
    assert ids == [f"req-acme-{i}" for i in range(100)], "order kept through the outbox"
    assert _value(reg, "tollway_events_dropped_total", reason="outbox_unwritable") == 0
    await _stop(pub)


async def test_nats_down_then_back_stores_each_event_once(tmp_path: Path) -> None:
    srv = EmbeddedNats(tmp_path / "nats")
    srv.start()
    try:
        client = await connect(srv.url)
        await ensure_stream(client.jetstream(), stream_config())
        pub = await _publisher(tmp_path, client, publish_timeout_s=0.5)

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
        assert pub.outbox.pending == 0
        await _stop(pub)
        await client.close()
    finally:
        srv.stop()


async def test_outbox_survives_a_restart_of_the_gateway(tmp_path: Path,
                                                        nats_server: EmbeddedNats) -> None:
    # First process: NATS unreachable (never connected), events land in the outbox.
    pub = await _publisher(tmp_path, None)
    for i in range(50):
        pub.submit(make_record(i))
    await _stop(pub)
    assert pub.outbox.pending == 50
    # Second process: same data folder, NATS up: the outbox is sent first.
    client = await connect(nats_server.url)
    await ensure_stream(client.jetstream(), stream_config())
    pub2 = await _publisher(tmp_path, client)
    pub2.submit(make_record(50))
    assert await pub2.flush(10)
    msgs = await read_stream(client)
    assert [e.request_id for _, _, e in msgs if e] == [f"req-acme-{i}" for i in range(51)]
    await _stop(pub2)
    await client.close()


async def test_no_stream_is_recreated_and_nothing_is_lost(tmp_path: Path,
                                                           nc: NatsClient) -> None:
    js = nc.jetstream()

    async def recreate() -> None:
        await ensure_stream(js, stream_config())

    pub = await _publisher(tmp_path, nc, on_no_stream=recreate, publish_timeout_s=0.5)
    await js.delete_stream("TOLLWAY")
    for i in range(20):
        pub.submit(make_record(i))
    assert await pub.flush(10)
    msgs = await read_stream(nc)
    assert len(msgs) == 20
    await _stop(pub)


async def test_records_after_shutdown_land_in_the_outbox(tmp_path: Path, nc: NatsClient) -> None:
    pub = await _publisher(tmp_path, nc)
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
