"""Shadow mode while the app runs: the runner, the A/B split, and where the report reads from.

With events on, ``ShadowCompared`` events go through the events publisher
and the report reads the ``shadow`` projection that the events layer folds
from the stream (every gateway's samples); with events off they fold into a
view in memory (this process's samples only). :mod:`.wiring` puts it into
the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tollway.config import ShadowRouteConfig
from tollway.learn.routing import LearningSink
from tollway.shadow.ab import ABSplit
from tollway.shadow.projection import ShadowView, spend_by
from tollway.shadow.runner import ShadowRunner
from tollway.shadow.sink import MemorySink, ShadowSink

if TYPE_CHECKING:
    from tollway.events.service import EventsService
    from tollway.learn.routing import Learner
    from tollway.parts import GatewayParts

__all__ = ["ShadowService"]


class ShadowService:
    def __init__(self, parts: GatewayParts, sink: ShadowSink,
                 entries: list[ShadowRouteConfig] | None = None,
                 events: EventsService | None = None) -> None:
        self.sink = sink
        # The sink itself when learning routing wraps it (tollway.learn.routing.LearningSink)
        self.base: ShadowSink = sink.inner if isinstance(sink, LearningSink) else sink
        self.events = events
        entries = parts.config.shadow if entries is None else entries
        self.runner = ShadowRunner(parts, entries, sink, others=self._others)
        self.ab = ABSplit(parts, entries)
        self.learner: Learner | None = None  # learning routing (tollway.learn), when on

    def view(self) -> ShadowView:
        """The stream's view when the events layer folds one, else this process's own."""
        for proj in self.events.projections if self.events is not None else ():
            if proj.name == "shadow":
                view: ShadowView = proj.view
                return view
        if isinstance(self.base, MemorySink):
            return self.base.view
        return ShadowView()

    @property
    def source(self) -> str:
        return "local" if isinstance(self.base, MemorySink) else "events"

    def _others(self, route: str, day: str) -> int:
        if isinstance(self.base, MemorySink):
            return 0  # its view holds only this process's samples, already counted
        return spend_by(self.view(), route, day, excluding=self.base.instance)
