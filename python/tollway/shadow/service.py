"""Shadow mode inside the app: the runner and the A/B split on the pipeline, the report route.

``tollway.app`` calls :func:`shadow_lifespan` inside the events lifespan (so
events are up first and stop last) and adds :func:`routes`. With events on,
``ShadowCompared`` events go through the events publisher and the report
reads the ``shadow`` projection that the events layer folds from the
stream (every gateway's samples); with events off they fold into a view in
memory (this process's samples only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.config import ShadowRouteConfig
from tollway.errors import InvalidRequest, PermissionDenied, error_body
from tollway.events.schema import day_of, event_from_record
from tollway.record import CallRecord, Recorder
from tollway.shadow.ab import ABSplit
from tollway.shadow.projection import ShadowView, spend_by
from tollway.shadow.report import query, query_ab
from tollway.shadow.runner import ShadowRunner
from tollway.shadow.sink import MemorySink, PublisherSink, ShadowSink

if TYPE_CHECKING:
    from tollway.gateway import Gateway

__all__ = ["ATTR", "ShadowService", "routes", "shadow_entries", "shadow_lifespan"]

log = logging.getLogger("tollway.shadow")

ATTR = "shadow"  # gateway.shadow: the ShadowService while the app runs
PATH = "/api/ai/shadow"


class _ArmRecorder:
    """Events off: A/B calls' records also fold into the local view (the arms' report)."""

    __slots__ = ("previous", "sink")

    def __init__(self, previous: Recorder, sink: MemorySink) -> None:
        self.previous = previous
        self.sink = sink

    def record(self, rec: CallRecord) -> None:
        self.previous.record(rec)
        if "ab[" in rec.reason:
            try:
                self.sink.observe(event_from_record(rec, self.sink.new_id(), self.sink.instance))
            except Exception:  # a recorder must not raise
                log.exception("shadow: could not fold an A/B call")


def shadow_entries(gateway: Gateway) -> list[ShadowRouteConfig]:
    entries: list[ShadowRouteConfig] = getattr(gateway.config, "shadow", None) or []
    return entries


class ShadowService:
    def __init__(self, gateway: Gateway, sink: ShadowSink,
                 entries: list[ShadowRouteConfig] | None = None) -> None:
        self.gateway = gateway
        self.sink = sink
        entries = shadow_entries(gateway) if entries is None else entries
        self.runner = ShadowRunner(gateway, entries, sink, others=self._others)
        self.ab = ABSplit(gateway, entries)

    def view(self) -> ShadowView:
        """The stream's view when the events layer folds one, else this process's own."""
        events = getattr(self.gateway, "events", None)
        for proj in getattr(events, "projections", ()):
            if proj.name == "shadow":
                view: ShadowView = proj.view
                return view
        if isinstance(self.sink, MemorySink):
            return self.sink.view
        return ShadowView()

    @property
    def source(self) -> str:
        return "local" if isinstance(self.sink, MemorySink) else "events"

    def _others(self, route: str, day: str) -> int:
        if isinstance(self.sink, MemorySink):
            return 0  # its view holds only this process's samples, already counted
        return spend_by(self.view(), route, day, excluding=self.sink.instance)


@asynccontextmanager
async def shadow_lifespan(gateway: Gateway,
                          entries: list[ShadowRouteConfig] | None = None) -> AsyncIterator[None]:
    events = getattr(gateway, "events", None)
    publisher = getattr(events, "publisher", None)
    sink: ShadowSink = PublisherSink(publisher) if publisher is not None else MemorySink()
    svc = ShadowService(gateway, sink, entries)
    pipeline = gateway.pipeline
    registry = gateway.metrics.registry
    on_call = svc.runner.on_call
    hooks: list[Any] = getattr(pipeline, "plan_hooks", [])
    if svc.runner.routes:
        pipeline.finishers.append(on_call)
        for c in svc.runner.collectors:
            registry.register(c)
    previous = gateway.recorder
    if svc.ab.splits:
        hooks.append(svc.ab)
        if isinstance(sink, MemorySink):
            gateway.recorder = _ArmRecorder(previous, sink)
    setattr(gateway, ATTR, svc)
    try:
        yield
    finally:
        if svc.ab in hooks:
            hooks.remove(svc.ab)
        if isinstance(gateway.recorder, _ArmRecorder):
            gateway.recorder = previous
        if on_call in pipeline.finishers:
            pipeline.finishers.remove(on_call)
            for c in svc.runner.collectors:
                registry.unregister(c)
        await svc.runner.stop()
        setattr(gateway, ATTR, None)


def _error(exc: Exception) -> Response:
    status, body = error_body(exc)
    return Response(body, status, media_type="application/json")


def _days(request: Request) -> tuple[str, str]:
    q = request.query_params
    days_arg = q.get("days")
    since = q.get("since", "")
    if days_arg is not None:
        try:
            days = int(days_arg)
        except ValueError:
            raise InvalidRequest("days must be an integer", param="days") from None
        if not 1 <= days <= 3660:
            raise InvalidRequest("days must be between 1 and 3660", param="days")
        since = day_of(time.time() - (days - 1) * 86400)
    until = q.get("until") or "9999-12-31"
    for name, value in (("since", since), ("until", until)):
        if value and (len(value) != 10 or value[4] != "-" or value[7] != "-"):
            raise InvalidRequest(f"{name} must be a day, YYYY-MM-DD", param=name)
    return since, until


def report(gateway: Gateway, route: str | None, since: str, until: str) -> dict[str, Any]:
    svc: ShadowService | None = getattr(gateway, ATTR, None)
    view = svc.view() if svc is not None else ShadowView()
    return {
        "object": "shadow.report",
        "since": since or None,
        "until": None if until == "9999-12-31" else until,
        "source": svc.source if svc is not None else "none",
        "as_of_sequence": view.last_seq,
        "data": query(view, route=route, since=since, until=until),
        "ab": query_ab(view, route=route, since=since, until=until),
        "runtime": svc.runner.status() if svc is not None else {},
    }


def routes(gateway: Gateway) -> list[BaseRoute]:
    async def shadow(request: Request) -> Response:
        from tollway.context import info_of

        principal = info_of(cast(dict[str, Any], request.scope)).principal
        if principal is None or not principal.admin:
            return _error(PermissionDenied("this endpoint needs the admin key",
                                           code="admin_required"))
        try:
            since, until = _days(request)
        except InvalidRequest as exc:
            return _error(exc)
        route = request.query_params.get("route") or None
        return JSONResponse(report(gateway, route, since, until))

    return [Route(PATH, shadow, methods=["GET"])]
