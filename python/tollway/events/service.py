"""EventsService: the events layer of one gateway process, started and stopped as a unit.

Start order: (embedded) nats-server -> connection -> stream and KV bucket ->
outbox and publisher -> projections (from their checkpoints) -> budget view.
If NATS cannot be reached at start, the gateway still starts: events go to
the outbox, the budget falls back to the local view, ``ready()`` says why,
and a background task keeps trying to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from tollway.aio import cancel_and_wait
from tollway.config import EventsConfig, NatsConfig
from tollway.events.breakers import FleetBreakers
from tollway.events.broker import (
    EmbeddedNats,
    NatsUnavailable,
    connect,
    ensure_kv,
    ensure_stream,
    parse_servers,
    stream_config,
)
from tollway.events.budget import BudgetView
from tollway.events.metrics import EventMetrics
from tollway.events.outbox import Outbox
from tollway.events.projections import Projection, budget, default_projections, health, usage
from tollway.events.projections.runner import ProjectionRunner
from tollway.events.publisher import Publisher
from tollway.events.ratelimits import FleetLimits
from tollway.events.recorder import EventRecorder
from tollway.ratelimit import Limits

log = logging.getLogger("tollway.events")


def default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def _kv_answers(kv: KeyValue, within: float = 15.0) -> None:
    """Wait until the bucket answers a read: on a cluster, a bucket just made by this or
    another gateway has no leader for a second or two, and reads time out meanwhile."""
    deadline = time.monotonic() + within
    while True:
        try:
            await kv.get("_ready")
            return
        except KeyNotFoundError:
            return
        except (TimeoutError, NatsTimeoutError, ServiceUnavailableError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


STOP_STEP_S = 10.0  # the longest one part of the service may take to stop


async def _bounded(what: str, step: Awaitable[Any], within: float = STOP_STEP_S) -> None:
    """Await one part's stop for at most ``within`` seconds. It runs as a task of its own
    and is waited on, not wrapped in a timeout, so even a part that swallows its
    cancellation cannot hold the stop up; one that errs is logged, and the rest go on."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait((task,), timeout=within)
    if not done:
        log.warning("events: %s did not stop within %.0f s; stopping the rest without it",
                    what, within)
        await cancel_and_wait(task, within=1.0, what=f"stopping {what}")
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("events: stopping %s failed: %r", what, task.exception())


async def _close(nc: NatsClient) -> None:
    with contextlib.suppress(Exception):
        await nc.flush(timeout=1)
    with contextlib.suppress(Exception):
        await nc.close()


class EventsService:
    def __init__(
        self,
        nats_config: NatsConfig | None = None,
        events_config: EventsConfig | None = None,
        *,
        registry: CollectorRegistry | None = None,
        instance: str | None = None,
        clock: Callable[[], float] = time.time,
        limits_of: Callable[[str], Limits] | None = None,
        processes: int = 1,
    ) -> None:
        """``clock``: unix seconds, the gateway's (its budget days and lease times).
        ``limits_of``: a tenant's rate limits, to share them across the fleet
        (``shared_rate_limits``; None: the gateway keeps its own). ``processes``: how many
        gateway processes this one knows to share them with before it has seen the fleet
        (its workers' count under ``tollway serve --workers``)."""
        self.nats_config = nats_config or NatsConfig()
        self.config = events_config or EventsConfig()
        self.instance = instance or default_instance()
        self.metrics = EventMetrics(registry)
        self.metrics.projection_pending.set_function(self._projection_pending)
        self.data_dir = Path(self.nats_config.data_dir)
        self.embedded: EmbeddedNats | None = None
        self.nc: NatsClient | None = None
        self.kv: KeyValue | None = None
        cfg = self.config
        self.outbox = Outbox(self.data_dir / "outbox", fsync=cfg.outbox_fsync,
                             fsync_interval_s=cfg.outbox_fsync_interval_s,
                             max_bytes=cfg.outbox_max_bytes)
        self.publisher = Publisher(
            self.outbox, metrics=self.metrics, instance=self.instance,
            queue_size=cfg.queue_size, batch_size=cfg.batch_size,
            publish_timeout_s=cfg.publish_timeout_s, linger_s=cfg.publish_linger_s,
            on_no_stream=self._ensure_stream)
        self.recorder = EventRecorder(self.publisher)
        self.projections: list[Projection[Any]] = default_projections(cfg.retention_days)
        self._by_name = {p.name: p for p in self.projections}
        self.runner: ProjectionRunner | None = None
        self.budget = BudgetView(
            self._by_name["budget"], publisher=self.publisher, instance=self.instance,
            ttl_s=cfg.reservation_ttl_s, fail_open=cfg.budget_fail_open,
            publish_timeout_s=cfg.publish_timeout_s, metrics=self.metrics, clock=clock)
        # Set by the app before start when the breakers are shared ([breaker] fleet).
        self.breakers: FleetBreakers | None = None
        self.ratelimits: FleetLimits | None = None
        if limits_of is not None and cfg.shared_rate_limits:
            self.ratelimits = FleetLimits(
                limits_of, instance=self.instance, bucket=cfg.rate_limit_bucket,
                replicas=cfg.replicas, allotment_s=cfg.rate_allotment_s,
                heartbeat_s=cfg.heartbeat_s, op_timeout_s=cfg.publish_timeout_s,
                expected=processes, clock=clock,
                registry=self.metrics.registry)
        self._connector: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self.last_error = ""

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str | list[str]:
        return self.embedded.url if self.embedded is not None else self.nats_config.url

    async def start(self) -> None:
        url = self.nats_config.url
        if url == "embedded":
            self.embedded = EmbeddedNats(self.data_dir)
            await self.embedded.astart()
        await asyncio.to_thread(self.outbox.open)  # may scan a large file
        await self.publisher.start(None)
        self._maintainer = asyncio.create_task(self._maintain(), name="tollway-budget-leases")
        if self.ratelimits is not None:
            self.ratelimits.start()
        try:
            await self._connect()
        except NatsUnavailable as exc:
            self.last_error = str(exc)
            log.error("events: %s; events go to the outbox until NATS is reachable", exc)
            self._connector = asyncio.create_task(self._keep_connecting(),
                                                  name="tollway-nats-connect")

    async def _connect(self) -> None:
        servers = self.embedded.url if self.embedded is not None else parse_servers(self.url)
        # nats-py, told to reconnect for ever, also retries a first connect for ever: without
        # a bound, a gateway started while NATS is down would never start serving.
        within = 2.0 * (1 if isinstance(servers, str) else len(servers)) + 1.0
        try:
            async with asyncio.timeout(within):
                nc = await connect(servers, name=f"tollway {self.instance}",
                                   on_state=self._on_state)
        except TimeoutError:
            raise NatsUnavailable(f"no NATS server at {servers} answered within "
                                  f"{within:.0f}s") from None
        try:
            await self._ensure_stream(nc)
            self.kv = await ensure_kv(nc.jetstream(), self.config.kv_bucket,
                                      self.config.replicas)
            await _kv_answers(self.kv)
        except Exception as exc:
            await nc.close()
            raise NatsUnavailable(f"JetStream not usable: {exc}") from exc
        self.nc = nc
        self.metrics.connected.set(1)
        self.last_error = ""
        await self.publisher.attach(nc)
        self.runner = ProjectionRunner(
            nc, self.projections, kv=self.kv, stream=self.config.stream,
            checkpoint_interval_s=self.config.checkpoint_interval_s, metrics=self.metrics)
        self.budget.nc = nc
        self.budget.runner = self.runner
        await self.runner.start()
        if self.breakers is not None:
            await self.breakers.start(nc)
        if self.ratelimits is not None:
            try:
                await self.ratelimits.attach(nc)
            except Exception as exc:  # the shares hold meanwhile; retried on reconnect
                log.warning("rate limits: not shared yet (%s)", exc)

    async def _keep_connecting(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                log.info("events: connected to NATS")
                return
            except NatsUnavailable as exc:
                self.last_error = str(exc)
                delay = min(delay * 2, 10.0)

    async def _ensure_stream(self, nc: NatsClient | None = None) -> None:
        nc = nc or self.nc
        if nc is None:
            return
        cfg = self.config
        await ensure_stream(nc.jetstream(), stream_config(
            name=cfg.stream, replicas=cfg.replicas, duplicate_window_s=cfg.duplicate_window_s,
            max_age_s=cfg.max_age_days * 86400))

    async def _on_state(self, connected: bool) -> None:
        self.metrics.connected.set(1 if connected else 0)
        limits = self.ratelimits
        if connected:
            self.publisher.kick()
            if self.runner is not None:
                self.runner.reconnected()
            if limits is not None and self.nc is not None:
                if limits.kv is None:
                    try:
                        await limits.attach(self.nc)
                    except Exception as exc:
                        log.warning("rate limits: not shared yet (%s)", exc)
                else:
                    limits.connected()
        elif limits is not None:
            limits.disconnected()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self.budget.maintain()
            except Exception:
                log.exception("budget: lease maintenance failed")

    async def stop(self) -> None:
        """Stop every part, each within a bound (:data:`STOP_STEP_S`): a part that does
        not stop in time is logged by name and left behind, so stopping never hangs (what
        the publisher did not send is in the outbox for the next start)."""
        await cancel_and_wait((self._connector, self._maintainer),
                              what="the events layer's background tasks")
        self._connector = self._maintainer = None
        if self.ratelimits is not None:
            # allotments given back while NATS is there
            await _bounded("the fleet's rate limits", self.ratelimits.stop())
        self.budget.close()  # idle leases given back while the publisher still runs
        if self.breakers is not None and self.breakers.nc is not None:
            await _bounded("the fleet's breakers", self.breakers.stop())
        publish_s = self.config.publish_timeout_s + 1
        await _bounded("the publisher", self.publisher.stop(timeout=publish_s),
                       STOP_STEP_S + publish_s)
        if self.runner is not None:
            await _bounded("the projections", self.runner.stop())
        if self.nc is not None:
            nc, self.nc = self.nc, None
            await _bounded("the NATS connection", _close(nc))
        await _bounded("the outbox", asyncio.to_thread(self.outbox.close))  # fsyncs
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    async def __aenter__(self) -> EventsService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- reading the views -------------------------------------------------------------------
    def _projection_pending(self) -> float:
        runner = self.runner
        return -1.0 if runner is None else float(runner.pending)

    async def not_ready(self) -> str | None:
        """None when NATS is reachable and the projections have caught up, else why not."""
        if self.nc is None or not self.nc.is_connected:
            return f"nats unreachable{': ' + self.last_error if self.last_error else ''}"
        if self.runner is None or not self.runner.caught_up:
            return "projections catching up"
        return None

    def projection(self, name: str) -> Projection[Any]:
        """One of the views by name (``usage``, ``budget``, ``health``, ``shadow``,
        ``directory``, ``recent``; ``learning`` when routing learns)."""
        return self._by_name[name]

    def add_view(self, projection: Projection[Any]) -> None:
        """Fold one more view of the stream (before :meth:`start`)."""
        if self.runner is not None or projection.name in self._by_name:
            raise RuntimeError(f"view {projection.name!r}: added after start, or twice")
        self.projections.append(projection)
        self._by_name[projection.name] = projection

    @property
    def usage_view(self) -> usage.UsageView:
        view: usage.UsageView = self._by_name["usage"].view
        return view

    @property
    def budget_state(self) -> budget.BudgetState:
        view: budget.BudgetState = self._by_name["budget"].view
        return view

    @property
    def health_view(self) -> health.HealthView:
        view: health.HealthView = self._by_name["health"].view
        return view

    def usage(self, tenant: str | None, since: str = "", until: str = "9999-12-31"
              ) -> dict[str, Any]:
        return usage.query(self.usage_view, tenant=tenant, since=since, until=until)

    def provider_health(self) -> dict[str, Any]:
        return health.query(self.health_view)
