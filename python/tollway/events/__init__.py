"""The events layer: every call an event on NATS JetStream, and the views folded from them.

- :mod:`.schema`: the event structs, subjects and codecs (the contract; events/README.md)
- :mod:`.broker`: the embedded nats-server, the connection, stream and KV setup
- :mod:`.publisher`, :mod:`.outbox`, :mod:`.recorder`: records -> events, off the response path
- :mod:`.projections`: usage, budget, provider health and shadow as pure folds, and their runner
- :mod:`.seen`: which event ids a view has folded, and which days it keeps
- :mod:`.nats`: the own NATS protocol code, the bulk reader and the publish wire (README.md)
- :mod:`.budget`: reservations shared by every gateway on one NATS (the budget guard's API)
- :mod:`.service`: all of it started and stopped as one; :mod:`.wiring`: inside the app
- :mod:`.replay`, :mod:`.cli`: ``tollway replay``, ``tollway usage``, ``tollway events tail``

Submodules are imported on use, so ``import tollway.events.schema`` does not start NATS
machinery in a process that only reads events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tollway.events.budget import BudgetUnavailable, BudgetView, Reservation
    from tollway.events.service import EventsService

__all__ = ["BudgetUnavailable", "BudgetView", "EventsService", "Reservation"]


def __getattr__(name: str) -> Any:
    if name == "EventsService":
        from tollway.events.service import EventsService

        return EventsService
    if name in ("BudgetView", "Reservation", "BudgetUnavailable"):
        from tollway.events import budget

        return getattr(budget, name)
    raise AttributeError(name)
