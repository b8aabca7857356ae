"""A/B split: a sticky, weighted share of a route's live traffic served by a candidate.

:meth:`ABSplit.__call__` runs in the plan step, after the routing policy:
for a call on an ``[[shadow]] mode = "ab"`` route it computes the caller's
arm (:mod:`tollway.shadow.sampling`: the tenant, or the user id from the
``X-Tollway-User`` header or the request's ``user`` field), and for a
candidate arm puts that candidate first in the plan, keeping the policy's
candidates behind it as fallbacks. The candidate arm obeys the live rules:
it is not used (the call stays on the primary arm's plan) when the request's
sensitivity is local-only and the candidate is remote, when its breaker is
open, or when its cost bound is over the tier's per-call cap. These calls are
live: they are charged to the tenant and guarded like any other.

The arm is written into the call's ``reason`` as ``ab[<route>]=candidate``
or ``ab[<route>]=primary`` (plus ``(fallback: why)`` when a candidate arm was
not used), so each call event says which arm it was in; the shadow
projection folds those into the A/B part of the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tollway.config import ShadowRouteConfig
from tollway.pipeline.bound import Fit
from tollway.pipeline.call import CHAT, Call
from tollway.pipeline.plan import Deployment, RoutePlan
from tollway.policy import PolicyPlan
from tollway.shadow.sampling import ab_arm, ab_point, sticky_key

if TYPE_CHECKING:
    from tollway.parts import GatewayParts

__all__ = ["ABSplit"]

NANO = 1_000_000_000


class _Split:
    __slots__ = ("candidates", "cfg")

    def __init__(self, cfg: ShadowRouteConfig, candidates: tuple[Deployment, ...]) -> None:
        self.cfg = cfg
        self.candidates = candidates


class ABSplit:
    def __init__(self, parts: GatewayParts, entries: list[ShadowRouteConfig]) -> None:
        self.parts = parts
        self.splits = {
            e.route: _Split(e, tuple(parts.catalog.models[c] for c in e.candidates))
            for e in entries if e.mode == "ab"
        }
        self.local_only = parts.policy.local_only
        self.caps = {name: round(t.max_call_usd * NANO)
                     for name, t in parts.config.tiers.items()}

    def arm(self, call: Call) -> tuple[str, Deployment | None] | None:
        """(route, candidate or None for the primary arm); None when no split applies."""
        if call.endpoint != CHAT:
            return None
        req = call.request
        split = self.splits.get(req.model)
        if split is None and call.plan is not None:
            split = self.splits.get(call.plan.route)
        if split is None:
            return None
        cfg = split.cfg
        user = call.user or req.user
        key = sticky_key(cfg.sticky, call.tenant.id, user)
        i = ab_arm(ab_point(cfg.salt, cfg.route, key), cfg.weights)
        return cfg.route, (split.candidates[i] if i is not None else None)

    def __call__(self, call: Call, plan: RoutePlan) -> RoutePlan:
        """The plan to dispatch: ``plan`` itself, or the candidate first."""
        call.plan = plan  # arm() looks at the route the policy chose
        chosen = self.arm(call)
        if chosen is None:
            return plan
        route, dep = chosen
        if dep is None:
            plan.reason = f"{plan.reason}; ab[{route}]=primary"
            return plan
        why = self._unusable(call, plan, dep)
        if why is not None:
            plan.reason = f"{plan.reason}; ab[{route}]=primary (fallback: {why})"
            return plan
        return self._with_first(call, plan, dep, f"ab[{route}]=candidate -> {dep.model}")

    def _fit(self, call: Call, plan: RoutePlan, dep: Deployment) -> Fit | None:
        """The candidate's cost bound, its output bounded to the tier's cap as the
        policy bounds its own candidates; None when the cap cannot pay a minimal reply."""
        if not isinstance(plan, PolicyPlan):
            return None
        fit = self.parts.policy.fit(call, dep)
        cap = self.caps.get(call.tier)
        return fit if cap is None or fit.lower(cap) else None

    def _unusable(self, call: Call, plan: RoutePlan, dep: Deployment) -> str | None:
        if call.sensitivity in self.local_only and not dep.local:
            return f"{call.sensitivity} data, {dep.model} is not local"
        if self.parts.breakers.state(dep.provider) == "open":
            return f"breaker open: {dep.provider}"
        if isinstance(plan, PolicyPlan) and self._fit(call, plan, dep) is None:
            return f"{dep.model} over the {call.tier} cap"
        return None

    def _with_first(self, call: Call, plan: RoutePlan, dep: Deployment, note: str) -> RoutePlan:
        rest = [i for i, d in enumerate(plan.candidates) if d.model != dep.model]
        candidates = (dep, *(plan.candidates[i] for i in rest))
        reason = f"{plan.reason}; {note}"
        fit = self._fit(call, plan, dep)
        if not isinstance(plan, PolicyPlan) or fit is None:
            return RoutePlan(plan.route, candidates, reason)
        fits = (fit, *(plan.fits[i] for i in rest))
        new = PolicyPlan(plan.route, candidates, reason, tuple(f.cost for f in fits),
                         plan.prompt_tokens, plan.max_output_tokens,
                         self.parts.policy.is_expensive(dep, fit, plan.max_output_tokens), fits)
        call.estimated_cost_nanousd = new.max_cost_nanousd
        return new
