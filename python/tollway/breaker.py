"""Circuit breakers with state-change listeners.

The state machine is Rust (``tollway._core.CircuitBreaker``); this facade
adds a name (the provider or deployment) and ``on_change`` listeners, called
once for every transition, in order, outside the breaker's lock, on a thread
that called the breaker (no call ever waits for another thread's
listeners). Later work publishes them as ``tollway.breaker.changed.<provider>``
events.

>>> breaker = CircuitBreaker("openai", failure_threshold=2)
>>> seen = []
>>> unsubscribe = breaker.on_change(seen.append)
>>> breaker.record_failure(now=10.0), breaker.record_failure(now=11.0)
(None, BreakerTransition(breaker='openai', from_state='closed', to_state='open', at=11.0, \
reason='failure_threshold'))
>>> breaker.allow(now=12.0), breaker.retry_after(now=12.0)
(False, 29.0)
>>> breaker.allow(now=41.0), breaker.state(now=41.0)
(True, 'half_open')
>>> [t.to_state for t in seen]
['open', 'half_open']
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal, NamedTuple, TypedDict, Unpack, cast

from tollway import _core
from tollway._core import BreakerSnapshot

__all__ = [
    "BreakerOptions",
    "BreakerSnapshot",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "Listener",
]

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


class BreakerOptions(TypedDict, total=False):
    """The breaker's settings; every one has a default (DESIGN.md)."""

    failure_threshold: int  # failures in the window that open it (5); 0 = rate rule only
    window_s: float  # monitoring window (60 s)
    failure_rate: float | None  # optional rule: failed / calls >= rate (0..1]
    min_calls: int  # calls in the window before the rate rule applies (20)
    recovery_s: float  # first open lasts this long (30 s)
    recovery_multiplier: float  # growth on each consecutive re-open (2)
    max_recovery_s: float  # cap of the recovery timeout (300 s)
    half_open_max_calls: int  # probes in flight while half-open (1)
    success_threshold: int  # probe successes that close it (1)
    slow_call_s: float | None  # a success at least this slow counts as a failure
    probe_timeout_s: float  # a probe permit never recorded expires after this (60 s)
    healthy_reset_s: float  # closed this long: the recovery timeout starts over (60 s)


class BreakerTransition(NamedTuple):
    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    at: float  # monotonic seconds; open -> half_open is dated at the timeout's end
    # failure_threshold, failure_rate, recovery_elapsed, probe_*, reset; peer: applied
    # from another gateway process's breaker (tollway.events.breakers), not news of ours
    reason: str


Listener = Callable[[BreakerTransition], None]

# The core queues at most 1024 transitions (MAX_QUEUED_TRANSITIONS in breaker.rs);
# from this many on, a caller waits for the deliverer rather than risk the drop.
_WAIT_AT = 512


class CircuitBreaker:
    """One provider's (or deployment's) breaker. Thread-safe.

    ``now`` is optional everywhere and defaults to :func:`time.monotonic`.
    """

    __slots__ = ("_core", "_deliverer", "_delivering", "_listeners", "_listeners_lock", "name")

    def __init__(self, name: str, **options: Unpack[BreakerOptions]) -> None:
        self.name = name
        self._core = _core.CircuitBreaker(**options)
        self._listeners: tuple[Listener, ...] = ()
        self._listeners_lock = threading.Lock()
        self._delivering = threading.Lock()
        self._deliverer = 0  # the thread id holding _delivering, 0 when none

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state()!r})"

    @property
    def options(self) -> BreakerOptions:
        return cast(BreakerOptions, self._core.config())

    def on_change(self, listener: Listener) -> Callable[[], None]:
        """Calls ``listener`` for every later transition; returns an unsubscribe function."""
        with self._listeners_lock:
            self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            with self._listeners_lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    def allow(self, now: float | None = None) -> bool:
        """May a call go through? When half-open this takes a probe permit,
        which the call's ``record_success`` / ``record_failure`` returns."""
        ok = self._core.allow(now)
        if self._core.pending_transitions:
            self._dispatch()
        return ok

    def record_success(self, now: float | None = None,
                       duration_s: float = 0.0) -> BreakerTransition | None:
        """Records a call that succeeded after ``duration_s`` seconds.

        Returns the transition it caused, if any (listeners hear of it too).
        """
        raw = self._core.record_success(now, duration_s)
        return self._after(raw)

    def record_failure(self, now: float | None = None) -> BreakerTransition | None:
        raw = self._core.record_failure(now)
        return self._after(raw)

    def state(self, now: float | None = None) -> BreakerState:
        state = cast(BreakerState, self._core.state(now))
        if self._core.pending_transitions:
            self._dispatch()
        return state

    def retry_after(self, now: float | None = None) -> float:
        """Seconds until a call (or probe) would be admitted; 0 if now."""
        wait = self._core.retry_after(now)
        if self._core.pending_transitions:
            self._dispatch()
        return wait

    def snapshot(self, now: float | None = None) -> BreakerSnapshot:
        snap = self._core.snapshot(now)
        if self._core.pending_transitions:
            self._dispatch()
        return snap

    def reset(self, now: float | None = None) -> BreakerTransition | None:
        """Closes the breaker and forgets its history (an operator's override)."""
        return self._after(self._core.reset(now))

    def force_open(self, open_for_s: float,
                   now: float | None = None) -> BreakerTransition | None:
        """Opens it for ``open_for_s`` because a peer's breaker for the same provider
        opened (reason ``peer``), or, already open, moves the end of the open period to
        ``now + open_for_s``: a peer's new cool-down, or a hold while a peer probes."""
        return self._after(self._core.force_open(open_for_s, now))

    def force_close(self, now: float | None = None) -> BreakerTransition | None:
        """Closes it because a peer's probe succeeded (reason ``peer``); the streak of
        opens is kept, unlike :meth:`reset`."""
        return self._after(self._core.force_close(now))

    def _after(self, raw: tuple[str, str, float, str] | None) -> BreakerTransition | None:
        if self._core.pending_transitions:
            self._dispatch()
        return None if raw is None else self._transition(raw)

    def _transition(self, raw: tuple[str, str, float, str]) -> BreakerTransition:
        frm, to, at, reason = raw
        return BreakerTransition(self.name, cast(BreakerState, frm), cast(BreakerState, to),
                                 at, reason)

    def _dispatch(self) -> None:
        # One thread delivers at a time, so listeners see transitions in
        # order; the others don't wait: the deliverer re-checks the queue
        # after letting go, so what they queued is delivered by it. A
        # listener calling back into this breaker lands here too and
        # returns at once; its transition follows the current batch.
        #
        # Not waiting is only safe while the queue has room: the core keeps
        # at most MAX_QUEUED transitions and drops the oldest past that. A
        # deliverer descheduled in the middle of a batch (the GIL moves on
        # every few ms) lets the other threads fill it, which lost 100 of
        # 670 opens under four threads. So past half of it, callers wait
        # for the deliverer instead of returning: back-pressure, not loss.
        me = threading.get_ident()
        while pending := self._core.pending_transitions:
            if self._deliverer == me:
                return  # a listener calling back: the loop below delivers it next
            if not self._delivering.acquire(blocking=pending >= _WAIT_AT):
                return
            self._deliverer = me
            try:
                for raw in self._core.drain_transitions():
                    self._deliver(self._transition(raw))
            finally:
                self._deliverer = 0
                self._delivering.release()

    def _deliver(self, transition: BreakerTransition) -> None:
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:
                # One broken subscriber must not hide the change from the
                # others, nor fail the call that noticed it.
                log.exception("breaker %s: listener %r failed", self.name, listener)
