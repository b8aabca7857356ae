"""Shadow mode inside the app: its lifespan on the pipeline, and the report route.

One of the app's optional layers (``tollway.app.LAYERS``), run inside the
events layer's lifespan (events are up first and stop last):
:func:`shadow_lifespan` attaches a :class:`~tollway.shadow.service.ShadowService`
as ``gateway.shadow``, the runner as a finisher and the A/B split as a plan
hook; :func:`routes` serves ``GET /api/ai/shadow``.
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
from tollway.learn.routing import LearnedRouting, Learner, LearningSink, learning_routes
from tollway.record import CallRecord
from tollway.shadow.projection import ShadowView
from tollway.shadow.report import query, query_ab, query_learned
from tollway.shadow.service import ShadowService
from tollway.shadow.sink import MemorySink, PublisherSink, ShadowSink

if TYPE_CHECKING:
    from tollway.gateway import Gateway

__all__ = ["routes", "shadow_lifespan"]

log = logging.getLogger("tollway.shadow")

PATH = "/api/ai/shadow"


class _ArmRecorder:
    """Events off: A/B calls' records also fold into the local view (the arms' report)."""

    __slots__ = ("sink",)

    def __init__(self, sink: MemorySink) -> None:
        self.sink = sink

    def record(self, rec: CallRecord) -> None:
        if "ab[" in rec.reason:
            try:
                self.sink.observe(event_from_record(rec, self.sink.new_id(), self.sink.instance))
            except Exception:  # a recorder must not raise
                log.exception("shadow: could not fold an A/B call")


@asynccontextmanager
async def shadow_lifespan(gateway: Gateway,
                          entries: list[ShadowRouteConfig] | None = None) -> AsyncIterator[None]:
    events = gateway.events
    sink: ShadowSink = PublisherSink(events.publisher) if events is not None else MemorySink()
    entries = gateway.config.shadow if entries is None else entries
    learns = learning_routes(gateway.config.learn, entries)
    # Events on: the stream's view folds every process's samples (tollway.learn.view);
    # off: this process folds its own, on their way to the sink.
    view = next((p for p in events.projections if p.name == "learning"),
                None) if events is not None and learns else None
    if learns and view is None:
        sink = LearningSink(sink)
    svc = ShadowService(gateway.parts, sink, entries, events)
    pipeline = gateway.pipeline
    learned: LearnedRouting | None = None
    if learns:
        inner = sink.inner if isinstance(sink, LearningSink) else sink
        learner = Learner(gateway.parts, gateway.config.learn, learns, inner, view)
        svc.learner = learner
        if isinstance(sink, LearningSink):
            sink.learner = learner
        for e in learns:
            svc.runner.verify(e.route, gateway.config.learn.verify_fraction, e.seed)
        learned = LearnedRouting(gateway.parts, learner)
    registry = gateway.metrics.registry
    svc.runner.gate = gateway.directory.shadow_gate
    on_call = svc.runner.on_call
    if svc.runner.routes:
        pipeline.finishers.append(on_call)
        for c in svc.runner.collectors:
            registry.register(c)
    arms = _ArmRecorder(svc.base) if isinstance(svc.base, MemorySink) else None
    if svc.ab.splits:
        pipeline.plan_hooks.append(svc.ab)
        if arms is not None:
            pipeline.recorders.append(arms)
    if learned is not None:
        pipeline.plan_hooks.append(learned)
    gateway.shadow = svc
    try:
        yield
    finally:
        if learned in pipeline.plan_hooks:
            pipeline.plan_hooks.remove(learned)
        if svc.ab in pipeline.plan_hooks:
            pipeline.plan_hooks.remove(svc.ab)
        if arms in pipeline.recorders:
            pipeline.recorders.remove(arms)
        if on_call in pipeline.finishers:
            pipeline.finishers.remove(on_call)
            for c in svc.runner.collectors:
                registry.unregister(c)
        await svc.runner.stop()
        gateway.shadow = None


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
    svc = gateway.shadow
    view = svc.view() if svc is not None else ShadowView()
    return {
        "object": "shadow.report",
        "since": since or None,
        "until": None if until == "9999-12-31" else until,
        "source": svc.source if svc is not None else "none",
        "as_of_sequence": view.last_seq,
        "data": query(view, route=route, since=since, until=until),
        "ab": query_ab(view, route=route, since=since, until=until),
        "learning": {**query_learned(view, route=route),
                     "here": svc.learner.status() if svc is not None
                     and svc.learner is not None else None},
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
