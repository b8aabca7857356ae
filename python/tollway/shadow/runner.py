"""Shadow calls: a sample of live calls sent to candidate models after the caller has its answer.

:meth:`ShadowRunner.on_call` is a pipeline finisher: it runs once per call
after settle, when a non-streamed reply has been sent and a stream has
ended. It never awaits and never raises: for a call that is not sampled it
costs a dict lookup and one random draw; for a sampled one it snapshots what
the comparison needs and starts a background task per candidate. The task,
not the response path, pays for everything else: the prompt count for the
spend hold, the candidate call (always non-streamed, whatever the caller
asked), reading its reply, the agreement score, the event.

Caps, per ``[[shadow]]`` route: the sampled ``fraction``; ``max_in_flight``
shadow calls at once (a sampled call over it is skipped, never queued, so a
slow candidate cannot pile up work); the daily shadow spend (see
:mod:`tollway.shadow.spend`), never the tenant's budget or rate limits. A
shadow call never touches the caller's response, the breakers or the
latency tracker: a failing candidate only shows in its own events, metrics
and report. Sensitivity follows the live rule: a request whose sensitivity
is local-only (confidential, restricted) is shadowed only to candidates on
local providers. A tenant's model allow-list is not applied: it limits what
the tenant may ask for, and a shadow answer never reaches the tenant; which
data may leave for which provider is what sensitivity decides. A candidate
whose provider's breaker is open is skipped.

Tasks live in :attr:`ShadowRunner.tasks` (so they are not garbage collected
mid-flight) and :meth:`ShadowRunner.stop` cancels them at shutdown; a
cancelled shadow call publishes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from tollway.aio import cancel_and_wait
from tollway.config import ShadowRouteConfig
from tollway.errors import UpstreamError, UpstreamTimeout, public_message, spec_for
from tollway.metrics import Counter, Gauge
from tollway.pipeline.call import CHAT, EMBEDDINGS, Call
from tollway.pipeline.decode import rewrite
from tollway.pipeline.dispatch import upstream_error
from tollway.pipeline.plan import Deployment
from tollway.pipeline.prompt import count_in_thread, prompt_bound, prompt_tokens
from tollway.pipeline.usage import count_text, reply_text, reply_usage
from tollway.shadow.agreement import score
from tollway.shadow.event import ShadowCompared
from tollway.shadow.sampling import Sampler
from tollway.shadow.sink import ShadowSink
from tollway.shadow.spend import NANO, Hold, ShadowSpend

if TYPE_CHECKING:
    from tollway.parts import GatewayParts
    from tollway.providers import OpenAIProvider

__all__ = ["ShadowRunner", "candidate_body"]

log = logging.getLogger("tollway.shadow")


class _Choice(msgspec.Struct):
    finish_reason: str | None = None


class _Finish(msgspec.Struct):
    choices: list[_Choice] = []


_finish = msgspec.json.Decoder(_Finish)


def finish_reason(body: bytes) -> str:
    """The first choice's ``finish_reason`` of a completion ("" when unreadable)."""
    try:
        choices = _finish.decode(body).choices
    except msgspec.MsgspecError:
        return ""
    return (choices[0].finish_reason or "") if choices else ""


def _swapped(e: ShadowCompared) -> ShadowCompared:
    """A check of a live candidate: the shadow call went to the primary, so the sides of
    the comparison as made (live = "primary") trade places. The score is symmetric; the
    status and error stay the shadow call's (here: the primary's)."""
    return msgspec.structs.replace(
        e, verify=True,
        primary_provider=e.candidate_provider, candidate_provider=e.primary_provider,
        primary_model=e.candidate_model, candidate_model=e.primary_model,
        primary_stream=False, primary_ttft_s=None,
        primary_latency_s=e.candidate_latency_s, candidate_latency_s=e.primary_latency_s,
        primary_prompt_tokens=e.candidate_prompt_tokens,
        candidate_prompt_tokens=e.primary_prompt_tokens,
        primary_completion_tokens=e.candidate_completion_tokens,
        candidate_completion_tokens=e.primary_completion_tokens,
        primary_cost_nanousd=e.candidate_cost_nanousd,
        candidate_cost_nanousd=e.primary_cost_nanousd,
        primary_finish_reason=e.candidate_finish_reason,
        candidate_finish_reason=e.primary_finish_reason)


def candidate_body(body: bytes, upstream_model: str) -> bytes:
    """The caller's request for the candidate: its model, and never streamed."""
    return rewrite(body, model=upstream_model, include_usage=False,
                   drop=("stream", "stream_options"))


class _Route:
    __slots__ = ("candidates", "cfg", "in_flight", "models", "reference", "sampler", "spend",
                 "verifier")

    def __init__(self, cfg: ShadowRouteConfig, candidates: tuple[Deployment, ...],
                 spend: ShadowSpend) -> None:
        self.cfg = cfg
        self.candidates = candidates
        self.models = frozenset(d.model for d in candidates)
        self.sampler = Sampler(cfg.fraction, cfg.seed)
        self.spend = spend
        self.in_flight = 0
        # Learning routing (tollway.learn): while a candidate serves the route live, this
        # share of its calls is checked against ``reference``, the route's primary.
        self.verifier: Sampler | None = None
        self.reference: Deployment | None = None


class _Primary:
    """What the comparison needs of the live call, taken when it ended."""

    __slots__ = ("body", "completion_tokens", "cost", "ended", "max_output", "model",
                 "prompt_counts", "prompt_tokens", "provider", "reply", "request",
                 "request_id", "sensitivity", "stream", "tap", "task", "tenant", "ttft",
                 "upstream_s", "wire")

    def __init__(self, call: Call, default_max_output: int, body: bytes) -> None:
        dep = call.deployment
        assert dep is not None
        req = call.request
        self.request_id = call.info.request_id
        self.tenant = call.tenant.id
        self.task = call.task
        self.sensitivity = call.sensitivity
        self.body = body  # the call as chat completions: what the candidates are sent
        self.wire = call.wire
        self.request = req
        # The live call's prompt counts (tollway.pipeline.prompt): a candidate with the same
        # encoding counts nothing again.
        self.prompt_counts = call.prompt_counts
        self.model = dep.model
        self.provider = dep.provider
        self.stream = call.stream
        self.reply = call.reply.body if call.reply is not None else b""
        self.tap = call.tap
        self.upstream_s = call.info.upstream_s
        tap = call.tap
        self.ttft = (tap.first_token_at - call.t0
                     if tap is not None and tap.first_token_at is not None else None)
        self.prompt_tokens = call.prompt_tokens
        self.completion_tokens = call.completion_tokens
        self.cost = call.cost_nanousd
        per_choice = (getattr(req, "max_completion_tokens", None)
                      or getattr(req, "max_tokens", None)
                      or getattr(req, "max_output_tokens", None) or default_max_output)
        self.max_output = per_choice * max(1, getattr(req, "n", None) or 1)
        self.ended = time.perf_counter()

    def output(self) -> tuple[str, str]:
        """(flattened text, finish reason) of what the caller got."""
        if self.tap is not None:
            return self.tap.text(), getattr(self.tap, "finish_reason", None) or ""
        if self.wire is not None and self.wire.path != "chat":  # the provider's own API
            return self.wire.text(self.reply), ""
        return reply_text(self.reply), finish_reason(self.reply)


class ShadowRunner:
    def __init__(self, parts: GatewayParts, entries: list[ShadowRouteConfig], sink: ShadowSink,
                 *, others: Callable[[str, str], int] | None = None) -> None:
        """``others(route, day)``: shadow spend of other gateway processes (nano-USD)."""
        self.parts = parts
        self.sink = sink
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        catalog = parts.catalog
        now = parts.clock.time
        self.routes: dict[str, _Route] = {}
        for e in entries:
            if e.mode != "shadow":
                continue
            spend = ShadowSpend(round(e.daily_usd * NANO), now,
                                functools.partial(others, e.route) if others else None)
            self.routes[e.route] = _Route(
                e, tuple(catalog.models[c] for c in e.candidates), spend)
        # Shadow flags (tollway.directory.Directory.shadow_gate): False keeps a tenant's
        # calls out of a route's sampling; set by the app.
        self.gate: Callable[[str, str], bool | None] | None = None
        self.local_only = parts.policy.local_only
        self.default_max_output = parts.estimator.default_max_output_tokens
        self.sampled = Counter("tollway_shadow_sampled", "Live calls picked for shadowing.",
                               ["route"])
        self.skipped = Counter(
            "tollway_shadow_skipped",
            "Shadow calls not made, by reason (in_flight, spend_cap, sensitivity, same_model, "
            "breaker_open, stopping, error).", ["route", "candidate", "reason"])
        self.calls = Counter("tollway_shadow_calls",
                             "Shadow calls made, by outcome (answered, failed).",
                             ["route", "candidate", "outcome"])
        self.spend_usd = Counter("tollway_shadow_cost_usd",
                                 "Shadow spend (apart from tenant budgets).",
                                 ["route", "candidate"])
        self.in_flight = Gauge("tollway_shadow_in_flight", "Shadow calls running now.")
        self.collectors = (self.sampled, self.skipped, self.calls, self.spend_usd,
                           self.in_flight)

    # ---- the finisher (response path: sync, cheap, never raises) ------------------------------
    def on_call(self, call: Call) -> None:
        if call.error is not None or call.client_cancelled or call.endpoint == EMBEDDINGS:
            return
        if call.attempts == 0:
            return  # no provider answered it (a response-cache hit): nothing to compare
        req = call.request
        if req is None or call.deployment is None:
            return
        r = self.routes.get(req.model)
        if r is None:
            plan = call.plan
            if plan is None:
                return
            r = self.routes.get(plan.route)
            if r is None:
                return
        gate = self.gate
        if gate is not None and gate(r.cfg.route, call.tenant.id) is False:
            return  # a shadow flag covers the route, and not this tenant
        verifier, reference = r.verifier, r.reference
        # A candidate served it (learning routing): check it against the primary;
        # otherwise the route's own sample goes to its candidates.
        verifying = (verifier is not None and reference is not None
                     and call.deployment.model in r.models)
        if verifying:
            assert verifier is not None
            if not verifier():
                return
        elif not r.sampler():
            return
        try:
            # The candidates get the call as chat completions (Messages and Responses
            # translated); an API with no such form (legacy completions) is not shadowed.
            body = call.body if call.endpoint == CHAT else call.surface.shadow_body(call)
            if body is None:
                return
            if verifying:
                assert reference is not None
                self._start(r, call, body, (reference,), verify=True)
            else:
                self._start(r, call, body)
        except Exception:  # never the caller's problem
            log.exception("shadow: could not start a shadow call")

    def verify(self, route: str, fraction: float, seed: int | None = None) -> None:
        """Check the candidates of ``route`` that serve live against its primary (the
        first candidate of the alias, or the model the route names)."""
        r = self.routes.get(route)
        if r is None:
            return
        catalog = self.parts.catalog
        own = catalog.routes.get(route) or ((catalog.models[route],)
                                            if route in catalog.models else ())
        if own:
            r.reference = own[0]
            r.verifier = Sampler(fraction, seed)

    def _start(self, r: _Route, call: Call, body: bytes,
               to: tuple[Deployment, ...] | None = None, verify: bool = False) -> None:
        route = r.cfg.route
        self.sampled.inc((route,))
        primary: _Primary | None = None
        loop = asyncio.get_running_loop()
        for dep in r.candidates if to is None else to:
            reason = self._refusal(r, call, dep)
            if reason is not None:
                self.skipped.inc((route, dep.model, reason))
                continue
            if primary is None:
                primary = _Primary(call, self.default_max_output, body)
            provider = self.parts.providers[dep.provider]
            r.in_flight += 1
            self.in_flight.value += 1
            task = loop.create_task(self._shadow(r, dep, provider, primary, verify),
                                    name=f"tollway-shadow-{route}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _refusal(self, r: _Route, call: Call, dep: Deployment) -> str | None:
        if self.stopping:
            return "stopping"
        primary = call.deployment
        if primary is not None and primary.model == dep.model:
            return "same_model"
        if call.sensitivity in self.local_only and not dep.local:
            return "sensitivity"
        if r.in_flight >= r.cfg.max_in_flight:
            return "in_flight"
        if self.parts.breakers.state(dep.provider) == "open":
            return "breaker_open"
        return None

    # ---- the background task ------------------------------------------------------------------
    async def _shadow(self, r: _Route, dep: Deployment, provider: OpenAIProvider,
                      p: _Primary, verify: bool = False) -> None:
        route = r.cfg.route
        hold: Hold | None = None
        try:
            body = candidate_body(p.body, dep.upstream)
            await count_in_thread(p, (dep.upstream,))  # a large prompt, off the loop
            bound = self.parts.estimator.estimate(
                dep.model, prompt_bound(p, dep.upstream), p.max_output).max_cost_nanousd
            hold = r.spend.reserve(bound)
            if hold is None:
                self.skipped.inc((route, dep.model, "spend_cap"))
                return
            started = time.perf_counter()
            status, reply, error = 0, b"", None
            try:
                async with asyncio.timeout(r.cfg.timeout_s):
                    answer = await provider.post("chat", body, f"{p.request_id}-shadow")
                status, reply = answer.status, answer.body
                if status >= 300:
                    error = upstream_error(provider.name, status, reply, answer.headers)
            except TimeoutError:
                error = UpstreamTimeout(f"{provider.name}: shadow call took longer than "
                                        f"{r.cfg.timeout_s:g} s")
            except UpstreamError as exc:
                error = exc
            latency = time.perf_counter() - started
            event = self._compare(r, dep, p, status, reply, error, latency, started)
            if verify:
                event = _swapped(event)
            spent = event.primary_cost_nanousd if verify else event.candidate_cost_nanousd
            r.spend.settle(hold, spent)
            hold = None
            outcome = "failed" if event.candidate_error is not None else "answered"
            self.calls.inc((route, dep.model, outcome))
            if spent:
                self.spend_usd.inc((route, dep.model), spent / NANO)
            self.sink.publish(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.skipped.inc((route, dep.model, "error"))
            log.exception("shadow call failed", extra={"route": route, "candidate": dep.model})
        finally:
            if hold is not None:
                r.spend.release(hold)
            r.in_flight -= 1
            self.in_flight.value -= 1

    def _compare(self, r: _Route, dep: Deployment, p: _Primary, status: int, reply: bytes,
                 error: Exception | None, latency: float, started: float) -> ShadowCompared:
        prompt = completion = cost = 0
        text, finish = "", ""
        if error is None:
            try:
                usage = reply_usage(reply)
            except msgspec.MsgspecError:
                error = UpstreamError(f"{dep.provider}: provider sent an unreadable reply")
            else:
                text, finish = reply_text(reply), finish_reason(reply)
                if usage is not None:
                    prompt, completion = usage.prompt_tokens, usage.completion_tokens
                else:
                    prompt = prompt_tokens(p, dep.upstream) or 0
                    completion = count_text(text, dep.upstream)
                cost = self.parts.estimator.cost(dep.model, prompt, completion)
        agreement: float | None = None
        method = ""
        if error is None:
            primary_text, primary_finish = p.output()
            s = score(primary_text, text, primary_finish, finish)
            agreement, method = s.value, s.method
        else:
            _, primary_finish = p.output()
        threshold = r.cfg.agreement_threshold
        return ShadowCompared(
            event_id=self.sink.new_id(),
            occurred_at=self.parts.clock.time(),
            tenant=p.tenant,
            request_id=p.request_id,
            instance=self.sink.instance,
            route=r.cfg.route,
            task=p.task,
            sensitivity=p.sensitivity,
            primary_provider=p.provider,
            primary_model=p.model,
            candidate_provider=dep.provider,
            candidate_model=dep.model,
            primary_stream=p.stream,
            primary_latency_s=p.upstream_s,
            primary_ttft_s=p.ttft,
            candidate_latency_s=latency,
            candidate_delay_s=max(0.0, started - p.ended),
            primary_prompt_tokens=p.prompt_tokens,
            primary_completion_tokens=p.completion_tokens,
            candidate_prompt_tokens=prompt,
            candidate_completion_tokens=completion,
            primary_cost_nanousd=p.cost,
            candidate_cost_nanousd=cost,
            primary_finish_reason=primary_finish,
            candidate_finish_reason=finish,
            candidate_status=status,
            candidate_error=(spec_for(error).code or "error") if error is not None else None,
            candidate_error_message=public_message(error) if error is not None else None,
            agreement=agreement,
            agreement_method=method,
            agreement_threshold=threshold,
            agreed=agreement is not None and agreement >= threshold,
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    async def stop(self) -> None:
        """Cancel every shadow call still running (their holds are released)."""
        self.stopping = True
        await cancel_and_wait(list(self.tasks), what="shadow calls")
        self.tasks.clear()

    def status(self) -> dict[str, Any]:
        """This process's side of the caps (the report's figures come from the events)."""
        out = {}
        for name, r in self.routes.items():
            skipped: dict[str, int] = {}
            for (route, _, reason), n in self.skipped.values.items():
                if route == name:
                    skipped[reason] = skipped.get(reason, 0) + int(n)
            out[name] = {
                "candidates": [d.model for d in r.candidates],
                "fraction": r.cfg.fraction,
                "in_flight": r.in_flight,
                "max_in_flight": r.cfg.max_in_flight,
                "sampled": int(self.sampled.value(name)),
                "skipped": skipped,
                "spend": r.spend.summary(),
            }
        return out
