"""Views folded from the event stream: usage, budget, provider health.

Each projection is a pure fold ``apply(view, seq, event) -> view`` that skips
sequences and event ids it has already applied (``seen``), plus ``dump``/``load``
for its checkpoint. Views by day keep ``retention_days`` of them.
A :class:`Projection` pairs one with its current view; the
:class:`~tollway.events.projections.runner.ProjectionRunner` feeds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from tollway.events.projections import budget, health, usage
from tollway.events.schema import Event
from tollway.events.seen import RETENTION_DAYS, Seen
from tollway.shadow import projection as shadow


class View(Protocol):
    last_seq: int
    seen: Seen


V = TypeVar("V", bound=View)


@dataclass(eq=False)
class Projection(Generic[V]):
    name: str
    version: int  # bump when the fold changes meaning: old checkpoints are then rebuilt
    view: V
    fold: Callable[[V, int, Event], V]
    new: Callable[[], V]
    dump: Callable[[V], bytes]
    load: Callable[[bytes], V]
    # ``fold`` over many events with ascending sequences at once, same result (replays and
    # the live tail fold batches); None: ``fold`` event by event.
    fold_batch: Callable[[V, Sequence[int], Sequence[Event]], V] | None = None

    def apply(self, seq: int, event: Event) -> None:
        self.view = self.fold(self.view, seq, event)

    def reset(self) -> None:
        self.view = self.new()

    def rebase(self, seq: int) -> None:
        """The stream was recreated and numbers from ``seq + 1`` again: keep the view's
        contents, forget the old sequence numbers."""
        self.view.last_seq = seq
        marks = getattr(self.view, "reserved_seq", None)  # budget: per-tenant CAS marks
        if isinstance(marks, dict):
            marks.clear()


def _kept(load: Callable[[bytes], V], prune: Callable[[V], None], keep_days: int
          ) -> Callable[[bytes], V]:
    """``load``, then keep ``keep_days`` days (the retention may have changed since)."""
    def load_kept(data: bytes) -> V:
        view = load(data)
        if view.seen.retain(keep_days):
            prune(view)
        return view
    return load_kept


def usage_projection(retention_days: int = RETENTION_DAYS) -> Projection[usage.UsageView]:
    def new() -> usage.UsageView:
        return usage.new(retention_days)
    return Projection("usage", 2, new(), usage.apply, new, usage.dump,
                      _kept(usage.load, usage.prune, retention_days), usage.apply_batch)


def budget_projection() -> Projection[budget.BudgetState]:
    """Keeps ``budget.KEEP_DAYS`` days whatever the retention: the guard needs today only."""
    return Projection("budget", 2, budget.BudgetState(), budget.apply, budget.BudgetState,
                      budget.dump, budget.load, budget.apply_batch)


def health_projection(retention_days: int = RETENTION_DAYS) -> Projection[health.HealthView]:
    def new() -> health.HealthView:
        return health.new(retention_days)
    return Projection("health", 2, new(), health.apply, new, health.dump,
                      _kept(health.load, health.prune, retention_days))


def shadow_projection(retention_days: int = RETENTION_DAYS) -> Projection[shadow.ShadowView]:
    """Shadow comparisons and A/B arms (``tollway.shadow.projection``)."""
    def new() -> shadow.ShadowView:
        return shadow.new(retention_days)
    return Projection("shadow", shadow.VERSION, new(), shadow.apply, new, shadow.dump,
                      _kept(shadow.load, shadow.prune, retention_days))


def default_projections(retention_days: int = RETENTION_DAYS) -> list[Projection[Any]]:
    """The views, keeping ``retention_days`` days of events (``[events] retention_days``)."""
    return [usage_projection(retention_days), budget_projection(),
            health_projection(retention_days), shadow_projection(retention_days)]


__all__ = [
    "Projection",
    "budget",
    "budget_projection",
    "default_projections",
    "health",
    "health_projection",
    "shadow_projection",
    "usage",
    "usage_projection",
]
