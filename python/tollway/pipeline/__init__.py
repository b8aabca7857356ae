"""The request pipeline: the one place that orders the steps of a call.

    auth -> decode -> plan -> guards -> dispatch -> settle -> record

:meth:`Pipeline.run` is that order; each step is a method (or a module of
this package) that later issues replace or extend without touching the
order: routing policy plugs into :meth:`Pipeline.plan`, rate limits, budgets
and cost caps are :data:`Guard` callables, retries and breakers live in
:mod:`.dispatch`; a :data:`DecodeHook` may rewrite a decoded request before it
is counted or planned, and a :data:`ReplyHook` sees a whole reply before the
client does (the tool registry, :mod:`tollway.tools`, is both). Settle and
record are synchronous and run just before the response's last bytes go out
(so the call's event is in the outbox before the client has its whole
answer), else in ``finally``, so a client that disconnects (or a cancelled
task) cannot skip them: every call that reaches the pipeline ends as exactly
one :class:`CallRecord`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from tollway.asgi import (
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    read_body,
    send_bytes,
)
from tollway.context import CYCLE_KEY, SCOPE_KEY, RequestInfo
from tollway.errors import (
    InternalError,
    InvalidRequest,
    NotReady,
    PermissionDenied,
    TollwayError,
    spec_for,
)
from tollway.pipeline.anthropic import MESSAGES_SURFACE
from tollway.pipeline.call import Call
from tollway.pipeline.completions import COMPLETIONS_SURFACE
from tollway.pipeline.dispatch import Dispatcher, cost_header, served_headers
from tollway.pipeline.hooks import (
    CallTracer,
    DecodeHook,
    Finisher,
    Guard,
    PlanHook,
    ReplyHook,
    Responder,
)
from tollway.pipeline.plan import RoutePlan
from tollway.pipeline.prompt import THREAD_MIN_BYTES, count_in_thread, prompt_tokens
from tollway.pipeline.rerank import RERANK_SURFACE
from tollway.pipeline.responses import RESPONSES_SURFACE
from tollway.pipeline.surface import CHAT_SURFACE, EMBEDDINGS_SURFACE, Surface
from tollway.pipeline.usage import CachedUsage, Usage, count_text
from tollway.record import CallRecord, Outcome, Recorder

if TYPE_CHECKING:
    from tollway.parts import GatewayParts

log = logging.getLogger("tollway.pipeline")

TASKS = frozenset({"chat", "draft", "summarize", "classify", "extract", "code", "embed"})
SENSITIVITIES = frozenset({"public", "internal", "confidential", "restricted"})
SENSITIVITY_RANK = {"public": 0, "internal": 1, "confidential": 2, "restricted": 3}
LATENCIES = frozenset({"interactive", "standard", "batch"})
_HINTS = {
    b"x-tollway-task": ("task", TASKS),
    b"x-tollway-sensitivity": ("sensitivity", SENSITIVITIES),
    b"x-tollway-latency": ("latency_class", LATENCIES),
}


class Pipeline:
    def __init__(self, parts: GatewayParts) -> None:
        self.parts = parts
        self.max_body = parts.config.server.max_body_bytes
        # Where the other parts plug in: the gateway sets the guards (and the budget's
        # finisher); the events and shadow lifespans add theirs while the app runs.
        self.guards: list[Guard] = []
        self.finishers: list[Finisher] = []
        self.plan_hooks: list[PlanHook] = []
        self.responders: list[Responder] = []  # may answer a call before dispatch (cache)
        self.recorders: list[Recorder] = []  # each gets every call's record, in this order
        self.decode_hooks: list[DecodeHook] = []  # after 2: the tool registry's inlining
        self.reply_hooks: list[ReplyHook] = []  # after 5, on a whole reply: tool validation
        # Starts each call's trace; None (tracing off): a call pays nothing for tracing.
        self.tracer: CallTracer | None = None
        self.dispatcher = Dispatcher(parts)

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(CHAT_SURFACE, scope, receive, send)

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(EMBEDDINGS_SURFACE, scope, receive, send)

    async def rerank(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(RERANK_SURFACE, scope, receive, send)

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(COMPLETIONS_SURFACE, scope, receive, send)

    async def messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(MESSAGES_SURFACE, scope, receive, send)

    async def responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.run(RESPONSES_SURFACE, scope, receive, send)

    # ---- the order --------------------------------------------------------
    async def run(self, surface: Surface, scope: Scope, receive: Receive, send: Send) -> None:
        """One call on ``surface`` (the API it came in on: see :mod:`.surface`)."""
        endpoint = surface.endpoint
        info: RequestInfo = scope[SCOPE_KEY]
        call = self.authorize(surface, info)  # 1 auth (the key was checked by the middleware)
        if call is None:
            await surface.send_error(send, PermissionDenied("this endpoint needs a tenant "
                                                            "key, not the admin key"))
            return
        if self.tracer is not None:
            call.trace = self.tracer(call, scope)
        call.relay_to = scope.get(CYCLE_KEY)  # uvicorn's cycle, for native.py
        concluded = False
        rec: CallRecord | None = None

        def conclude() -> None:  # 6 and 7, once
            nonlocal concluded, rec
            if concluded:
                return
            concluded = True
            try:
                self.settle(call)  # 6 again: a no-op unless the call ended early
            except Exception:  # e.g. a panic in the core while counting: still one record
                log.exception("settle failed")
            self.finish(call)
            rec = self.record(call)  # 7

        start: Message | None = None

        async def send_last(message: Message) -> None:
            # Recorded before the response's last bytes (the record's event is then in the
            # outbox): a gateway killed once the client has its whole answer loses no event.
            # The head waits for the next message, so that head and body leave back to back
            # with the record before both: a head sent alone wakes the client for nothing,
            # and it costs both sides a wake-up more per call.
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if not message.get("more_body"):
                conclude()
            if start is not None:
                head, start = start, None
                await send(head)
            await send(message)

        try:
            try:
                await self.decode(call, scope, receive)  # 2
                for decoded in self.decode_hooks:
                    decoded(call)
                await self.count_ahead(call)  # a large prompt, off the loop, for 3's estimate
                plan = self.plan(call)  # 3
                for guard in self.guards:  # 4
                    await guard(call, plan)
                send_on: Send | None = send_last
                for responder in self.responders:  # 4b: e.g. the response cache
                    send_on = await responder(call, send_on or send_last)
                    if send_on is None:  # answered (settled, and its send concluded it)
                        break
                if send_on is not None:
                    sender: Send = send_on
                    if sender is not send_last:
                        # A responder keeps what goes out (the cache, a stream to store):
                        # every byte must pass its send, so no native relay.
                        call.relay_to = None
                    await self.dispatcher.dispatch(call, receive, sender)  # 5 (streams)
                    if not call.response_started:
                        for replied in self.reply_hooks:  # e.g. the tool registry's check
                            await replied(call, lambda: self.dispatcher.dispatch(
                                call, receive, sender))
                    await self.count_ahead(call)  # ... and for 6 when the provider did not
                    self.settle(call)  # 6
                    if not call.response_started:
                        await self.respond(call, sender)
            except TollwayError as exc:
                await self.fail(call, exc, send_last)
            except ClientGone:
                call.client_cancelled = True
                call.status = 499
                call.error = InvalidRequest("client closed the connection before the body")
            except Exception:
                log.exception("pipeline error", extra={"endpoint": endpoint})
                await self.fail(call, InternalError("internal error"), send_last)
            except asyncio.CancelledError:
                # The server cut the call: it outlasted the drain after SIGTERM ([server]
                # drain_timeout_s). A call not yet answered gets a 503 to retry elsewhere
                # (the server would answer a 500) and is recorded as failed; a stream under
                # way has had its last word from the relay.
                if not call.response_started:
                    await self.fail(call, NotReady(
                        "the gateway is shutting down; retry the call", code="shutting_down",
                        headers={"Retry-After": "1"}), send_last)
                raise
        finally:
            conclude()  # the call ended without a last message (the client left)
            if rec is not None:
                self.observe(call, rec)  # after the last bytes: the client does not wait on it

    # ---- steps ------------------------------------------------------------
    def authorize(self, surface: Surface, info: RequestInfo) -> Call | None:
        """The call of the tenant behind the key; None for the admin key (not a tenant)."""
        principal = info.principal
        if principal is None or principal.tenant is None:
            return None
        call = Call(surface.endpoint, info, principal.tenant, self.parts.clock.time(),
                    surface)
        call.limit_scope = principal.limit_scope
        call.budget_scope = principal.budget_scope
        call.key_id = principal.key_id
        return call

    async def decode(self, call: Call, scope: Scope, receive: Receive) -> None:
        content_length = None
        keep = call.surface.protocol_headers
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = value
            elif name.startswith(b"x-tollway-"):
                self.hint(call, name, value)
            elif name in keep:
                call.protocol_headers[name.decode()] = value.decode("latin-1")
            elif name == b"cache-control":
                call.cache_control = value.decode("latin-1")
        if call.sensitivity and call.tenant.max_sensitivity is not None:
            self.sensitivity_cap(call)
        call.body = await read_body(receive, self.max_body, content_length)
        call.surface.decode(call)
        call.info.stream = call.stream

    @staticmethod
    def sensitivity_cap(call: Call) -> None:
        """Refuse data above the tenant's ``max_sensitivity`` (also tollway.GuardMiddleware's
        rule for a host app's routes)."""
        cap = call.tenant.max_sensitivity
        if cap is not None and SENSITIVITY_RANK[call.sensitivity] > SENSITIVITY_RANK[cap]:
            call.reason = f"refused: {call.sensitivity} data above the tenant's {cap}"
            raise PermissionDenied(
                f"this tenant may send data up to {cap!r}; the request declares "
                f"{call.sensitivity!r}", param="x-tollway-sensitivity",
                code="sensitivity_not_allowed")

    def hint(self, call: Call, name: bytes, raw: bytes) -> None:
        """Apply one ``X-Tollway-*`` request header to the call (or refuse its value)."""
        if name == b"x-tollway-user":  # a caller-given user id: case kept, not validated
            call.user = raw.decode("latin-1").strip()[:256]
            return
        value = raw.decode("latin-1").strip().lower()
        hint = _HINTS.get(name)
        if hint is not None:
            attr, allowed = hint
            if value not in allowed:
                raise InvalidRequest(
                    f"{name.decode()} must be one of: {', '.join(sorted(allowed))}",
                    param=name.decode())
            setattr(call, attr, value)
        elif name == b"x-tollway-budget-tier":
            tiers = self.parts.config.tiers
            own = tiers[call.tenant.tier]
            asked = tiers.get(value)
            if asked is None:
                raise InvalidRequest(f"unknown budget tier {value!r}", param=name.decode())
            if asked.max_call_usd > own.max_call_usd or asked.daily_usd > own.daily_usd:
                raise InvalidRequest("X-Tollway-Budget-Tier may only lower the tenant's tier",
                                     param=name.decode())
            call.tier = value

    def plan(self, call: Call) -> RoutePlan:
        plan: RoutePlan = self.parts.policy.plan(call)  # tollway.policy: may refuse (403, ...)
        for hook in self.plan_hooks:
            plan = hook(call, plan)
        call.plan = plan
        call.reason = plan.reason
        return plan

    async def count_ahead(self, call: Call) -> None:
        """Count a large prompt in a thread before the policy's estimate (no deployment yet)
        or the settle (the serving one, when the provider sent no usage) needs it."""
        if len(call.body) < THREAD_MIN_BYTES:
            return
        dep = call.deployment
        if dep is None:
            await count_in_thread(call, self.parts.policy.upstreams(call))
        elif (call.tap.usage if call.tap is not None else call.usage) is None:
            await count_in_thread(call, (dep.upstream,))

    def settle(self, call: Call) -> None:
        """Tokens and actual cost: the provider's usage, or counted tokens."""
        if call.settled:
            return
        call.settled = True
        dep = call.deployment
        if dep is None:
            return
        self._settle_tokens(call)
        cached = call.cache_read_tokens + call.cache_write_tokens
        if cached:
            call.cost_nanousd = self.parts.cache_prices.cost(
                self.parts.estimator, dep.model, max(0, call.prompt_tokens - cached),
                call.completion_tokens, call.cache_read_tokens, call.cache_write_tokens)
        else:
            call.cost_nanousd = self.parts.estimator.cost(
                dep.model, call.prompt_tokens, call.completion_tokens)

    def _settle_tokens(self, call: Call) -> None:
        dep = call.deployment
        assert dep is not None
        if call.tap is not None:
            usage = call.tap.usage
            if usage is not None:
                _take(call, usage)
            else:  # no usage chunk (provider sent none, or the client left before it)
                call.prompt_tokens = prompt_tokens(call, dep.upstream) or 0
                call.completion_tokens = count_text(call.tap.text(), dep.upstream)
            return
        reply = call.reply
        if reply is None:
            return
        usage = call.usage
        if usage is not None:
            _take(call, usage)
        else:
            call.prompt_tokens = prompt_tokens(call, dep.upstream) or 0
            if call.wire is not None:
                call.completion_tokens = count_text(call.wire.text(reply.body), dep.upstream)

    def finish(self, call: Call) -> None:
        for finisher in self.finishers:
            try:
                finisher(call)
            except Exception:  # a finisher must not raise; the record still gets written
                log.exception("finisher failed")

    async def respond(self, call: Call, send: Send) -> None:
        dep, reply = call.deployment, call.reply
        assert dep is not None and reply is not None
        headers = served_headers(call)
        headers.append((b"x-tollway-cost-usd", cost_header(call.cost_nanousd)))
        headers.extend(call.headers)
        body = call.wire.reply(call, reply.body) if call.wire is not None else reply.body
        call.response_started = True
        await send_bytes(send, 200, body, headers)

    async def fail(self, call: Call, exc: TollwayError, send: Send) -> None:
        call.error = exc
        call.status = spec_for(exc).status
        if call.response_started:
            return  # a stream already under way ends with an error event instead
        headers = served_headers(call)
        headers.extend(call.headers)
        call.response_started = True
        await call.surface.send_error(send, exc, headers)

    def record(self, call: Call) -> CallRecord:
        """The call's one record, to the recorders (the events' outbox among them): before
        the response's last bytes. :meth:`observe` takes it to the metrics after them."""
        info = call.info
        now = time.perf_counter()
        latency = now - call.t0
        dep = call.deployment
        exc = call.error
        spec = spec_for(exc) if exc is not None else None
        outcome: Outcome
        if exc is None:
            outcome = "completed"
        elif call.attempts == 0 and not isinstance(exc, InternalError):
            outcome = "rejected"  # a refusal; a bug before dispatch is a failure, not one
        else:
            outcome = "failed"
        ttft = None
        if call.tap is not None and call.tap.first_token_at is not None:
            ttft = call.tap.first_token_at - call.t0
        req: Any = call.request
        route = call.plan.route if call.plan is not None else (
            getattr(req, "model", "") if req is not None else "")
        rec = CallRecord(
            request_id=info.request_id,
            tenant=call.tenant.id,
            occurred_at=call.occurred_at,
            outcome=outcome,
            endpoint=call.endpoint,
            route=route,
            provider=dep.provider if dep is not None else "",
            model=dep.model if dep is not None else "",
            upstream_model=dep.upstream if dep is not None else "",
            task=call.task,
            sensitivity=call.sensitivity,
            tier=call.tier,
            latency_class=call.latency_class,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            estimated_cost_nanousd=call.estimated_cost_nanousd,
            actual_cost_nanousd=call.cost_nanousd,
            latency_s=latency,
            ttft_s=ttft,
            overhead_s=max(0.0, latency - info.upstream_s),
            attempts=call.attempts,
            fallbacks=tuple(call.fallbacks),
            stream=call.stream,
            client_cancelled=call.client_cancelled,
            status=call.status,
            error_type=spec.type if spec is not None else None,
            error_code=spec.code if spec is not None else None,
            error_message=exc.message if exc is not None else None,
            reason=call.reason,
            reservation_id=call.hold_id,
            max_tokens_bound=call.output_bound or None,
            flags=call.flags,
            cache_read_tokens=call.cache_read_tokens,
            cache_write_tokens=call.cache_write_tokens,
            key_id=call.key_id,
            budget_scope=call.budget_scope,
            key_reservation_id=call.key_hold_id,
            tool_calls=call.tool_calls,
            tool_calls_invalid=call.tool_calls_invalid,
            tool_retried=call.tool_retried,
            cache=call.cache.state if call.cache is not None else "",
            saved_nanousd=call.saved_nanousd,
        )
        for recorder in self.recorders:
            try:
                recorder.record(rec)
            except Exception:  # a recorder must not raise; if one does, the call still ends
                log.exception("recorder failed")
        return rec

    def observe(self, call: Call, rec: CallRecord) -> None:
        """The call's record to the metrics and its log line's fields (the request's info,
        which the access log writes once the app returns)."""
        self.parts.metrics.observe_call(rec)
        info = call.info
        info.route = rec.route
        info.model = rec.model or rec.route
        info.provider = rec.provider
        info.prompt_tokens = rec.prompt_tokens
        info.completion_tokens = rec.completion_tokens
        info.cost_usd = rec.actual_cost_nanousd / 1e9
        info.reason = rec.reason
        info.client_cancelled = rec.client_cancelled
        if call.error is not None:
            info.error = f"{rec.error_code}: {rec.error_message}"
        if info.status == 0:
            info.status = call.status


def _take(call: Call, usage: Usage) -> None:
    """The provider's usage as the call's tokens (cache reads and writes included)."""
    call.prompt_tokens, call.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    if isinstance(usage, CachedUsage):
        call.cache_read_tokens = usage.cache_read_tokens
        call.cache_write_tokens = usage.cache_write_tokens
