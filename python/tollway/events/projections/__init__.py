"""Views folded from the event stream: usage, budget, provider health.

Each projection is a pure fold ``apply(view, seq, event) -> view`` that skips
sequences it has already applied, plus ``dump``/``load`` for its checkpoint.
A :class:`Projection` pairs one with its current view; the
:class:`~tollway.events.projections.runner.ProjectionRunner` feeds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from tollway.events.projections import budget, health, usage
from tollway.events.schema import Event
from tollway.shadow import projection as shadow


class View(Protocol):
    last_seq: int


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


def usage_projection() -> Projection[usage.UsageView]:
    return Projection("usage", 1, usage.UsageView(), usage.apply, usage.UsageView,
                      usage.dump, usage.load, usage.apply_batch)


def budget_projection() -> Projection[budget.BudgetState]:
    return Projection("budget", 1, budget.BudgetState(), budget.apply, budget.BudgetState,
                      budget.dump, budget.load, budget.apply_batch)


def health_projection() -> Projection[health.HealthView]:
    return Projection("health", 1, health.HealthView(), health.apply, health.HealthView,
                      health.dump, health.load)


def shadow_projection() -> Projection[shadow.ShadowView]:
    """Shadow comparisons and A/B arms (``tollway.shadow.projection``)."""
    return Projection("shadow", shadow.VERSION, shadow.ShadowView(), shadow.apply,
                      shadow.ShadowView, shadow.dump, shadow.load)


def default_projections() -> list[Projection[Any]]:
    return [usage_projection(), budget_projection(), health_projection(), shadow_projection()]


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
