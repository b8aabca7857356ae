"""Rebuild the views from the stream: ``tollway replay``.

The views are folds, so a rebuild is a fold from sequence 1 (or any later
point, over a checkpoint) to the end of the stream; the result replaces the
checkpoints, and gateways that start afterwards resume from it.

The stream is read through the bulk reader (:mod:`tollway.events.nats.bulk`); if
that cannot be used, or fails part way, the projection runner's nats-py
consumer folds the rest (``bulk=False``: nats-py only, the benchmark's
baseline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from tollway.events.projections import Projection, default_projections
from tollway.events.projections.runner import ProjectionRunner
from tollway.events.schema import STREAM

log = logging.getLogger("tollway.events")


class ReplayResult(msgspec.Struct):
    projections: list[Any]  # list[Projection]
    first_seq: int
    last_seq: int
    messages: int
    seconds: float
    bulk_messages: int = 0  # of ``messages``, read through the bulk reader

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


async def replay(
    nc: NatsClient,
    *,
    kv: KeyValue | None = None,
    stream: str = STREAM,
    projections: list[Projection[Any]] | None = None,
    save: bool = True,
    timeout: float = 600.0,
    bulk: bool = True,
) -> ReplayResult:
    """Fold the whole stream into fresh views; with ``save``, overwrite the checkpoints."""
    projs = projections if projections is not None else default_projections()
    for p in projs:
        p.reset()
    runner = ProjectionRunner(nc, projs, kv=kv if save else None, stream=stream,
                              checkpoint_interval_s=3600, bulk=False)
    info = await nc.jetstream().stream_info(stream)
    last = info.state.last_seq
    t0 = time.perf_counter()
    try:
        if bulk and last > 0:
            try:
                async with asyncio.timeout(timeout):
                    await runner.fold_bulk(last)
            except TimeoutError:
                raise TimeoutError(f"replay did not reach sequence {last} in {timeout:.0f}s "
                                   f"(at {runner.last_seq})") from None
            except Exception as exc:
                log.warning("replay: bulk read stopped at sequence %d (%s); nats-py folds "
                            "the rest", runner.last_seq, exc)
        if runner.last_seq < last:
            await runner.start(resume=False)
            left = max(0.0, timeout - (time.perf_counter() - t0))
            if not await runner.wait_for(last, left):
                raise TimeoutError(f"replay did not reach sequence {last} in "
                                   f"{timeout:.0f}s (at {runner.last_seq})")
        seconds = time.perf_counter() - t0
        if save:
            await runner.checkpoint(force=True)
    finally:
        runner.kv = None  # stop() must not save again
        await runner.stop()
    return ReplayResult(projections=projs, first_seq=info.state.first_seq,
                        last_seq=runner.last_seq, messages=runner.applied, seconds=seconds,
                        bulk_messages=runner.bulk_applied)
