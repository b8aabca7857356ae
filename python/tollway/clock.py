"""Time as an argument: the clock that guards, breakers and retries read.

Rate limits refill over minutes to days, breakers open for 30 s, budgets roll
over at midnight UTC, retries back off for seconds: tests of all that must
not sleep. Everything in the policy, guard and resilience path reads time
from one :class:`Clock` owned by the gateway; production uses
:class:`SystemClock`, tests a :class:`ManualClock` they move by hand.

``monotonic`` is the clock of the Rust limiter and breaker (the same clock as
:func:`time.monotonic`); ``time`` is wall time in unix seconds, for budget
days; ``sleep`` is the only way the resilience code waits.
"""

from __future__ import annotations

import asyncio
import time as _time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks. ``monotonic`` and ``time`` are the stdlib functions themselves."""

    __slots__ = ()

    monotonic = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; ``sleep`` moves it instead of waiting.

    ``sleep`` still yields to the event loop once, so concurrent tasks
    interleave as they would around a real wait.
    """

    __slots__ = ("_mono", "_wall", "slept")

    def __init__(self, wall: float = 1_767_225_600.0, monotonic: float = 1_000.0) -> None:
        # Default wall time: 2026-01-01T00:00:00Z, a day boundary tests can count from.
        self._wall = wall
        self._mono = monotonic
        self.slept: list[float] = []  # every sleep asked for, in order

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._mono += seconds
        self._wall += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
