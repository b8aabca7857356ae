"""Fixtures for the sink: one real PostgreSQL server for the session (Debian's binaries on a
temporary folder and port), a fresh database per test, and a real nats-server."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Iterator

import psycopg
import pytest
from nats.aio.client import Client as NatsClient

from tollway.events.broker import EmbeddedNats, connect, ensure_stream, stream_config
from tollway.events.schema import Event, encode
from tollway.testing.postgres import PostgresServer

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def dsn(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty database on the session's server."""
    name = f"t{next(_names)}"
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres.dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    srv = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await connect(nats_server.url)
    await ensure_stream(client.jetstream(), stream_config())
    try:
        yield client
    finally:
        await client.close()


async def publish(nc: NatsClient, events: Iterable[Event]) -> int:
    """Publish with ``Nats-Msg-Id`` (as gateways do), pipelined; returns the count."""
    js = nc.jetstream()
    n = 0
    futs = []
    for e in events:
        futs.append(await js.publish_async(e.subject(), encode(e),
                                           headers={"Nats-Msg-Id": e.event_id}))
        n += 1
        if len(futs) >= 256:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    return n
