"""Learning routing as a view of the event stream: one set of choices for the fleet.

With events on, the evidence and the candidate serving each route and task are a
projection (``learning``) of the ``shadow.compared`` events of the routes that learn,
folded in stream order like every other view and checkpointed with them. Every gateway
process on the stream folds the same samples in the same order -- its own and every
other process's -- so all of them serve the same candidate, and a restarted one resumes
from its checkpoint instead of from nothing.

A decision is published by each process that folds its sample while the sample is
fresh (:data:`LIVE_S`). They all make it the same, with the id ``learn-<the sample's
event id>``: JetStream's duplicate window keeps one of them, and the views' ``seen``
folds one. A replay (a restart, a rebuild) publishes none: the processes that folded
those samples live did.

The fold reads the config (rules, prices, candidates): gateways sharing a stream are
expected to share their ``[learn]`` and ``[[shadow]]`` settings, as they share tenants.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec

from tollway.events.projections import Projection
from tollway.events.schema import Event, RouteLearned, ShadowCompared
from tollway.events.seen import RETENTION_DAYS, Seen
from tollway.learn.evidence import Evidence, Learning

__all__ = ["LIVE_S", "LearningView", "learning_projection", "log_decision"]

log = logging.getLogger("tollway.learn")

# A sample younger than this is being folded live: its decision is published. Well inside
# the stream's duplicate window (DESIGN: >= 2 min), so every process's copy but one is
# dropped by JetStream.
LIVE_S = 60.0
VERSION = 1


def log_decision(decision: RouteLearned) -> None:
    log.info("learning routing: %s", decision.why, extra={
        "route": decision.route, "task": decision.task, "model": decision.model,
        "previous": decision.previous, "action": decision.action})


class LearningView:
    """The projection's view: the fold's :class:`Learning` state, at a stream sequence."""

    __slots__ = ("last_seq", "learning", "seen")

    def __init__(self, learning: Learning, seen: Seen, last_seq: int = 0) -> None:
        self.learning = learning
        self.seen = seen
        self.last_seq = last_seq


class _Saved(msgspec.Struct, array_like=True):
    """A checkpoint: each candidate's samples (agreed, latencies) and the choices."""

    last_seq: int
    seen: Seen
    evidence: list[tuple[str, str, str, list[bool], list[float]]]
    serving: list[tuple[str, str, str]]


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Saved)


def learning_projection(make: Callable[[], Learning], publish: Callable[[RouteLearned], None],
                        retention_days: int = RETENTION_DAYS,
                        clock: Callable[[], float] = time.time) -> Projection[LearningView]:
    """The ``learning`` view: ``make()`` a fresh fold state (from the config);
    ``publish(decision)`` for the decisions of samples folded live."""

    def new() -> LearningView:
        return LearningView(make(), Seen(retention_days))

    def fold(view: LearningView, seq: int, event: Event) -> LearningView:
        if seq <= view.last_seq:
            return view
        view.last_seq = seq
        if type(event) is ShadowCompared:
            decision = view.learning.observe(event)
            if decision is not None and clock() - event.occurred_at < LIVE_S:
                log_decision(decision)
                publish(decision)
        return view

    def dump(view: LearningView) -> bytes:
        lg = view.learning
        return _enc.encode(_Saved(
            view.last_seq, view.seen,
            [(r, t, m, list(ev.agreed), list(ev.latency))
             for (r, t, m), ev in sorted(lg.evidence.items())],
            [(r, t, m) for (r, t), m in sorted(lg.serving.items())]))

    def load(data: bytes) -> LearningView:
        saved = _dec.decode(data)
        learning = make()
        window = learning.rules.window
        for route, task, model, agreed, latency in saved.evidence:
            if model in learning.candidates.get(route, ()):  # still one of the config's
                learning.evidence[(route, task, model)] = Evidence(
                    deque(agreed[-window:]), deque(latency[-window:]))
        for route, task, model in saved.serving:
            if model in learning.candidates.get(route, ()):
                learning.serving[(route, task)] = model
        view = LearningView(learning, saved.seen, saved.last_seq)
        view.seen.retain(retention_days)
        return view

    return Projection("learning", VERSION, new(), fold, new, dump, load)
