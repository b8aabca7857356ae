"""Killed with SIGKILL at random moments while events flow, ``tollway sink postgres`` ends
with every event of the stream in PostgreSQL exactly once: the count and the sum of cost
equal the stream's. (benchmarks/sink.py does it 20 times over 100,000 events.)"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys

import psycopg
from nats.aio.client import Client as NatsClient

from support import HANG_S
from tollway.events import synthetic
from tollway.events.broker import EmbeddedNats
from tollway.events.schema import CallEvent
from tollway.sink.postgres import migrate_only

from .conftest import publish

KILLS = 5
CALLS = 3000


def _args(url: str, dsn: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tollway.cli", "sink", "postgres", "--url", url, "--dsn", dsn,
            "--batch-size", "150", "--max-wait", "0.02", *extra]


ENV = {**os.environ, "TOLLWAY_CONFIG": ""}


def _sink(url: str, dsn: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_args(url, dsn), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)


async def _position(conn: psycopg.AsyncConnection[tuple[int]]) -> int:
    cur = await conn.execute("SELECT coalesce(max(last_seq), 0) FROM sink_position")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_killed_many_times_every_event_once(nc: NatsClient, nats_server: EmbeddedNats,
                                                  dsn: str) -> None:
    rng = random.Random(18)
    migrate_only(dsn)
    evs = list(synthetic.events(CALLS, seed=18))
    published = 0

    async def flow() -> None:
        nonlocal published
        for i in range(0, len(evs), 100):
            published += await publish(nc, evs[i:i + 100])
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(flow())
    kills = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with asyncio.timeout(HANG_S):
            while kills < KILLS:
                before = await _position(conn)
                proc = _sink(nats_server.url, dsn)
                try:
                    # Kill it once it has committed a random number of events more.
                    want = before + rng.randrange(1, 500)
                    while await _position(conn) < min(want, published) or published == 0:
                        assert proc.poll() is None, proc.communicate()
                        await asyncio.sleep(0.01)
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate()
                kills += 1
        await feeder
        # A last run writes the rest of the stream and exits.
        done = await asyncio.to_thread(subprocess.run, _args(nats_server.url, dsn, "--once"),
                                       capture_output=True, timeout=HANG_S, env=ENV)
        assert done.returncode == 0, done.stderr.decode()
        info = await nc.jetstream().stream_info("TOLLWAY")
        assert info.state.messages == published == len(evs)
        assert await _position(conn) == info.state.last_seq
        calls = [e for e in evs if isinstance(e, CallEvent)]
        cur = await conn.execute("SELECT count(*), count(DISTINCT event_id), "
                                 "sum(actual_cost_nanousd) FROM calls")
        assert await cur.fetchone() == (len(calls), len(calls),
                                        sum(e.actual_cost_nanousd for e in calls))
        total = 0
        for table in ("calls", "budget_events", "breaker_events", "shadow_events",
                      "admin_events", "other_events"):
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
            total += row[0] if row else 0
        assert total == len(evs)
