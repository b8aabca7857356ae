"""The evidence fold: which candidate, if any, serves each route and task.

Input: ``shadow.compared`` events (:class:`~tollway.events.schema.ShadowCompared`) of
the routes that learn. For each (route, task, candidate) the fold keeps the candidate's
last ``window`` scored samples: whether each agreed with the primary, and the
candidate's latency.

**Agreement, by task** (the shadow score is in [0, 1], :mod:`tollway.shadow.agreement`):

- ``classify`` and ``extract``: exact. A sample agrees only when the score is 1: the
  same label, the same JSON once canonical, the same tool calls. Half right is wrong.
- every other task (``chat``, ``draft``, ``summarize``, ``code``, none given): a
  similarity. A sample agrees when the score is at least ``similarity`` (default 0.8:
  the mean Dice coefficient of words and word pairs, or exact for short answers).

**Qualifies**: at least ``min_samples`` scored samples, an agreement rate (agreeing /
scored; failures of the candidate count as disagreeing) of at least ``min_agreement``
over the window and over its last ``recent`` samples, and the candidate's p95 latency
over the window within the task's latency objective (none: no limit).

**Chosen**: the cheapest qualifying candidate (by its configured price: input plus
output USD per million tokens); none: the route's own order.

**Demoted**: the serving candidate's rate over its last ``recent`` samples fell below
``min_agreement - hysteresis``, or its p95 past the objective; then the next cheapest
qualifying one, or the primary. Promotion needs the long window (a candidate must prove
itself over many samples), demotion only the short one (a drop shows in a few); the
hysteresis keeps a candidate at the threshold from flapping.

While a candidate serves, the shadow runner keeps checking it against the primary
(``verify`` samples, the roles swapped), so its evidence stays current and a drop in
its quality demotes it.

Everything here reads only its arguments: the same events in the same order give the
same decisions (:func:`replay`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from tollway.events.schema import RouteLearned, ShadowCompared

__all__ = ["EXACT_TASKS", "Evidence", "LearnRules", "Learning", "replay"]

EXACT_TASKS = frozenset({"classify", "extract"})


@dataclass(frozen=True)
class LearnRules:
    min_agreement: float = 0.95
    min_samples: int = 30
    window: int = 50
    recent: int = 20  # demotion looks at the last this many samples only
    hysteresis: float = 0.03
    similarity: float = 0.8
    # task -> p95 latency objective in seconds, or None
    objective: Callable[[str], float | None] = lambda task: None

    def rule(self, task: str) -> str:
        return "exact" if task in EXACT_TASKS else f"similarity>={self.similarity:g}"

    def agreed(self, task: str, e: ShadowCompared) -> bool:
        if e.agreement is None:
            return False  # the candidate failed: not an answer the caller could use
        if task in EXACT_TASKS:
            return e.agreement >= 1.0
        return e.agreement >= self.similarity


@dataclass
class Evidence:
    """One candidate's last samples on one route and task."""

    agreed: deque[bool] = field(default_factory=deque)
    latency: deque[float] = field(default_factory=deque)

    def add(self, agreed: bool, latency: float | None, window: int) -> None:
        self.agreed.append(agreed)
        if len(self.agreed) > window:
            self.agreed.popleft()
        if latency is not None:
            self.latency.append(latency)
            if len(self.latency) > window:
                self.latency.popleft()

    @property
    def samples(self) -> int:
        return len(self.agreed)

    @property
    def rate(self) -> float:
        return sum(self.agreed) / len(self.agreed) if self.agreed else 0.0

    def recent_rate(self, n: int) -> float:
        if not self.agreed:
            return 0.0
        last = list(self.agreed)[-n:]
        return sum(last) / len(last)

    def p95(self) -> float | None:
        if not self.latency:
            return None
        ordered = sorted(self.latency)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Learning:
    """The fold's state: evidence, and the model serving each (route, task)."""

    def __init__(self, rules: LearnRules, prices: Mapping[str, float],
                 candidates: Mapping[str, tuple[str, ...]]) -> None:
        """``prices``: model -> its price (for the order); ``candidates``: route -> its
        shadow candidates (model ids)."""
        self.rules = rules
        self.prices = dict(prices)
        self.candidates = {r: tuple(sorted(c, key=lambda m: (self.prices.get(m, math.inf), m)))
                           for r, c in candidates.items()}
        self.evidence: dict[tuple[str, str, str], Evidence] = {}
        self.serving: dict[tuple[str, str], str] = {}  # (route, task) -> model; absent: own

    def choice(self, route: str, task: str) -> str | None:
        return self.serving.get((route, task))

    def observe(self, e: ShadowCompared) -> RouteLearned | None:
        """Fold one sample; the decision it led to, if any (``event_id`` and time left to
        the caller: :meth:`decision` fills them from the sample)."""
        if e.route not in self.candidates:
            return None
        if e.verify and e.agreement is None:
            return None  # the primary failed its check: nothing learned of the candidate
        task = e.task or "chat"
        rules = self.rules
        key = (e.route, task, e.candidate_model)
        ev = self.evidence.get(key)
        if ev is None:
            ev = self.evidence[key] = Evidence()
        ev.add(rules.agreed(task, e),
               e.candidate_latency_s if e.candidate_error is None else None, rules.window)
        return self._decide(e, e.route, task)

    def qualifies(self, route: str, task: str, model: str, keep: bool) -> bool:
        ev = self.evidence.get((route, task, model))
        rules = self.rules
        if ev is None or ev.samples < rules.min_samples:
            return False
        if keep:  # serving: its recent samples must hold up, less the hysteresis
            if ev.recent_rate(rules.recent) < rules.min_agreement - rules.hysteresis:
                return False
        elif (ev.rate < rules.min_agreement
              or ev.recent_rate(rules.recent) < rules.min_agreement):
            return False
        objective = rules.objective(task)
        p95 = ev.p95()
        return objective is None or p95 is None or p95 <= objective

    def _decide(self, e: ShadowCompared, route: str, task: str) -> RouteLearned | None:
        current = self.serving.get((route, task), "")
        best = ""
        for model in self.candidates[route]:  # cheapest first
            if self.qualifies(route, task, model, keep=model == current):
                best = model
                break
        if best == current:
            return None
        if best:
            self.serving[(route, task)] = best
        else:
            del self.serving[(route, task)]
        about = best or current
        ev = self.evidence.get((route, task, about)) or Evidence()
        demoted = not best or (current and self.prices.get(best, 0) > self.prices.get(
            current, 0))
        objective = self.rules.objective(task)
        p95 = ev.p95()
        if best:
            why = (f"{best}: {ev.rate:.1%} agreement over {ev.samples} samples "
                   f"({self.rules.rule(task)}), the cheapest that qualifies")
        else:
            why = (f"{current}: {ev.rate:.1%} agreement over {ev.samples} samples "
                   f"({self.rules.rule(task)})"
                   + (f", p95 {p95:.3f} s over {objective:g} s" if objective is not None
                      and p95 is not None and p95 > objective else "")
                   + "; back to the route's own order")
        return RouteLearned(
            event_id=f"learn-{e.event_id}", occurred_at=e.occurred_at, instance=e.instance,
            route=route, task=task, model=best, previous=current,
            action="demoted" if demoted else "promoted", candidate=about,
            samples=ev.samples, agreement_rate=ev.rate, agreement_rule=self.rules.rule(task),
            candidate_p95_s=p95, objective_s=objective, why=why)


def replay(learning: Learning, events: Iterable[object]) -> list[RouteLearned]:
    """Every decision a run of events leads to, in order (other event types are skipped)."""
    out = []
    for e in events:
        if isinstance(e, ShadowCompared):
            d = learning.observe(e)
            if d is not None:
                out.append(d)
    return out
