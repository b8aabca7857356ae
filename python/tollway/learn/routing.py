"""Learning routing inside the app: the learner, its decisions, and the plan hook.

:class:`Learner` folds this process's shadow samples (:class:`LearningSink` sits in
front of the shadow sink) through :class:`~tollway.learn.evidence.Learning` and
publishes each decision as a ``route.learned`` event through the same sink (the
stream, or the local view when events are off); the shadow report lists them.

:class:`LearnedRouting` is a plan hook, after the policy (and the A/B split): for a
chat call on a learning route whose task has a chosen candidate, it puts that
candidate first and keeps the policy's candidates behind it as fallbacks, under the
live rules (not when the data's sensitivity keeps it local and the candidate is not,
its breaker is open, or the tier's cap cannot pay it). The plan's reason says
``learn[<route>/<task>] -> <model>``; the call event carries it.

With events on, the fold is the ``learning`` view of the stream
(:mod:`tollway.learn.view`): every gateway process folds every process's samples in
stream order, so the fleet serves one choice. With events off, the process folds its
own samples as it makes them.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from tollway.config import LearnConfig, ShadowRouteConfig
from tollway.events.schema import Event, ShadowCompared
from tollway.learn.evidence import Learning, LearnRules
from tollway.learn.view import log_decision
from tollway.pipeline.call import CHAT, Call
from tollway.pipeline.plan import RoutePlan
from tollway.shadow.ab import ABSplit

if TYPE_CHECKING:
    from tollway.events.projections import Projection
    from tollway.learn.view import LearningView
    from tollway.parts import GatewayParts
    from tollway.shadow.sink import ShadowSink

__all__ = ["LearnedRouting", "Learner", "LearningSink", "learning_routes", "new_learning"]

log = logging.getLogger("tollway.learn")


def learning_routes(cfg: LearnConfig, entries: list[ShadowRouteConfig]) -> list[ShadowRouteConfig]:
    """The ``[[shadow]]`` routes that learn."""
    if not cfg.enabled:
        return []
    every = "*" in cfg.routes
    return [e for e in entries if e.mode == "shadow" and (every or e.route in cfg.routes)]


def new_learning(parts: GatewayParts, cfg: LearnConfig,
                 entries: list[ShadowRouteConfig]) -> Learning:
    """A fresh fold state for the routes that learn (``entries``), by the config's rules
    and the catalog's prices."""
    rules = LearnRules(min_agreement=cfg.min_agreement, min_samples=cfg.min_samples,
                       window=cfg.window, recent=cfg.recent, hysteresis=cfg.hysteresis,
                       similarity=cfg.similarity, objective=parts.policy.objective_for)
    models = parts.catalog.models
    prices = {m: d.input_usd_per_mtok + d.output_usd_per_mtok for m, d in models.items()}
    return Learning(rules, prices, {e.route: tuple(e.candidates) for e in entries})


class Learner:
    """The fold state the plan hook reads: the stream's ``learning`` view (``view``,
    events on), or this process's own, fed by :meth:`observe` (events off)."""

    def __init__(self, parts: GatewayParts, cfg: LearnConfig,
                 entries: list[ShadowRouteConfig], sink: ShadowSink,
                 view: Projection[LearningView] | None = None) -> None:
        self.projection = view
        self._own = new_learning(parts, cfg, entries) if view is None else None
        self.sink = sink
        self._lock = threading.Lock()  # a test may publish from its own thread

    @property
    def learning(self) -> Learning:
        if self.projection is not None:  # the view a reset or a checkpoint put there
            return self.projection.view.learning
        assert self._own is not None
        return self._own

    def observe(self, e: ShadowCompared) -> None:
        """Events off: fold one of this process's samples, publish its decision."""
        with self._lock:
            decision = self.learning.observe(e)
            if decision is None:
                return
        log_decision(decision)
        self.sink.publish(decision)  # type: ignore[arg-type]

    def status(self) -> dict[str, Any]:
        """The choices now, and the evidence behind every candidate (the report's part)."""
        lg = self.learning
        evidence = []
        for (route, task, model), ev in sorted(lg.evidence.items()):
            evidence.append({
                "route": route, "task": task, "candidate": model, "samples": ev.samples,
                "agreement_rate": ev.rate, "agreement_rule": lg.rules.rule(task),
                "p95_ms": round(p * 1000, 3) if (p := ev.p95()) is not None else None,
                "qualifies": lg.qualifies(route, task, model,
                                          keep=lg.serving.get((route, task)) == model),
                "serving": lg.serving.get((route, task)) == model})
        return {"serving": [{"route": r, "task": t, "model": m}
                            for (r, t), m in sorted(lg.serving.items())],
                "evidence": evidence}


class LearningSink:
    """The shadow sink, with the learner reading every sample on its way."""

    def __init__(self, inner: ShadowSink, learner: Learner | None = None) -> None:
        self.inner = inner
        self.learner = learner
        self.instance = inner.instance

    def new_id(self) -> str:
        return self.inner.new_id()

    def publish(self, event: Event) -> None:
        self.inner.publish(event)  # type: ignore[arg-type]
        if self.learner is not None and type(event) is ShadowCompared:
            try:
                self.learner.observe(event)
            except Exception:  # never the shadow call's problem
                log.exception("learning routing: a sample could not be folded")


class LearnedRouting:
    """The plan hook: the learned candidate first."""

    def __init__(self, parts: GatewayParts, learner: Learner) -> None:
        self.learner = learner
        self.helper = ABSplit(parts, [])  # the live rules and the plan surgery of A/B
        self.routes = frozenset(learner.learning.candidates)
        self.models = parts.catalog.models

    def __call__(self, call: Call, plan: RoutePlan) -> RoutePlan:
        if call.endpoint != CHAT:
            return plan
        route = plan.route if plan.route in self.routes else call.request.model
        if route not in self.routes:
            return plan
        task = call.task or "chat"
        model = self.learner.learning.choice(route, task)
        if model is None or (plan.candidates and plan.candidates[0].model == model):
            return plan
        dep = self.models[model]
        call.plan = plan
        why = self.helper._unusable(call, plan, dep)
        if why is not None:
            plan.reason = f"{plan.reason}; learn[{route}/{task}] not used: {why}"
            return plan
        return self.helper._with_first(call, plan, dep, f"learn[{route}/{task}] -> {model}")
