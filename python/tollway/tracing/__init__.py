"""OpenTelemetry traces of every call (``[tracing]``; the ``tollway[otel]`` extra).

Whether the gateway traces is decided once, when it is built
(:mod:`.settings`: ``[tracing]`` and the ``OTEL_*`` environment). While the app
runs, :func:`tracing_lifespan` (one of the app's layers) attaches the tracer to
the pipeline. Off, the pipeline's ``tracer`` hook stays None and a call does no
tracing work at all: nothing of OpenTelemetry is even imported. On, :mod:`.otel`
makes the spans (one per call, one per upstream attempt) and a
BatchSpanProcessor exports them over OTLP/HTTP from a thread of its own, so the
event loop never waits on the collector; the lifespan's end flushes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from tollway.tracing.settings import TracingSettings, tracing_settings

if TYPE_CHECKING:
    from tollway.gateway import Gateway

__all__ = ["TracingSettings", "tracing_lifespan", "tracing_settings"]

log = logging.getLogger("tollway.tracing")


@asynccontextmanager
async def tracing_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    """Attach the tracer while the app runs (nothing when ``gateway.tracing`` is None);
    at the end, detach it and flush the spans not yet exported: in a thread (the export
    is a blocking HTTP request), waited for as long as one export may take and a little
    more (some exporter versions retry a collector's 503 for a minute: the gateway does
    not wait for that, and a daemon thread does not hold the process up)."""
    settings = gateway.tracing
    if settings is None:
        yield
        return
    from tollway.tracing.otel import Tracing  # the extra: imported only when on

    tracing = Tracing(settings, gateway.parts)
    pipeline = gateway.pipeline
    pipeline.tracer = tracing.start
    pipeline.finishers.append(tracing.finish)
    try:
        yield
    finally:
        pipeline.tracer = None
        pipeline.finishers.remove(tracing.finish)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def flushed() -> None:
            if not done.done():
                done.set_result(None)

        def flush() -> None:
            try:
                tracing.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                    loop.call_soon_threadsafe(flushed)

        threading.Thread(target=flush, name="tollway-tracing-flush", daemon=True).start()
        try:
            await asyncio.wait_for(done, settings.export_timeout_s + 5.0)
        except TimeoutError:
            log.warning("traces not flushed: the collector did not answer in time")
