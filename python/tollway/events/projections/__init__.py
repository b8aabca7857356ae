"""Views folded from the event stream: usage, budget, provider health, shadow.

Each projection is a pure fold ``apply(view, seq, event) -> view`` that skips
sequences it has already applied, plus ``dump``/``load`` for its checkpoint
and ``prune`` for the days it no longer keeps. A :class:`Projection` pairs one
with its current view and decides which events reach the fold: each event id
once and only of days the view keeps, by the view's ``seen``
(:mod:`tollway.events.seen`, part of the checkpoint). The
:class:`~tollway.events.projections.runner.ProjectionRunner` feeds them; views
at the same sequence share one ``seen`` (:func:`link`), so each event id is
decided once for all of them (:func:`fold_events`).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from tollway.events.projections import budget, directory, health, recent, usage
from tollway.events.schema import Event
from tollway.events.seen import PRUNE, RETENTION_DAYS, SKIP, Seen
from tollway.shadow import projection as shadow


class View(Protocol):
    last_seq: int
    seen: Seen


V = TypeVar("V", bound=View)


def _nothing_by_day(view: Any) -> None:
    """The view holds nothing by day: only its ``seen`` is pruned."""


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
    prune: Callable[[V], None] = _nothing_by_day  # drop the days before ``view.seen.oldest``
    skipped: Callable[[V, int, Event], None] | None = None  # sees what is not folded again

    def apply(self, seq: int, event: Event) -> None:
        """Fold one event into this view alone (views a runner has linked share their
        ``seen``: they fold through the runner)."""
        fold_event([self], seq, event)

    def reset(self) -> None:
        self.view = self.new()

    def rebase(self, seq: int) -> None:
        """The stream was recreated and numbers from ``seq + 1`` again: keep the view's
        contents, forget the old sequence numbers."""
        self.view.last_seq = seq
        marks = getattr(self.view, "reserved_seq", None)  # budget: per-tenant CAS marks
        if isinstance(marks, dict):
            marks.clear()


def fold_events(group: Sequence[Projection[Any]], seqs: Sequence[int],
                events: Sequence[Event], horizon: float = math.inf) -> None:
    """Fold events with ascending sequences into views at one sequence sharing one ``seen``
    (see :func:`link`; or one view): each event's id and day are decided once for all.
    Events after ``horizon`` (unix time) move no day on (:meth:`Seen.admit`)."""
    if len(seqs) == 1:  # the live tail, message by message: no batch to set up
        fold_event(group, seqs[0], events[0], horizon)
        return
    first = group[0].view
    start = bisect_right(seqs, first.last_seq)
    if start == len(seqs):
        return
    admit = first.seen.admit
    fresh_seqs, fresh = seqs[start:], events[start:]
    verdicts = [admit(e.event_id, e.occurred_at, horizon) for e in fresh]
    again: list[tuple[int, Event]] = []
    pruned = PRUNE in verdicts
    if SKIP in verdicts:
        kept = [i for i, v in enumerate(verdicts) if v != SKIP]
        again = [(fresh_seqs[i], fresh[i]) for i, v in enumerate(verdicts) if v == SKIP]
        fresh_seqs, fresh = [fresh_seqs[i] for i in kept], [fresh[i] for i in kept]
    last = seqs[-1]
    for p in group:
        view = p.view
        if p.fold_batch is not None:
            view = p.fold_batch(view, fresh_seqs, fresh)
        else:
            fold = p.fold
            for seq, e in zip(fresh_seqs, fresh, strict=True):
                view = fold(view, seq, e)
        if again and p.skipped is not None:
            for seq, e in again:
                p.skipped(view, seq, e)
        if pruned:
            p.prune(view)
        view.last_seq = last
        p.view = view


def fold_event(group: Sequence[Projection[Any]], seq: int, event: Event,
               horizon: float = math.inf) -> None:
    """:func:`fold_events` for one event."""
    first = group[0].view
    if seq <= first.last_seq:
        return
    verdict = first.seen.admit(event.event_id, event.occurred_at, horizon)
    for p in group:
        view = p.view
        if verdict == SKIP:
            if p.skipped is not None:
                p.skipped(view, seq, event)
            view.last_seq = seq
            continue
        p.view = view = p.fold(view, seq, event)
        if verdict == PRUNE:
            p.prune(view)


def link(projections: Sequence[Projection[Any]]) -> list[list[Projection[Any]]]:
    """Group the views that stand at one sequence with equal ``seen`` -- folds of one
    stream, the usual case -- and make each group share one ``seen`` object."""
    groups: list[list[Projection[Any]]] = []
    for p in projections:
        for group in groups:
            lead = group[0].view
            if lead.last_seq == p.view.last_seq and (lead.seen is p.view.seen
                                                     or lead.seen == p.view.seen):
                p.view.seen = lead.seen
                group.append(p)
                break
        else:
            groups.append([p])
    return groups


def linked(groups: Sequence[Sequence[Projection[Any]]]) -> bool:
    """Still as :func:`link` left them (no view replaced, reset or loaded since)."""
    for group in groups:
        lead = group[0].view
        for p in group:
            if p.view.seen is not lead.seen or p.view.last_seq != lead.last_seq:
                return False
    return True


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
                      _kept(usage.load, usage.prune, retention_days), usage.apply_batch,
                      usage.prune)


def budget_projection(retention_days: int = RETENTION_DAYS) -> Projection[budget.BudgetState]:
    def new() -> budget.BudgetState:
        return budget.new(retention_days)
    return Projection("budget", 2, new(), budget.apply, new, budget.dump,
                      _kept(budget.load, budget.prune, retention_days), budget.apply_batch,
                      budget.prune, budget.skipped)


def health_projection(retention_days: int = RETENTION_DAYS) -> Projection[health.HealthView]:
    def new() -> health.HealthView:
        return health.new(retention_days)
    return Projection("health", 2, new(), health.apply, new, health.dump,
                      _kept(health.load, _nothing_by_day, retention_days))


def shadow_projection(retention_days: int = RETENTION_DAYS) -> Projection[shadow.ShadowView]:
    """Shadow comparisons and A/B arms (``tollway.shadow.projection``)."""
    def new() -> shadow.ShadowView:
        return shadow.new(retention_days)
    return Projection("shadow", shadow.VERSION, new(), shadow.apply, new, shadow.dump,
                      _kept(shadow.load, shadow.prune, retention_days), prune=shadow.prune)


def directory_projection(retention_days: int = RETENTION_DAYS
                         ) -> Projection[directory.DirectoryView]:
    """Run-time tenants and keys (``tollway.directory``); keeps every change, whatever
    its age."""
    def new() -> directory.DirectoryView:
        return directory.new(retention_days)
    return Projection("directory", 1, new(), directory.apply, new, directory.dump,
                      _kept(directory.load, _nothing_by_day, retention_days),
                      skipped=directory.skipped)


def recent_projection(retention_days: int = RETENTION_DAYS) -> Projection[recent.RecentView]:
    """The last events, for the dashboard's live tail."""
    def new() -> recent.RecentView:
        return recent.new(retention_days)
    return Projection("recent", 1, new(), recent.apply, new, recent.dump,
                      _kept(recent.load, _nothing_by_day, retention_days))


def default_projections(retention_days: int = RETENTION_DAYS) -> list[Projection[Any]]:
    """The views, keeping ``retention_days`` days of events (``[events] retention_days``)."""
    return [usage_projection(retention_days), budget_projection(retention_days),
            health_projection(retention_days), shadow_projection(retention_days),
            directory_projection(retention_days), recent_projection(retention_days)]


__all__ = [
    "Projection",
    "budget",
    "budget_projection",
    "default_projections",
    "directory",
    "directory_projection",
    "fold_event",
    "fold_events",
    "health",
    "health_projection",
    "link",
    "linked",
    "recent",
    "recent_projection",
    "shadow_projection",
    "usage",
    "usage_projection",
]
