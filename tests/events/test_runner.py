"""Projections fed from a real stream: replay equals live, checkpoints, resume, restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck

from tollway.events.broker import EmbeddedNats, connect, ensure_kv, ensure_stream, stream_config
from tollway.events.budget import BudgetView
from tollway.events.projections import default_projections
from tollway.events.projections.runner import ProjectionRunner
from tollway.events.replay import replay
from tollway.events.schema import CallEvent, day_of, decode

from .conftest import FIXTURES, contents


async def publish_lines(nc: NatsClient, lines: list[bytes]) -> list[PubAck]:
    js = nc.jetstream()
    acks = []
    for line in lines:
        e = decode(line)
        assert e is not None
        acks.append(await js.publish(e.subject(), line, headers={"Nats-Msg-Id": e.event_id}))
    return acks


def fixture_lines() -> list[bytes]:
    return (FIXTURES / "calls.jsonl").read_bytes().splitlines()


def pure_fold(lines: list[bytes]) -> list[Any]:
    projs = default_projections()
    for seq, line in enumerate(lines, 1):
        e = decode(line)
        assert e is not None
        for p in projs:
            p.apply(seq, e)
    return projs


async def test_replay_from_zero_equals_the_pure_fold(nc: NatsClient) -> None:
    lines = fixture_lines()
    await publish_lines(nc, lines)
    kv = await nc.jetstream().key_value("tollway_checkpoints")
    result = await replay(nc, kv=kv)
    assert result.messages == len(lines) and result.last_seq == len(lines)
    want = pure_fold(lines)
    assert [p.view for p in result.projections] == [p.view for p in want]
    # The rebuild replaced the checkpoints: a fresh runner resumes at the end.
    runner = ProjectionRunner(nc, default_projections(), kv=kv)
    await runner.load_checkpoints()
    assert [p.view for p in runner.projections] == [p.view for p in want]


async def test_live_views_equal_a_replay(nc: NatsClient) -> None:
    lines = fixture_lines()
    runner = ProjectionRunner(nc, default_projections())
    await runner.start()
    await publish_lines(nc, lines[:300])  # while it runs
    await publish_lines(nc, lines[300:])
    assert await runner.catch_up(10)
    assert runner.caught_up
    result = await replay(nc, save=False)
    assert [p.view for p in runner.projections] == [p.view for p in result.projections]
    await runner.stop()


async def test_restarted_runner_resumes_from_its_checkpoint(nc: NatsClient) -> None:
    lines = fixture_lines()
    kv = await nc.jetstream().key_value("tollway_checkpoints")
    await publish_lines(nc, lines[:400])
    first = ProjectionRunner(nc, default_projections(), kv=kv, checkpoint_interval_s=3600)
    await first.start()
    assert await first.catch_up(10)
    await first.stop()  # checkpoints at stop
    await publish_lines(nc, lines[400:])
    second = ProjectionRunner(nc, default_projections(), kv=kv)
    await second.start()
    assert await second.catch_up(10)
    assert second.applied == len(lines) - 400, "resumed after the checkpoint, re-applied none"
    assert [p.view for p in second.projections] == [p.view for p in pure_fold(lines)]
    await second.stop()


async def test_two_runners_share_checkpoints_and_keep_the_furthest(nc: NatsClient) -> None:
    lines = fixture_lines()
    kv = await nc.jetstream().key_value("tollway_checkpoints")
    await publish_lines(nc, lines)
    a = ProjectionRunner(nc, default_projections(), kv=kv)
    await a.start()
    assert await a.catch_up(10)
    await a.checkpoint()
    # A runner that is behind does not overwrite the further checkpoint.
    behind = default_projections()
    for seq, line in enumerate(lines[:100], 1):
        e = decode(line)
        assert e is not None
        for p in behind:
            p.apply(seq, e)
    b = ProjectionRunner(nc, behind, kv=kv)
    await b.checkpoint()
    c = ProjectionRunner(nc, default_projections(), kv=kv)
    await c.load_checkpoints()
    assert all(p.view.last_seq == len(lines) for p in c.projections)
    await a.stop()


@pytest.mark.parametrize("bulk", [True, False], ids=["reader", "nats-py"])
async def test_runner_follows_the_stream_across_a_nats_restart(tmp_path: Path,
                                                               bulk: bool) -> None:
    srv = EmbeddedNats(tmp_path / "nats")
    srv.start()
    back = asyncio.Event()
    runners: list[ProjectionRunner] = []

    async def on_state(connected: bool) -> None:
        if connected:
            back.set()
            for r in runners:
                r.reconnected()

    try:
        client = await connect(srv.url, on_state=on_state)
        js = client.jetstream()
        await ensure_stream(js, stream_config())
        await ensure_kv(js)
        lines = fixture_lines()
        runner = ProjectionRunner(client, default_projections(), idle_heartbeat_s=0.5,
                                  bulk=bulk)
        runners.append(runner)
        await runner.start()
        await publish_lines(client, lines[:200])
        assert await runner.wait_for(200, 5)
        await asyncio.to_thread(srv.restart)  # the in-memory consumer dies with the server
        async with asyncio.timeout(10):
            await back.wait()
        await publish_lines(client, lines[200:])
        assert await runner.wait_for(len(lines), 10)
        assert [p.view for p in runner.projections] == [p.view for p in pure_fold(lines)]
        assert runner.tail == ("reader" if bulk else "nats-py")
        await runner.stop()
        await client.close()
    finally:
        srv.stop()


async def test_a_recreated_stream_is_folded_on_top_of_the_checkpoint(nc: NatsClient) -> None:
    lines = fixture_lines()
    js = nc.jetstream()
    kv = await js.key_value("tollway_checkpoints")
    await publish_lines(nc, lines[:300])
    first = ProjectionRunner(nc, default_projections(), kv=kv)
    await first.start()
    assert await first.catch_up(5)
    await first.stop()
    await js.delete_stream("TOLLWAY")  # the stream's store is lost, the checkpoints are not
    await ensure_stream(js, stream_config())
    await publish_lines(nc, lines[300:])  # numbered from 1 again
    second = ProjectionRunner(nc, default_projections(), kv=kv)
    await second.start()
    assert await second.wait_for(len(lines) - 300, 5)
    want = pure_fold(lines)
    assert second.projections[0].view.rows == want[0].view.rows
    assert second.projections[1].view.spend == want[1].view.spend
    await second.stop()


async def resend_after_the_window(nc: NatsClient, lines: list[bytes]) -> None:
    """Publish ``lines`` again, in order, as an outbox does once NATS is back, after the
    stream's duplicate window has passed: JetStream stores each under a new sequence."""
    for line in lines:
        for _ in range(100):
            if not (await publish_lines(nc, [line]))[0].duplicate:
                break
            await asyncio.sleep(0.1)  # its window has not passed yet: the server dropped it
        else:
            raise AssertionError("the duplicate window never passed")


async def test_an_outbox_resent_after_the_duplicate_window_counts_each_call_once(
        nats_server: EmbeddedNats) -> None:
    nc = await connect(nats_server.url)
    js = nc.jetstream()
    await ensure_stream(js, stream_config(duplicate_window_s=1.0))
    kv = await ensure_kv(js)
    lines = fixture_lines()
    n, k, m = len(lines), len(lines) // 3, 2 * len(lines) // 3
    # Before the outage lines[:m] reached the stream, but the acks of lines[k:m] were lost:
    # they went to the outbox, followed by lines[m:], recorded while NATS was away.
    await publish_lines(nc, lines[:m])
    assert (await publish_lines(nc, lines[m - 1:m]))[0].duplicate, \
        "within the window JetStream drops a resend itself"
    first = ProjectionRunner(nc, default_projections(), kv=kv)
    await first.start()
    assert await first.catch_up(10)
    await first.stop()  # checkpoints
    await resend_after_the_window(nc, lines[k:])
    assert (await js.stream_info("TOLLWAY")).state.messages == m + (n - k)  # all stored

    want = pure_fold(lines)
    events = [e for e in map(decode, lines) if isinstance(e, CallEvent)]
    calls = len(events)
    spend: dict[tuple[str, str], int] = {}
    for e in events:
        key = (e.tenant, day_of(e.occurred_at))
        spend[key] = spend.get(key, 0) + e.actual_cost_nanousd
    a_time_of = {day_of(e.occurred_at): e.occurred_at for e in events}
    for restart in range(2):  # from the first checkpoint; then from one taken after a resend
        runner = ProjectionRunner(nc, default_projections(), kv=kv)
        await runner.start()
        assert await runner.catch_up(10)
        assert runner.applied == n - k, "resumed from the checkpoint, then the resend"
        usage_view = runner.by_name["usage"].view
        assert sum(row[0] for row in usage_view.rows.values()) == calls
        budget = BudgetView(runner.by_name["budget"])
        for (tenant, day), cost in spend.items():  # what the budget guard reads
            assert budget.spent_today(tenant, now=a_time_of[day]) == cost
        assert [contents(p) for p in runner.projections] == [contents(p) for p in want]
        await runner.stop()
        if not restart:  # a second outage resends the same outbox once more
            await resend_after_the_window(nc, lines[k:])
    await nc.close()


async def test_views_apart_fold_alone_then_share_their_ids_once_they_meet(
        nc: NatsClient) -> None:
    lines = fixture_lines()
    projs = default_projections()
    usage = projs[0]
    for seq, line in enumerate(lines[:300], 1):  # one view restored from a later checkpoint
        e = decode(line)
        assert e is not None
        usage.apply(seq, e)
    runner = ProjectionRunner(nc, projs)
    runner.feed_batch(list(range(1, 101)), lines[:100])
    assert len({id(p.view.seen) for p in projs}) == 2, "the view ahead decides for itself"
    runner.feed_batch(list(range(101, len(lines) + 1)), lines[100:])
    await runner.checkpoint()  # no bucket: only links again, now they meet
    resent = list(range(len(lines) + 1, 2 * len(lines) + 1))
    runner.feed_batch(resent, lines)  # after the duplicate window: new sequences
    assert len({id(p.view.seen) for p in projs}) == 1, "together: one decision per event"
    assert [contents(p) for p in projs] == [contents(p) for p in pure_fold(lines)]
    assert all(p.view.last_seq == 2 * len(lines) for p in projs)


async def test_an_event_from_a_clock_years_ahead_prunes_nothing(nc: NatsClient) -> None:
    lines = fixture_lines()
    runner = ProjectionRunner(nc, default_projections())
    runner.feed_batch(list(range(1, 201)), lines[:200])
    ahead = decode(lines[200])
    assert isinstance(ahead, CallEvent)
    far = msgspec.json.encode(msgspec.structs.replace(ahead, occurred_at=4_000_000_000.0))
    runner.feed_batch([201], [far])  # 2096: a gateway whose clock is broken
    runner.feed_batch(list(range(202, len(lines) + 1)), lines[201:])
    want = pure_fold(lines[:200] + lines[201:])
    usage = runner.by_name["usage"].view
    assert {k: v for k, v in usage.rows.items() if k[1] < "2096"} == want[0].view.rows
    spend = runner.by_name["budget"].view.spend
    assert {t: {d: n for d, n in days.items() if d < "2096"} for t, days in spend.items()
            } == want[1].view.spend
