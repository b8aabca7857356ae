"""Helpers for the events tests: records, and reading the stream back."""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy

from tollway.events.schema import STREAM, Event, decode
from tollway.record import CallRecord, Outcome

DAY0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_record(i: int, *, tenant: str = "acme", outcome: Outcome = "completed",
                at: float | None = None, **kw: Any) -> CallRecord:
    fields: dict[str, Any] = {
        "request_id": f"req-{tenant}-{i}",
        "tenant": tenant,
        "occurred_at": time.time() if at is None else at,
        "outcome": outcome,
        "route": "auto",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "prompt_tokens": 10 + i % 7,
        "completion_tokens": 20 if outcome == "completed" else 0,
        "actual_cost_nanousd": 1000 + i if outcome == "completed" else 0,
        "estimated_cost_nanousd": 2000,
        "latency_s": 0.05,
        "attempts": 1,
        "status": {"completed": 200, "failed": 502, "rejected": 429}[outcome],
    }
    fields.update(kw)
    return CallRecord(**fields)


async def read_stream(nc: NatsClient, subject: str = "tollway.>", *, stream: str = STREAM,
                      timeout: float = 2.0) -> list[tuple[int, dict[str, str], Event | None]]:
    """Every message currently in the stream on ``subject``: (seq, headers, event)."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    last = info.state.last_seq
    if info.state.messages == 0:
        return []
    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, inactive_threshold=5.0))
    out: list[tuple[int, dict[str, str], Event | None]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=timeout)
            except TimeoutError:
                break
            for m in msgs:
                out.append((m.metadata.sequence.stream, dict(m.headers or {}), decode(m.data)))
                await m.ack()
            if out and out[-1][0] >= last:
                break
    finally:
        await sub.unsubscribe()
    return out
