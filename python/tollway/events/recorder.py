"""The events layer's :class:`~tollway.record.Recorder`: settled calls become call events."""

from __future__ import annotations

import time

from tollway.events.publisher import Publisher
from tollway.events.schema import BreakerChanged
from tollway.record import CallRecord


class EventRecorder:
    """``record`` hands the record to the publisher, which writes its event to the outbox
    before returning (the pipeline calls it before the response's last bytes) and
    publishes it from its task, off the response path.
    """

    __slots__ = ("_submit", "publisher")

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._submit = publisher.submit

    def record(self, rec: CallRecord) -> None:
        self._submit(rec)

    def breaker_changed(self, provider: str, previous: str, state: str, *,
                        failures: int = 0, reason: str = "", recovery_s: float = 0.0) -> None:
        """For the breaker's state-change hook; also never blocks."""
        self._submit(BreakerChanged(
            event_id=self.publisher.new_id(), occurred_at=time.time(),
            instance=self.publisher.instance, provider=provider, previous=previous,
            state=state, failures=failures, reason=reason, recovery_s=recovery_s))
