"""Step 3, routing policy: (tenant, request, hints) -> an ordered plan, or a refusal.

``model`` names a model or a route alias (``auto``, or a route the config
ties to the task hint). Its candidates then go through, in this order:

0. **the API**: only providers that serve it (rerank: local ones); a route
   alias named on /v1/embeddings or /v1/rerank keeps its models of that kind
   (``kind = "embedding"`` / ``"rerank"``), and ``auto`` on /v1/embeddings is
   the ``embed`` task's route when ``[policy] task_routes`` has one;
1. **sensitivity**: ``confidential`` and ``restricted`` (configurable) keep
   only providers marked ``local = true``, on every API (chat, embeddings,
   rerank, ...); none -> 403 ``policy_forbids``, and nothing is sent anywhere;
2. **budget tier**: each candidate's maximum cost for *this* request
   (token-exact prompt, plus the output: ``max_completion_tokens`` /
   ``max_tokens`` or the model's full output, times ``n``) against the tier's
   per-call cap. A candidate the cap cannot pay gets an output bound it can
   (:mod:`tollway.pipeline.bound`); one the cap cannot pay even a minimal
   reply is dropped; none left -> 400 ``cost_limit_exceeded``;
3. **breakers**: candidates whose provider's breaker is open are dropped;
   none left -> 503 ``upstream_unavailable`` with ``Retry-After`` (when the
   first breaker lets probes through), before anyone is called;
4. **latency class**: ``interactive`` orders by the observed latency EWMA of
   each deployment (unmeasured first, so they get measured), ``batch`` by
   this call's estimated cost, ``standard`` keeps the configured order.
   Interactive and standard put deployments whose observed p95 breaks the
   task's latency objective (default: 3.5 s chat, 6 s drafting) last.

The decision and why go into :attr:`RoutePlan.reason` (the call record and
the access log line); a refusal's reason is set on the call before raising.
The plan also carries the estimate the guards need (the largest candidate
cost, to reserve; tokens, for the tokens-per-minute tier; whether the call is
an expensive one), so the prompt is counted once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tollway.clock import Clock
from tollway.config import Config, ConfigError
from tollway.errors import (
    CostLimitExceeded,
    InvalidRequest,
    PolicyForbids,
    UpstreamUnavailable,
)
from tollway.pipeline.bound import MIN_REPLY_TOKENS, Fit
from tollway.pipeline.call import EMBEDDINGS, Call
from tollway.pipeline.decode import EmbeddingsRequest
from tollway.pipeline.plan import Catalog, Deployment, RoutePlan
from tollway.pipeline.prompt import prompt_bound
from tollway.pipeline.rerank import RERANK
from tollway.resilience import Breakers, LatencyTracker
from tollway.tokens import CostEstimator

__all__ = ["Policy", "PolicyPlan"]

NANO = 1_000_000_000


class PolicyPlan(RoutePlan):
    """A :class:`RoutePlan` with the estimate of the call it was built for."""

    __slots__ = ("costs", "expensive", "fits", "max_cost_nanousd", "max_output_tokens",
                 "prompt_tokens")

    def __init__(self, route: str, candidates: tuple[Deployment, ...], reason: str,
                 costs: tuple[int, ...], prompt_tokens: int, max_output_tokens: int,
                 expensive: bool, fits: tuple[Fit, ...] = ()) -> None:
        super().__init__(route, candidates, reason)
        self.costs = costs  # nano-USD bound of each candidate, same order
        self.max_cost_nanousd = max(costs, default=0)  # what the budget holds
        self.prompt_tokens = prompt_tokens
        # Output tokens of a typical reply (the caller's bound, or the default), for the
        # tokens-per-minute tier; the money is held at each candidate's full output.
        self.max_output_tokens = max_output_tokens
        self.expensive = expensive
        self.fits = fits  # each candidate's output and cost bound, same order

    def _fit(self, dep: Deployment) -> Fit | None:
        for d, fit in zip(self.candidates, self.fits, strict=False):
            if d is dep:
                return fit
        return None

    def bound(self, dep: Deployment) -> int:
        fit = self._fit(dep)
        return fit.bound if fit is not None else 0

    def relay_limit(self, dep: Deployment) -> int:
        fit = self._fit(dep)
        if fit is None or not fit.price_out or fit.out >= dep.max_output_tokens:
            return 0  # free, or the model cannot output more than was held
        return fit.out * fit.choices

    def lower(self, limit_nanousd: int) -> bool:
        """Bound each candidate's output so that it costs at most ``limit_nanousd``, and
        drop the candidates that cannot; False (and no change) when none can."""
        if self.max_cost_nanousd <= limit_nanousd:
            return True
        kept = [i for i, fit in enumerate(self.fits) if fit.lower(limit_nanousd)]
        if not kept:
            return False
        self.candidates = tuple(self.candidates[i] for i in kept)
        self.fits = tuple(self.fits[i] for i in kept)
        self.costs = tuple(fit.cost for fit in self.fits)
        self.max_cost_nanousd = max(self.costs)
        return True


class Policy:
    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        estimator: CostEstimator,
        breakers: Breakers,
        latency: LatencyTracker,
        clock: Clock,
        *,
        local_only: Iterable[str] | None = None,
        objectives_s: Mapping[str, float] | None = None,
        task_routes: Mapping[str, str] | None = None,
        default_latency: str | None = None,
        expensive_models: Iterable[str] | None = None,
        expensive_min_cost_usd: float | None = None,
        estimate: bool | None = None,
    ) -> None:
        """Settings come from ``config.policy`` and ``config.guards``; keywords override."""
        pc, gc = config.policy, config.guards
        self.catalog = catalog
        # Gradual rollouts (feature flags of the directory): (flag, candidates) that take a
        # route for this tenant, else None; set by the gateway.
        self.rollouts: Callable[[str, str], tuple[str, tuple[Deployment, ...]] | None] | None = None
        # Guard flags: (flag, per-call cap in nano-USD) for this route and tenant, else None.
        self.call_caps: Callable[[str, str], tuple[str, int] | None] | None = None
        self.estimator = estimator
        self.breakers = breakers
        self.latency = latency
        self.clock = clock
        # Without guards nothing reads the estimate: skip counting the prompt.
        self.estimate = gc.enabled if estimate is None else estimate
        self.local_only = frozenset(pc.local_only if local_only is None else local_only)
        self.objectives = dict(pc.latency_objectives_s if objectives_s is None
                               else objectives_s)
        self.task_routes = dict(pc.task_routes if task_routes is None else task_routes)
        for task, name in self.task_routes.items():
            if name not in catalog.routes and name not in catalog.models:
                raise ConfigError(f"task route {task!r} names {name!r}, which is neither a "
                                  "route alias nor a model", path=f"$.policy.task_routes.{task}")
        self.default_latency = default_latency or pc.default_latency
        self.expensive_models = frozenset(gc.expensive_models if expensive_models is None
                                          else expensive_models)
        self.expensive_min_nano = round(NANO * (gc.expensive_min_cost_usd
                                                if expensive_min_cost_usd is None
                                                else expensive_min_cost_usd))
        self.caps = {name: round(t.max_call_usd * NANO) for name, t in config.tiers.items()}
        self.default_max_output = estimator.default_max_output_tokens

    # ---- the decision --------------------------------------------------------------------
    def plan(self, call: Call) -> PolicyPlan:
        req = call.request
        asked: str = req.model
        route, candidates, notes = self.eligible(call)
        task = call.task

        # 2. cost against the tier's per-call cap
        if self.estimate:
            prompt_tokens, max_output, fits = self._estimate(call, req, candidates)
            cap = self.caps.get(call.tier)
            flagged = self.call_caps(route, call.tenant.id) if self.call_caps else None
            if flagged is not None:
                flag, cap = flagged
                call.flags += (flag,)
                notes.append(f"flag {flag}: cap {_usd(cap)} USD")
        else:
            prompt_tokens, max_output = 0, 0
            fits = [Fit(0, None, 0, 1) for _ in candidates]
            cap = None
        if cap is not None:
            kept = [i for i, fit in enumerate(fits) if fit.lower(cap)]
            if not kept:
                cheapest = min(fit.least() for fit in fits)
                call.reason = (f"{route}: refused, estimate {_usd(cheapest)} USD over the "
                               f"{call.tier} cap {_usd(cap)} USD")
                call.estimated_cost_nanousd = cheapest
                raise CostLimitExceeded(
                    f"this call would cost at least {_usd(cheapest)} USD ({prompt_tokens} "
                    f"prompt tokens and a reply of {MIN_REPLY_TOKENS} tokens or the "
                    f"max_tokens asked), over the {call.tier} tier's per-call cap of "
                    f"{_usd(cap)} USD; shorten the prompt", param="messages")
            if len(kept) < len(candidates):
                dropped = ",".join(candidates[i].model for i in range(len(candidates))
                                   if i not in kept)
                notes.append(f"over {call.tier} cap: {dropped}")
                candidates = tuple(candidates[i] for i in kept)
                fits = [fits[i] for i in kept]
            bounded = [d.model for d, fit in zip(candidates, fits, strict=True) if fit.bound]
            if bounded:
                notes.append(f"output bound for the {call.tier} cap: {','.join(bounded)}")

        # 3. breakers
        now = self.clock.monotonic()
        breakers = self.breakers
        open_ = [i for i, d in enumerate(candidates) if breakers[d.provider].state(now) == "open"]
        if open_:
            if len(open_) == len(candidates):
                wait = min(breakers[d.provider].retry_after(now) for d in candidates)
                names = ",".join(sorted({d.provider for d in candidates}))
                call.reason = f"{route}: refused, breakers open: {names}"
                retry = str(max(1, math.ceil(wait)))
                raise UpstreamUnavailable(
                    f"every provider for `{asked}` is failing right now (circuit breakers "
                    f"open: {names}); retry in {retry} s", headers={"Retry-After": retry})
            notes.append("breaker open: " + ",".join(sorted({candidates[i].provider
                                                              for i in open_})))
            candidates = tuple(d for i, d in enumerate(candidates) if i not in open_)
            fits = [f for i, f in enumerate(fits) if i not in open_]

        # 4. order
        latency_class = call.latency_class or self.default_latency
        if len(candidates) > 1:
            order = self._order(latency_class, task or _default_task(call), candidates,
                                [fit.cost for fit in fits])
            if order is not None:
                candidates = tuple(candidates[i] for i in order)
                fits = [fits[i] for i in order]
                notes.append(f"{latency_class} order")
        first = candidates[0]
        notes.append(f"-> {first.provider}/{first.model}")
        plan = PolicyPlan(route, candidates, f"{route}: " + "; ".join(notes),
                          tuple(fit.cost for fit in fits), prompt_tokens, max_output,
                          self.is_expensive(first, fits[0], max_output), tuple(fits))
        call.estimated_cost_nanousd = plan.max_cost_nanousd
        return plan

    def is_expensive(self, dep: Deployment, fit: Fit, typical_output: int) -> bool:
        """Whether a call to ``dep`` counts against the expensive-operations tier: judged
        at a typical reply, not at the full output the budget holds."""
        if dep.model in self.expensive_models:
            return True
        if self.expensive_min_nano <= 0:
            return False
        return fit.cost_at(typical_output // fit.choices) >= self.expensive_min_nano

    def eligible(self, call: Call) -> tuple[str, tuple[Deployment, ...], list[str]]:
        """(route, candidates, notes) after the task route and step 1, sensitivity: where the
        call may go before cost, breakers and order. Raises the refusals of step 1."""
        asked: str = call.request.model
        base = self.catalog.plan(call.tenant, asked)  # unknown model / not allowed: raises
        candidates = base.candidates
        route = asked
        notes: list[str] = []
        # Embeddings are the embed task whatever the hint says nothing of: `auto` goes to
        # [policy] task_routes.embed when there is one.
        task = call.task or ("embed" if call.endpoint == EMBEDDINGS else "")
        if task and task in self.task_routes and asked == "auto":
            route = self.task_routes[task]
            candidates = self.catalog.routes.get(route) or (self.catalog.models[route],)
            notes.append(f"task {task} -> route {route}")
        kind = _KIND_OF.get(call.endpoint)
        if kind is not None and route in self.catalog.routes:
            # A route serves the API with its models of the API's kind (an embeddings call
            # to `auto` keeps the embedding models); a model named directly goes as it is.
            fit = tuple(d for d in candidates if d.kind == kind)
            if not fit:
                call.reason = f"{route}: refused, no {kind} model in it"
                raise InvalidRequest(f"`{asked}` has no {kind} model for the {call.endpoint} "
                                     "API", param="model", code="model_not_supported")
            if len(fit) < len(candidates):
                notes.append(f"{kind} models: {len(fit)}/{len(candidates)}")
            candidates = fit
        rollouts = self.rollouts
        if rollouts is not None:
            hit = rollouts(route, call.tenant.id)
            if hit is not None:
                flag, candidates = hit
                call.flags += (flag,)
                notes.append(f"flag {flag}")

        # 0. the API: only providers that speak it (or that it translates to)
        surface = call.surface
        why = [surface.serves(call, d) for d in candidates]
        served = tuple(d for d, no in zip(candidates, why, strict=True) if no is None)
        if not served:
            call.reason = f"{route}: refused, no provider of it serves {call.endpoint}"
            refusal = why[0]
            assert refusal is not None
            raise refusal
        if len(served) < len(candidates):
            notes.append(f"{call.endpoint}: {len(served)}/{len(candidates)} serve it")
            candidates = served

        # 1. sensitivity
        sensitivity = call.sensitivity
        if sensitivity in self.local_only:
            local = tuple(d for d in candidates if d.local)
            if not local:
                call.reason = f"{route}: refused, {sensitivity} data and no local provider"
                raise PolicyForbids(
                    f"{sensitivity} requests may only go to a local provider, and `{asked}` "
                    "has none", param="model")
            if len(local) < len(candidates):
                notes.append(f"{sensitivity}: local only ({len(local)}/{len(candidates)})")
            candidates = local
        return route, candidates, notes

    def upstreams(self, call: Call) -> list[str]:
        """The upstream model names the estimate will count the prompt for (none when
        nothing reads the estimate)."""
        return [d.upstream for d in self.eligible(call)[1]] if self.estimate else []

    # ---- estimate ------------------------------------------------------------------------
    def _estimate(self, call: Call, req: Any,
                  candidates: tuple[Deployment, ...]) -> tuple[int, int, list[Fit]]:
        """(prompt tokens of the first candidate, typical output tokens, each candidate's
        fit)."""
        chat, asked, n = _output_asked(req)
        fits = [self._fit(call, dep, chat, asked, n) for dep in candidates]
        typical = (asked or self.default_max_output) * n if chat else 0
        return (fits[0].prompt_tokens if fits else 0), typical, fits

    def fit(self, call: Call, dep: Deployment) -> Fit:
        """``dep``'s cost bound for ``call``: its prompt (counted once per encoding) and,
        per choice, the caller's output bound or the model's full output."""
        return self._fit(call, dep, *_output_asked(call.request))

    def _fit(self, call: Call, dep: Deployment, chat: bool, asked: int, n: int) -> Fit:
        full = (min(asked, dep.max_output_tokens) if asked else dep.max_output_tokens
                ) if chat else 0
        return Fit(prompt_bound(call, dep.upstream), self.estimator.price(dep.model), full, n)

    # ---- order ---------------------------------------------------------------------------
    def _order(self, latency_class: str, task: str, candidates: tuple[Deployment, ...],
               costs: list[int]) -> list[int] | None:
        """New order as indexes, or None to keep the configured one."""
        idx = range(len(candidates))
        if latency_class == "batch":
            order = sorted(idx, key=costs.__getitem__)
        else:
            objective = self.objectives.get(task)
            lat = self.latency
            slow = [False] * len(candidates)
            if objective is not None:
                for i, d in enumerate(candidates):
                    p95 = lat.p95(d)
                    slow[i] = p95 is not None and p95 > objective
            if latency_class == "interactive":
                # Unmeasured deployments sort first (-1): one call measures them.
                ewmas = [lat.ewma(d) for d in candidates]
                order = sorted(idx, key=lambda i: (slow[i], -1.0 if ewmas[i] is None
                                                   else ewmas[i]))
            elif any(slow):
                order = sorted(idx, key=slow.__getitem__)
            else:
                return None
        return None if order == list(idx) else order

    def objective_for(self, task: str) -> float | None:
        return self.objectives.get(task)


def _output_asked(req: Any) -> tuple[bool, int, int]:
    """(whether the request generates output, the output per choice it asks for at most
    (0: unbounded), choices): chat, legacy completions (``best_of`` generated and billed
    too) and Anthropic's messages generate; embeddings and rerank do not."""
    if isinstance(req, EmbeddingsRequest) or not getattr(req, "generates", True):
        return False, 0, 1
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens or 0
    choices = max(1, getattr(req, "n", None) or 1, getattr(req, "best_of", None) or 1)
    return True, asked, choices


# The model kind a route's candidates must have to serve an API (other APIs: any).
_KIND_OF = {EMBEDDINGS: "embedding", RERANK: "rerank"}


def _default_task(call: Call) -> str:
    return "embed" if call.endpoint == EMBEDDINGS else "chat"


def _usd(nano: int) -> str:
    return f"{nano / NANO:.6f}".rstrip("0").rstrip(".") or "0"
