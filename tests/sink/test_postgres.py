"""The sink into a real PostgreSQL from a real nats-server: every event once, typed columns,
the position committed with the rows, the daily views."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import msgspec
import psycopg
import pytest
from nats.aio.client import Client as NatsClient

from tollway.events import synthetic
from tollway.events.broker import EmbeddedNats
from tollway.events.schema import (
    CallCompleted,
    CallEvent,
    Event,
    KeyCreated,
    ShadowCompared,
    TenantCreated,
    TenantSettings,
    encode,
)
from tollway.sink.postgres import PostgresSink

from .conftest import publish


def _events(calls: int, seed: int = 7) -> list[Event]:
    return list(synthetic.events(calls, seed=seed))


async def _sink_all(nc: NatsClient, dsn: str, **kw: object) -> PostgresSink:
    sink = PostgresSink(nc, dsn, migrate=True, **kw)  # type: ignore[arg-type]
    await sink.run(until_caught_up=True)
    return sink


async def test_every_event_once_with_typed_columns(nc: NatsClient, dsn: str) -> None:
    evs = _events(400)
    admin = [
        TenantCreated(event_id="adm-1", occurred_at=synthetic.DAY0, tenant="acme",
                      admin="sha256:abc", settings=TenantSettings(tier="premium")),
        KeyCreated(event_id="adm-2", occurred_at=synthetic.DAY0 + 1, tenant="acme",
                   key_id="k1", key_sha256="f" * 64, prefix="tw-ab"),
    ]
    shadow = ShadowCompared(event_id="sh-1", occurred_at=synthetic.DAY0 + 2, tenant="acme",
                            route="auto", candidate_model="m2", agreement=0.5, agreed=False)
    n = await publish(nc, [*evs, *admin, shadow])
    # Bytes that are not an event, and an event of a type this version does not know.
    js = nc.jetstream()
    await js.publish("tollway.call.completed.acme", b"not json")
    await js.publish("tollway.future.thing.acme",
                     b'{"type":"future.thing","event_id":"fut-1","schema_version":9}')
    sink = await _sink_all(nc, dsn, batch_size=97)
    assert sink.stats.committed_seq == n + 2
    assert sink.stats.batches > 1
    calls = [e for e in evs if isinstance(e, CallEvent)]
    with psycopg.connect(dsn) as conn:
        count, cost, tokens = conn.execute(
            "SELECT count(*), sum(actual_cost_nanousd), sum(prompt_tokens) FROM calls"
        ).fetchone() or (0, 0, 0)
        assert count == len(calls)
        assert cost == sum(e.actual_cost_nanousd for e in calls)
        assert tokens == sum(e.prompt_tokens for e in calls)
        first = calls[0]
        row = conn.execute("SELECT occurred_at, day, outcome, tenant, model, provider, "
                           "request_id, fallbacks, flags, ttft_s FROM calls WHERE event_id = %s",
                           (first.event_id,)).fetchone()
        assert row == (datetime.fromtimestamp(first.occurred_at, UTC),
                       date(2026, 1, 1), first.outcome, first.tenant,  # type: ignore[attr-defined]
                       first.model, first.provider, first.request_id, list(first.fallbacks),
                       [], first.ttft_s)
        kinds = dict(conn.execute("SELECT type, count(*) FROM budget_events GROUP BY type")
                     .fetchall())
        assert kinds == {k: sum(1 for e in evs if type(e).__struct_config__.tag == k)
                         for k in ("budget.reserved", "budget.released")}
        assert conn.execute("SELECT count(*) FROM breaker_events").fetchone() == (
            sum(1 for e in evs if type(e).__name__ == "BreakerChanged"),)
        assert conn.execute("SELECT route, candidate_model, agreement FROM shadow_events"
                            ).fetchall() == [("auto", "m2", 0.5)]
        adm = conn.execute("SELECT type, subject_id, details FROM admin_events ORDER BY seq"
                           ).fetchall()
        assert [(t, s) for t, s, _ in adm] == [("tenant.created", ""), ("key.created", "k1")]
        assert adm[0][2]["settings"]["tier"] == "premium"
        assert "key_sha256" not in adm[1][2] and adm[1][2]["prefix"] == "tw-ab"
        other = conn.execute("SELECT event_id, type, schema_version, body FROM other_events "
                             "ORDER BY seq").fetchall()
        assert other == [(f"~seq-{n + 1}", "", 0, "not json"),
                         ("fut-1", "future.thing", 9,
                          '{"type":"future.thing","event_id":"fut-1","schema_version":9}')]
        assert conn.execute("SELECT last_seq FROM sink_position").fetchone() == (n + 2,)

        # The daily views: the same sums, by day, tenant, model and provider.
        by_view = conn.execute("SELECT sum(requests), sum(cost_nanousd), sum(failed), "
                               "sum(rejected) FROM usage_daily").fetchone()
        assert by_view == (len(calls), cost, sum(e.outcome == "failed" for e in calls),
                           sum(e.outcome == "rejected" for e in calls))
        assert conn.execute("SELECT sum(cost_nanousd) FROM spend_daily").fetchone() == (cost,)
        rates = conn.execute("SELECT sum(calls), sum(failed) FROM provider_hourly").fetchone()
        assert rates == (sum(e.outcome != "rejected" for e in calls),
                         sum(e.outcome == "failed" for e in calls))


async def test_resumes_from_the_committed_position(nc: NatsClient, dsn: str) -> None:
    evs = _events(300)
    half = len(evs) // 2
    await publish(nc, evs[:half])
    first = await _sink_all(nc, dsn, batch_size=50)
    assert first.stats.committed_seq == half
    await publish(nc, evs[half:])
    second = await _sink_all(nc, dsn, batch_size=50)
    # Only what came after the position was read again.
    assert second.stats.events == len(evs) - half
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM calls").fetchone() == (
            sum(isinstance(e, CallEvent) for e in evs),)


async def test_a_resent_event_is_one_row(nc: NatsClient, dsn: str) -> None:
    """Published again past the stream's duplicate window (a new sequence): one row."""
    e = CallCompleted(event_id="dup-1", occurred_at=synthetic.DAY0, tenant="acme",
                      actual_cost_nanousd=5)
    js = nc.jetstream()
    await js.publish(e.subject(), encode(e))
    await js.publish(e.subject(), encode(e))  # no Nats-Msg-Id: the stream keeps both
    sink = await _sink_all(nc, dsn)
    assert sink.stats.events == 2 and sink.stats.rows == 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), sum(actual_cost_nanousd) FROM calls"
                            ).fetchone() == (1, 5)


async def test_nats_py_reader_writes_the_same(nc: NatsClient, dsn: str) -> None:
    evs = _events(120)
    n = await publish(nc, evs)
    sink = await _sink_all(nc, dsn, bulk=False, batch_size=40)
    assert sink.stats.committed_seq == n
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM calls").fetchone() == (
            sum(isinstance(e, CallEvent) for e in evs),)


async def test_runs_until_stopped_and_follows_the_stream(nc: NatsClient, dsn: str) -> None:
    stop = asyncio.Event()
    sink = PostgresSink(nc, dsn, migrate=True, max_wait_s=0.05)
    task = asyncio.create_task(sink.run(stop))
    evs = _events(50)
    n = await publish(nc, evs)
    async with asyncio.timeout(60):
        while sink.stats.committed_seq < n:
            await asyncio.sleep(0.02)
    stop.set()
    await task
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT last_seq FROM sink_position").fetchone() == (n,)


async def test_second_sink_waits_as_a_standby(nc: NatsClient, dsn: str) -> None:
    n = await publish(nc, _events(40))
    stop = asyncio.Event()
    active = PostgresSink(nc, dsn, migrate=True, max_wait_s=0.05)
    task = asyncio.create_task(active.run(stop))
    async with asyncio.timeout(60):
        while active.stats.committed_seq < n:
            await asyncio.sleep(0.02)
    standby = PostgresSink(nc, dsn, max_wait_s=0.05, standby_poll_s=0.05)
    standby_stop = asyncio.Event()
    standby_task = asyncio.create_task(standby.run(standby_stop))
    more = await publish(nc, _events(20, seed=8))
    async with asyncio.timeout(60):
        while active.stats.committed_seq < n + more:
            await asyncio.sleep(0.02)
    assert standby.stats.events == 0  # it never wrote while the first held the lock
    stop.set()
    await task
    # The first one gone, the standby takes over from the committed position.
    last = await publish(nc, _events(10, seed=9))
    async with asyncio.timeout(60):
        while standby.stats.committed_seq < n + more + last:
            await asyncio.sleep(0.02)
    standby_stop.set()
    await standby_task
    assert standby.stats.events == last


def test_admin_details_are_json() -> None:
    from tollway.sink import ledger

    row = ledger.TABLES["admin_events"].row(3, KeyCreated(
        event_id="k", occurred_at=1.0, key_id="k1", key_sha256="x" * 64))
    details = msgspec.json.decode(row[-1])
    assert details["key_id"] == "k1" and "key_sha256" not in details


@pytest.mark.parametrize("bad", [b"", b"\x00\xff", b"[1,2]"])
def test_unreadable_messages_become_other_rows(bad: bytes) -> None:
    from tollway.events.schema import decode
    from tollway.sink import ledger

    rows = ledger.to_rows([(5, bad)], decode)
    assert rows.by_table == {} and len(rows.other) == 1
    assert rows.other[0][:2] == ("~seq-5", 5) and "\x00" not in rows.other[0][4]


async def test_an_event_postgresql_refuses_does_not_stop_the_sink(nc: NatsClient,
                                                                 dsn: str) -> None:
    """A NUL in a text, a count past bigint, a time past any date: each is kept whole in
    other_events, the events around them are written, the position moves past them."""
    good = [CallCompleted(event_id=f"ok-{i}", occurred_at=synthetic.DAY0 + i, tenant="acme",
                          actual_cost_nanousd=10) for i in range(5)]
    bad = [
        CallCompleted(event_id="nul", occurred_at=synthetic.DAY0, tenant="acme",
                      error_message="bad\x00byte"),
        CallCompleted(event_id="huge", occurred_at=synthetic.DAY0, tenant="acme",
                      prompt_tokens=2**63),
        CallCompleted(event_id="far", occurred_at=1e300, tenant="acme"),
    ]
    n = await publish(nc, [good[0], bad[0], good[1], bad[1], good[2], bad[2], *good[3:]])
    sink = await _sink_all(nc, dsn)
    assert sink.stats.committed_seq == n
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), sum(actual_cost_nanousd) FROM calls"
                            ).fetchone() == (5, 50)
        other = conn.execute("SELECT event_id, type FROM other_events ORDER BY seq").fetchall()
        assert other == [("nul", "call.completed"), ("huge", "call.completed"),
                         ("far", "call.completed")]


async def test_nats_restarted_under_the_sink(nc: NatsClient, dsn: str,
                                             nats_server: EmbeddedNats) -> None:
    """The stream's server goes away and comes back: the sink starts again from the
    database's position and writes what was published since, each event once."""
    first = await publish(nc, _events(60))
    stop = asyncio.Event()
    sink = PostgresSink(nc, dsn, migrate=True, max_wait_s=0.05)
    task = asyncio.create_task(sink.run(stop, retry_s=0.05))
    async with asyncio.timeout(60):
        while sink.stats.committed_seq < first:
            await asyncio.sleep(0.02)
    await asyncio.to_thread(nats_server.restart)
    async with asyncio.timeout(60):
        while not nc.is_connected:
            await asyncio.sleep(0.02)
    more = await publish(nc, _events(40, seed=11))
    async with asyncio.timeout(60):
        while sink.stats.committed_seq < first + more:
            await asyncio.sleep(0.02)
    stop.set()
    await task
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT event_id) FROM calls").fetchone() \
            == (sum(isinstance(e, CallEvent) for e in [*_events(60), *_events(40, seed=11)]),) * 2
