"""The events layer inside the app: lifespan, recorder, readiness, and the two views' routes.

One of the app's optional layers (``tollway.app.LAYERS``): :func:`events_lifespan`
attaches the service as ``gateway.events`` and adds its recorder to the
pipeline's; :func:`routes` serves the usage and budget views.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.errors import InvalidRequest, NotReady, PermissionDenied, error_body
from tollway.events.breakers import FleetBreakers
from tollway.events.ratelimits import worker_total
from tollway.events.schema import day_of
from tollway.events.service import EventsService
from tollway.learn.routing import learning_routes, new_learning
from tollway.learn.view import learning_projection

if TYPE_CHECKING:
    from tollway.gateway import Gateway

NANO = 1_000_000_000


@asynccontextmanager
async def events_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    config = gateway.config
    gateway.events = None
    if not config.nats.enabled:
        yield
        return
    rate = gateway.rate_guard
    svc = EventsService(config.nats, config.events, registry=gateway.metrics.registry,
                        clock=gateway.clock.time,
                        limits_of=rate.limiter.limits if rate is not None else None,
                        processes=worker_total())
    learns = learning_routes(config.learn, config.shadow)
    if learns:  # one set of learned choices for every process on the stream
        parts = gateway.parts
        svc.add_view(learning_projection(
            lambda: new_learning(parts, config.learn, learns), svc.publisher.submit,
            config.events.retention_days, gateway.clock.time))
    if config.breaker.fleet:
        svc.breakers = FleetBreakers(gateway.breakers, svc.instance,
                                     lease_s=config.breaker.probe_lease_s,
                                     replicas=config.events.replicas,
                                     stream=config.events.stream)
    try:
        await svc.start()
    except BaseException:
        await svc.stop()  # e.g. the embedded server started, then something else failed
        raise
    recorders = gateway.pipeline.recorders
    recorders.append(svc.recorder)
    gateway.events = svc
    gateway.directory.attach(svc)
    gateway.ready_checks.append(svc.not_ready)
    if rate is not None:
        rate.shared = svc.ratelimits  # None unless [events] shared_rate_limits
    try:
        yield
    finally:
        if rate is not None:
            rate.shared = None
        # Calls still settling after shutdown began keep recording into the queue that
        # stop() drains; only then is the recorder taken out.
        await svc.stop()
        gateway.directory.detach()
        gateway.ready_checks.remove(svc.not_ready)
        recorders.remove(svc.recorder)
        gateway.events = None


def _error(exc: Exception) -> Response:
    status, body = error_body(exc)
    return Response(body, status, media_type="application/json")


def _caller(request: Request) -> tuple[str | None, bool]:
    """(tenant id of the caller or None, is admin)."""
    from tollway.context import info_of

    principal = info_of(cast(dict[str, Any], request.scope)).principal
    if principal is None:
        return None, False
    return (principal.tenant_id or None), principal.admin


def _target_tenant(request: Request, *, required: bool) -> str | None:
    tenant, admin = _caller(request)
    asked = request.query_params.get("tenant")
    if admin:
        if required and not asked:
            raise InvalidRequest("the admin key has no budget of its own: pass ?tenant=ID",
                                 param="tenant")
        return asked or None
    if asked and asked != tenant:
        raise PermissionDenied("a tenant key can only read its own usage", param="tenant")
    return tenant


def _days(request: Request) -> tuple[str, str]:
    q = request.query_params
    today = day_of(time.time())
    try:
        days = int(q.get("days", "30"))
    except ValueError:
        raise InvalidRequest("days must be an integer", param="days") from None
    if not 1 <= days <= 3660:
        raise InvalidRequest("days must be between 1 and 3660", param="days")
    since = q.get("since") or day_of(time.time() - (days - 1) * 86400)
    until = q.get("until") or today
    for name, value in (("since", since), ("until", until)):
        if len(value) != 10 or value[4] != "-" or value[7] != "-":
            raise InvalidRequest(f"{name} must be a day, YYYY-MM-DD", param=name)
    return since, until


def _usd(nanousd: int) -> float:
    return nanousd / NANO


def routes(gateway: Gateway) -> list[BaseRoute]:
    def service() -> EventsService:
        svc = gateway.events
        if svc is None:
            raise NotReady("usage and budgets need the events layer ([nats] enabled = true)")
        return svc

    async def usage(request: Request) -> Response:
        try:
            svc = service()
            tenant = _target_tenant(request, required=False)
            since, until = _days(request)
        except Exception as exc:
            return _error(exc)
        view = svc.usage_view
        # Days before the retention are pruned: say which days the answer covers.
        since = max(since, view.seen.oldest)
        body: dict[str, Any] = {"object": "usage", "tenant": tenant, "since": since,
                                "until": until, "retention_days": view.seen.keep_days}
        body.update(svc.usage(tenant, since, until))
        body["as_of_sequence"] = view.last_seq
        return JSONResponse(body)

    async def budget(request: Request) -> Response:
        try:
            svc = service()
            tenant_id = _target_tenant(request, required=True)
            tenant = gateway.tenant(tenant_id or "")
            if tenant is None:
                raise InvalidRequest(f"no tenant {tenant_id!r}", param="tenant")
        except Exception as exc:
            return _error(exc)
        tier = gateway.config.tiers.get(tenant.tier)
        max_call = round((tier.max_call_usd if tier else 0.0) * NANO)
        daily = round((tenant.daily_usd if tenant.daily_usd is not None
                       else (tier.daily_usd if tier else 0.0)) * NANO)
        account = tenant.id
        key_id = request.query_params.get("key_id")
        if key_id is not None:  # the key's own budget, an account beside the tenant's
            own = gateway.directory.key_budget(key_id)
            if own is None or own[0] != tenant.id:
                return _error(InvalidRequest(
                    f"no key {key_id!r} with a daily budget of its own for tenant "
                    f"{tenant.id!r}", param="key_id"))
            account, daily = own[1], round(own[2] * NANO)
        s = svc.budget.summary(account, daily)
        return JSONResponse({
            "object": "budget",
            "tenant": tenant.id,
            "tier": tenant.tier,
            "day": s["day"],
            "max_call_usd": _usd(max_call),
            "max_call_nanousd": max_call,
            "daily_usd": _usd(daily),
            "daily_nanousd": daily,
            "spent_usd": _usd(s["spent_nanousd"]),
            "spent_nanousd": s["spent_nanousd"],
            "reserved_usd": _usd(s["reserved_nanousd"]),
            "reserved_nanousd": s["reserved_nanousd"],
            "in_flight_nanousd": s["in_flight_nanousd"],
            "remaining_usd": _usd(s["remaining_nanousd"]),
            "remaining_nanousd": s["remaining_nanousd"],
            "open_reservations": s["open_reservations"],
            "as_of_sequence": svc.budget_state.last_seq,
            "key": key_id,
        })

    return [
        Route("/api/ai/usage", usage, methods=["GET"]),
        Route("/api/ai/budget", budget, methods=["GET"]),
    ]
