"""The gateway's guards in front of a host app's own routes (``tollway.GuardMiddleware``).

A service that is not an LLM call (a search endpoint, a report that calls a
model itself, anything billed per use) gets what tollway gives its own
routes: the tenant's rate limits, its daily budget, the sensitivity rule of
its config, and one call event per request on the same stream. The host app
names the tenant (a callable of the ASGI scope) and what a call costs: an
explicit callback in USD, or a token estimate of the request body at a
configured model's price. A route may report its actual cost, before its
response's last bytes, in ``scope["tollway.cost_usd"]`` (USD); otherwise a call
answered below 400 costs what was estimated, and one answered with an error
costs nothing.

The steps are the pipeline's own (hints, sensitivity cap, rate limit guard,
budget guard, finish, record), on a :class:`tollway.pipeline.call.Call` whose
plan has no deployment: nothing is dispatched, the host's route answers.

When the event is written: by default right after the server took the
response's last bytes, in the same step (no other task runs in between under
uvicorn), so the client does not wait for it: a process killed in those
microseconds loses that one event. With ``event_before_last_bytes=True`` the
call is settled and its event in the outbox before the last bytes go, as on
the pipeline's own calls, where it costs nothing next to the LLM's time: a
process killed once the client has its answer loses no event, for ~50-100 µs
more a request (``benchmarks/middleware.py``).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from tollway.asgi import (
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    read_body,
    route_path,
    send_error,
)
from tollway.auth import Principal
from tollway.context import SCOPE_KEY, RequestInfo, new_request_id, request_id_var
from tollway.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidRequest,
    PermissionDenied,
    TollwayError,
    spec_for,
)
from tollway.gateway import Gateway
from tollway.pipeline import SENSITIVITIES, Pipeline
from tollway.pipeline.call import Call
from tollway.pipeline.plan import RoutePlan
from tollway.pipeline.usage import count_text
from tollway.record import CallRecord
from tollway.tokens import UnknownModelError

__all__ = ["COST_KEY", "GuardMiddleware"]

log = logging.getLogger("tollway.guard")

# A route that knows what its call cost sets this in the ASGI scope (USD, a number);
# Starlette's routing shares the scope dict, so ``request.scope[COST_KEY] = 0.002`` works.
COST_KEY = "tollway.cost_usd"

NANO = 1_000_000_000

TenantOf = Callable[[Scope], str | Awaitable[str | None] | None]
CostOf = Callable[[Scope], float | Awaitable[float]]
SensitivityOf = Callable[[Scope], str | None]


class _HasCore(Protocol):
    """``tollway.Gateway`` (the in-process API), which holds the gateway as ``core``."""

    @property
    def core(self) -> Gateway: ...


def _valid_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and all(c in _ID_BYTES for c in value):
                return bytes(value).decode("ascii")
            break
    return new_request_id()


_ID_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


class GuardMiddleware:
    """Pure ASGI middleware: ``Middleware(GuardMiddleware, gateway=gw, tenant=...)``.

    ``gateway``: a running ``tollway.Gateway`` (or the ``.gateway`` of ``create_app``'s
    app), whose lifespan the host runs. ``tenant(scope)``: the tenant id of the request
    (sync or async); None refuses it (401), an id the gateway does not know too (403).
    ``cost(scope)``: what the call costs in USD, held against the day's budget before the
    route runs; or ``model`` (a model id of the config): the request body's tokens
    (plus ``output_tokens``) at its prices. Neither: the call is only rate limited.
    ``sensitivity(scope)``: the data's sensitivity (else the ``X-Tollway-Sensitivity``
    header), refused above the tenant's ``max_sensitivity``. ``paths``: the path
    prefixes guarded (default: every path). ``endpoint``: the call events' endpoint.
    ``event_before_last_bytes``: write each call's event before its response's last bytes
    (the pipeline's promise) instead of right after them (see the module's doc).
    """

    def __init__(self, app: Any, *, gateway: Gateway | _HasCore, tenant: TenantOf,
                 cost: CostOf | None = None, model: str | None = None,
                 output_tokens: int = 0, sensitivity: SensitivityOf | None = None,
                 paths: Collection[str] | None = None, endpoint: str = "host",
                 event_before_last_bytes: bool = False) -> None:
        self.app = app
        self.event_before_last_bytes = event_before_last_bytes
        core = gateway if isinstance(gateway, Gateway) else gateway.core
        self.gateway = core
        self.pipeline: Pipeline = core.pipeline
        self.tenant_of = tenant
        # Known once: a coroutine function's result is awaited (asked per call, this costs).
        self.tenant_async = inspect.iscoroutinefunction(tenant)
        self.cost_of = cost
        self.cost_async = cost is not None and inspect.iscoroutinefunction(cost)
        self.sensitivity_of = sensitivity
        self.paths = tuple(paths) if paths is not None else None
        self.endpoint = endpoint
        self.output_tokens = output_tokens
        self.model = model
        self.encoding_model = ""
        if model is not None:
            dep = core.catalog.models.get(model)
            if dep is None:
                raise UnknownModelError(f"GuardMiddleware: model {model!r} is not in the "
                                        "gateway's config")
            self.encoding_model = dep.upstream
        self.max_body = core.config.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope) if scope.get("root_path") else scope["path"]
        if self.paths is not None and not path.startswith(self.paths):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = _valid_id(scope)
        token = request_id_var.set(rid)
        try:
            await self._guarded(scope, receive, send, path, rid, t0)
        finally:
            request_id_var.reset(token)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str,
                       rid: str, t0: float) -> None:
        rid_header = (b"x-request-id", rid.encode())
        try:
            tenant_id = self.tenant_of(scope)
            if self.tenant_async or inspect.isawaitable(tenant_id):
                tenant_id = await tenant_id  # type: ignore[misc]
        except Exception:  # the host's callable failed: its caller gets the 500 envelope
            log.exception("guard: the tenant callable failed")
            await send_error(send, InternalError("internal error"), [rid_header])
            return
        if not tenant_id:
            await send_error(send, AuthenticationFailed(
                "this route needs a caller the service knows", code="missing_tenant"),
                [rid_header])
            return
        tenant = self.gateway.tenant(tenant_id)
        if tenant is None:
            await send_error(send, PermissionDenied(f"unknown tenant {tenant_id!r}",
                                                    code="unknown_tenant"), [rid_header])
            return
        info = RequestInfo(rid, t0)
        info.principal = Principal(tenant)
        if SCOPE_KEY not in scope:  # tollway's own info when mounted inside the gateway app
            scope[SCOPE_KEY] = info
        gateway = self.gateway
        call = Call(self.endpoint, info, tenant, gateway.clock.time())
        call.plan = RoutePlan(path, ())
        call.status = 0
        done: list[CallRecord | None] = []  # the call ended (_end), then its record
        try:
            try:
                receive = await self._admit(call, scope, receive)
            except TollwayError as exc:
                await self._refuse(call, exc, send, rid_header)
                return
            except ClientGone:
                call.client_cancelled = True
                call.status = 499
                call.error = InvalidRequest("client closed the connection before the body")
                return
            except Exception:  # a host callback failed (tenant, cost, sensitivity)
                log.exception("guard: admitting the call failed")
                await self._refuse(call, InternalError("internal error"), send, rid_header)
                return
            await self._serve(call, scope, receive, send, rid_header, done)
        finally:
            if not done:  # refused before the route ran (_serve ends every call it serves)
                self._end(call, done)
            rec = done[0]
            if rec is not None:
                self.pipeline.observe(call, rec)  # after the last bytes: no one waits on it

    def _end(self, call: Call, done: list[CallRecord | None]) -> None:
        done.append(None)  # once, even if what follows raises
        self.pipeline.finish(call)  # settles or releases the budget's hold
        done[0] = self.pipeline.record(call)

    @staticmethod
    async def _refuse(call: Call, exc: TollwayError, send: Send,
                      rid_header: tuple[bytes, bytes]) -> None:
        call.error = exc
        call.status = spec_for(exc).status
        await send_error(send, exc, [*call.headers, rid_header])

    async def _admit(self, call: Call, scope: Scope, receive: Receive) -> Receive:
        """Hints, sensitivity, rate limit, budget: raises the refusal. Returns the receive
        the route reads its body from (the body again, when it was read for an estimate)."""
        pipeline = self.pipeline
        content_length = None
        for name, value in scope["headers"]:
            if name.startswith(b"x-tollway-"):
                pipeline.hint(call, name, value)
            elif name == b"content-length":
                content_length = value
        if self.sensitivity_of is not None:
            declared = self.sensitivity_of(scope)
            if declared:
                if declared not in SENSITIVITIES:
                    raise InvalidRequest(f"unknown sensitivity {declared!r}")
                call.sensitivity = declared
        if call.sensitivity and call.tenant.max_sensitivity is not None:
            Pipeline.sensitivity_cap(call)
        plan = call.plan
        assert plan is not None
        rate = self.gateway.rate_guard
        if rate is not None:
            pending = rate.check(call, plan)
            if pending is not None:
                await pending
        amount = 0
        if self.cost_of is not None:
            usd = self.cost_of(scope)
            if self.cost_async or inspect.isawaitable(usd):
                usd = await usd  # type: ignore[misc]
            amount = _nano(usd)
        elif self.model is not None:
            body = await read_body(receive, self.max_body, content_length)
            receive = _replay(body, receive)
            call.prompt_tokens = count_text(body.decode("utf-8", "replace"),
                                            self.encoding_model)
            call.completion_tokens = self.output_tokens
            amount = self.gateway.estimator.cost(self.model, call.prompt_tokens,
                                                 self.output_tokens)
        budget = self.gateway.budget_guard
        call.estimated_cost_nanousd = amount
        if budget is not None and amount > 0:
            held = budget.hold_amount(call, amount)
            if held is not None:
                await held
        return receive

    async def _serve(self, call: Call, scope: Scope, receive: Receive, send: Send,
                     rid_header: tuple[bytes, bytes], done: list[CallRecord | None]) -> None:
        extra = [*call.headers, rid_header]
        before = self.event_before_last_bytes

        async def sending(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                call.status = message["status"]
                call.response_started = True
                message["headers"] = [*message.get("headers", ()), *extra]
            elif kind == "http.response.body" and not message.get("more_body") and not done:
                self._settle(call, scope)  # the status and cost as the route left them
                if before:
                    self._end(call, done)
                else:  # the client does not wait for the record; nothing awaits between
                    try:
                        await send(message)
                    finally:
                        self._end(call, done)
                    return
            await send(message)

        call.attempts = 1
        try:
            await self.app(scope, receive, sending)
        except BaseException:
            if not done:
                call.error = InternalError("the route raised an exception")
                call.status = call.status or 500
            raise
        finally:
            if not done:  # no last bytes: the route failed, or its client left
                self._settle(call, scope)
                self._end(call, done)

    @staticmethod
    def _settle(call: Call, scope: Scope) -> None:
        call.settled = True
        status = call.status or 500
        call.status = status
        if status >= 500 and call.error is None:
            call.error = InternalError(f"the route answered {status}")
        reported = scope.get(COST_KEY)
        if reported is not None:
            try:
                call.cost_nanousd = _nano(reported)
                return
            except InvalidRequest:
                log.error("guard: the route reported a cost that is not a number of USD "
                          ">= 0; the estimate is charged")
        if status < 400:
            call.cost_nanousd = call.estimated_cost_nanousd


def _nano(usd: object) -> int:
    if isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd) \
            or usd < 0:
        raise InvalidRequest(f"a call's cost is a finite number of USD >= 0, not {usd!r}")
    return round(usd * NANO)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the route the body already read, then the client's messages."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
