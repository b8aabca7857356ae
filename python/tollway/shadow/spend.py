"""The daily shadow spend of one route: its own cap, apart from every tenant's budget.

A shadow call first holds its maximum cost (prompt tokens plus the output
bound at the candidate's price); it starts only if today's spend plus open
holds plus the hold stays within the cap. When it ends, the hold becomes the
actual cost. Spend of other gateway processes on the same route comes from
the shadow projection (``others``), so several instances on one NATS share
one cap; this process's own spend is counted here, as its events may not
have come back through the stream yet.

A cap of 0 still lets free candidates (a local model priced at 0) run.
"""

from __future__ import annotations

from collections.abc import Callable

from tollway.events.schema import day_of

__all__ = ["Hold", "ShadowSpend"]

NANO = 1_000_000_000


class Hold:
    __slots__ = ("amount", "day", "open")

    def __init__(self, day: str, amount: int) -> None:
        self.day = day
        self.amount = amount
        self.open = True


class ShadowSpend:
    def __init__(self, limit_nanousd: int, now: Callable[[], float],
                 others: Callable[[str], int] | None = None) -> None:
        self.limit = limit_nanousd
        self._now = now  # wall clock, unix seconds (the UTC day)
        self._others = others or (lambda day: 0)
        self._spent: dict[str, int] = {}  # day -> settled nano-USD of this process
        self._held: dict[str, int] = {}  # day -> open holds

    def today(self) -> str:
        return day_of(self._now())

    def used(self, day: str | None = None) -> int:
        """Settled + held today, this process and the others."""
        day = day or self.today()
        return self._spent.get(day, 0) + self._held.get(day, 0) + self._others(day)

    def reserve(self, amount: int) -> Hold | None:
        day = self.today()
        if self.used(day) + amount > self.limit:
            return None
        if day not in self._spent:
            # A new day: forget the old ones (their holds settle into nothing).
            self._spent = {day: 0}
            self._held = {day: self._held.get(day, 0)}
        self._held[day] = self._held.get(day, 0) + amount
        return Hold(day, amount)

    def settle(self, hold: Hold, actual: int) -> None:
        """The call ended: its actual cost replaces the hold (0 when it cost nothing)."""
        if not hold.open:
            return
        hold.open = False
        if hold.day in self._held:
            self._held[hold.day] -= hold.amount
        if hold.day in self._spent:
            self._spent[hold.day] += actual

    def release(self, hold: Hold) -> None:
        self.settle(hold, 0)

    def summary(self) -> dict[str, object]:
        day = self.today()
        used = self.used(day)
        return {
            "day": day,
            "daily_usd": self.limit / NANO,
            "spent_usd": (self._spent.get(day, 0) + self._others(day)) / NANO,
            "held_usd": self._held.get(day, 0) / NANO,
            "remaining_usd": max(0, self.limit - used) / NANO,
        }
