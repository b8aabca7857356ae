"""Where ``ShadowCompared`` events go: the events publisher, or memory.

``publish`` is synchronous and must never block or raise, like a
:class:`~tollway.record.Recorder`. :class:`PublisherSink` hands events to the
events layer's queue (JetStream, with the outbox behind it); the shadow
projection then folds them from the stream like every other view.
:class:`MemorySink` folds them straight into a view of its own (sequence =
arrival order): the gateway uses it when events are off, tests to read what
was published.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from typing import Protocol

from tollway.events.projections import fold_event, shadow_projection
from tollway.events.schema import Event
from tollway.shadow import projection
from tollway.shadow.event import ShadowCompared

__all__ = ["MemorySink", "PublisherSink", "ShadowSink"]


class ShadowSink(Protocol):
    instance: str

    def new_id(self) -> str: ...

    def publish(self, event: ShadowCompared) -> None: ...


class _Publisher(Protocol):
    instance: str

    def new_id(self) -> str: ...

    def submit(self, item: ShadowCompared) -> None: ...


class PublisherSink:
    """Through the events layer's publisher (``tollway.events.publisher.Publisher``)."""

    __slots__ = ("instance", "publisher")

    def __init__(self, publisher: _Publisher) -> None:
        self.publisher = publisher
        self.instance = publisher.instance

    def new_id(self) -> str:
        return self.publisher.new_id()

    def publish(self, event: ShadowCompared) -> None:
        self.publisher.submit(event)  # never raises: the publisher contains its failures


class MemorySink:
    """Folds each event into :attr:`view` at once and keeps the last ``keep`` of them."""

    def __init__(self, instance: str = "", keep: int = 10_000) -> None:
        self.instance = instance or f"local-{os.getpid()}"
        self._events: collections.deque[ShadowCompared] = collections.deque(maxlen=keep)
        self.published = 0
        self._proj = shadow_projection()
        self._prefix = os.urandom(8).hex()
        self._ids = itertools.count()
        self._seq = 0
        self._cond = threading.Condition()

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):012x}"

    @property
    def view(self) -> projection.ShadowView:
        return self._proj.view

    @property
    def events(self) -> list[ShadowCompared]:
        with self._cond:
            return list(self._events)

    def publish(self, event: ShadowCompared) -> None:
        with self._cond:
            self._events.append(event)
            self.published += 1
            self.observe(event)
            self._cond.notify_all()

    def observe(self, event: Event) -> None:
        """Fold any event into the view (A/B call events, when there is no stream to fold),
        keeping its days as the stream's views do."""
        self._seq += 1
        # The stream's fold (each event id once, the days kept); a clock far ahead moves no
        # day on, as in the projection runner.
        fold_event([self._proj], self._seq, event, time.time() + 86400)

    def wait(self, n: int, timeout: float = 60.0) -> list[ShadowCompared]:
        """Block (a test's thread) until ``n`` events arrived; returns them all.

        ``timeout`` only detects a hang (a loaded machine may take seconds): past it,
        TimeoutError says how many came, rather than a shorter list failing elsewhere."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.published >= n, timeout):
                raise TimeoutError(f"{self.published} shadow events published, wanted {n}")
            return list(self._events)
