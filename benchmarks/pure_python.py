"""Plain pure-Python rate limiter and circuit breaker with the Rust core's semantics.

Two jobs: the baseline that ``benchmarks/core.py`` measures the Rust core
against, and the reference model the property tests compare the Rust core
with (``tests/test_ratelimit.py``, ``tests/test_breaker.py`` load this file).
So the arithmetic follows ``rust_core/src/limiter.rs`` and ``breaker.rs``
operation for operation: both use IEEE doubles, so the two agree bit for bit.

Written as a competent Python programmer would for production (slots, no
per-call dataclasses, locals in the hot loop), not as a strawman.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from time import monotonic
from typing import Any, NamedTuple

TIERS = ("per_minute", "per_hour", "per_day", "expensive_per_hour", "tokens_per_minute")
PERIODS = (60.0, 3600.0, 86400.0, 3600.0, 60.0)
DEFAULT_LIMITS = (60, 1000, 10_000, 10, 0)
TOLERANCE = 1e-9
_INF = math.inf


class TierStatus(NamedTuple):
    name: str
    limit: int
    remaining: int
    reset: float


class _Profile:
    __slots__ = ("cap", "limits", "rate")

    def __init__(self, limits: tuple[int, ...]) -> None:
        self.limits = limits
        self.cap = tuple(float(limit) for limit in limits)
        self.rate = tuple(float(limit) / p for limit, p in zip(limits, PERIODS, strict=True))


def limits_tuple(limits: dict[str, int | None] | None) -> tuple[int, ...]:
    """``{tier: limit}`` (missing -> default, None or 0 -> disabled) as a tuple."""
    if limits is None:
        return DEFAULT_LIMITS
    return tuple(
        (limits[name] or 0) if name in limits else default
        for name, default in zip(TIERS, DEFAULT_LIMITS, strict=True)
    )


class Decision:
    __slots__ = ("allowed", "denied", "limits", "rate", "retry_after", "used")

    def __init__(
        self,
        allowed: bool,
        retry_after: float,
        denied: tuple[str, ...],
        profile: _Profile,
        used: list[float],
    ) -> None:
        self.allowed = allowed
        self.retry_after = retry_after
        self.denied = denied
        self.limits = profile.limits
        self.rate = profile.rate
        self.used = used

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def denied_by(self) -> tuple[str, ...]:
        return self.denied

    def tier(self, name: str) -> TierStatus | None:
        i = TIERS.index(name)
        limit = self.limits[i]
        if limit == 0:
            return None
        cap = float(limit)
        used = self.used[i]
        left = cap - used
        remaining = 0 if left <= 0.0 else math.floor(left + cap * TOLERANCE)
        reset = used / self.rate[i] if used > 0.0 else 0.0
        return TierStatus(name, limit, remaining, reset)

    @property
    def tiers(self) -> dict[str, TierStatus]:
        out = {}
        for name in TIERS:
            status = self.tier(name)
            if status is not None:
                out[name] = status
        return out


class RateLimiter:
    """Per-key multi-tier token buckets; entry = [profile id, last, used x 5]."""

    def __init__(self, limits: dict[str, int | None] | None = None) -> None:
        self._profiles = [_Profile(limits_tuple(limits))]
        self._interned: dict[tuple[int, ...], int] = {}
        self._overrides: dict[str, int] = {}
        self._entries: dict[str, list[float]] = {}
        self._sweep_at = 1024
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def check(
        self,
        key: str,
        cost: int = 1,
        *,
        expensive: bool = False,
        tokens: int = 0,
        now: float | None = None,
    ) -> Decision:
        return self._check(key, cost, expensive, tokens, now, True)

    def status(
        self,
        key: str,
        cost: int = 1,
        *,
        expensive: bool = False,
        tokens: int = 0,
        now: float | None = None,
    ) -> Decision:
        return self._check(key, cost, expensive, tokens, now, False)

    def _check(
        self, key: str, cost: int, expensive: bool, tokens: int, now: float | None, consume: bool
    ) -> Decision:
        if now is None:
            now = monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = [self._overrides.get(key, 0), now, 0.0, 0.0, 0.0, 0.0, 0.0]
                if consume:
                    self._entries[key] = entry
            profile = self._profiles[int(entry[0])]
            cap, rate = profile.cap, profile.rate
            used = entry[2:]
            elapsed = now - entry[1]
            if elapsed > 0.0:
                used = [max(u - elapsed * r, 0.0) for u, r in zip(used, rate, strict=True)]
                if consume:
                    entry[1] = now
            c = float(cost)
            amounts = (c, c, c, c if expensive else 0.0, float(tokens))
            denied: tuple[str, ...] = ()
            retry_after = 0.0
            for i in range(5):
                limit, amount = cap[i], amounts[i]
                if limit == 0.0 or amount == 0.0:
                    continue
                excess = used[i] + amount - limit
                if excess > limit * TOLERANCE:
                    denied += (TIERS[i],)
                    wait = _INF if amount > limit else excess / rate[i]
                    retry_after = max(retry_after, wait)
            allowed = not denied
            if allowed and consume:
                for i in range(5):
                    if cap[i] != 0.0:
                        used[i] += amounts[i]
            if consume:
                entry[2:] = used
                if len(self._entries) >= self._sweep_at:
                    self._sweep(now)
            return Decision(allowed, retry_after, denied, profile, used)

    def _idle(self, entry: list[float], now: float) -> bool:
        elapsed = max(now - entry[1], 0.0)
        rate = self._profiles[int(entry[0])].rate
        return all(u - elapsed * r <= 0.0 for u, r in zip(entry[2:], rate, strict=True))

    def _sweep(self, now: float) -> int:
        # Amortised O(1): a full pass only when the table has doubled since
        # the last one.
        idle = [k for k, e in self._entries.items() if self._idle(e, now)]
        for k in idle:
            del self._entries[k]
        self._sweep_at = max(1024, 2 * len(self._entries))
        return len(idle)

    def evict_idle(self, now: float | None = None) -> int:
        with self._lock:
            return self._sweep(monotonic() if now is None else now)

    def limits(self, key: str) -> tuple[int, ...]:
        return self._profiles[self._overrides.get(key, 0)].limits

    def _switch(self, entry: list[float], profile_id: int, now: float) -> None:
        old = self._profiles[int(entry[0])]
        new = self._profiles[profile_id]
        elapsed = now - entry[1]
        if elapsed > 0.0:
            entry[2:] = [
                max(u - elapsed * r, 0.0) for u, r in zip(entry[2:], old.rate, strict=True)
            ]
            entry[1] = now
        for i in range(5):
            if new.cap[i] == 0.0:
                entry[2 + i] = 0.0
        entry[0] = profile_id

    def set_limits(
        self, key: str, limits: dict[str, int | None] | None, *, now: float | None = None
    ) -> None:
        now = monotonic() if now is None else now
        with self._lock:
            if limits is None:
                pid = 0
            else:
                t = limits_tuple(limits)
                pid = self._interned.get(t, 0)
                if pid == 0:
                    pid = len(self._profiles)
                    self._profiles.append(_Profile(t))
                    self._interned[t] = pid
            entry = self._entries.get(key)
            if entry is not None:
                self._switch(entry, pid, now)
            if pid == 0:
                self._overrides.pop(key, None)
            else:
                self._overrides[key] = pid

    def set_default_limits(
        self, limits: dict[str, int | None], *, now: float | None = None
    ) -> None:
        now = monotonic() if now is None else now
        with self._lock:
            old = self._profiles[0]
            new = self._profiles[0] = _Profile(limits_tuple(limits))
            for entry in self._entries.values():
                if entry[0] != 0:
                    continue
                elapsed = now - entry[1]
                if elapsed > 0.0:
                    entry[2:] = [
                        max(u - elapsed * r, 0.0) for u, r in zip(entry[2:], old.rate, strict=True)
                    ]
                    entry[1] = now
                for i in range(5):
                    if new.cap[i] == 0.0:
                        entry[2 + i] = 0.0


# --- circuit breaker -------------------------------------------------------

WINDOW_BUCKETS = 60
MAX_QUEUED_TRANSITIONS = 1024
BREAKER_DEFAULTS: dict[str, Any] = {
    "failure_threshold": 5,
    "window_s": 60.0,
    "failure_rate": None,
    "min_calls": 20,
    "recovery_s": 30.0,
    "recovery_multiplier": 2.0,
    "max_recovery_s": 300.0,
    "half_open_max_calls": 1,
    "success_threshold": 1,
    "slow_call_s": None,
    "probe_timeout_s": 60.0,
    "healthy_reset_s": 60.0,
}

Transition = tuple[str, str, float, str]


class CircuitBreaker:
    """The breaker of ``rust_core/src/breaker.rs``, state for state."""

    def __init__(self, **config: Any) -> None:
        unknown = set(config) - set(BREAKER_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}")
        c = {**BREAKER_DEFAULTS, **config}
        self.failure_threshold: int = c["failure_threshold"]
        self.window_s: float = c["window_s"]
        self.failure_rate: float | None = c["failure_rate"]
        self.min_calls: int = c["min_calls"]
        self.recovery_s: float = c["recovery_s"]
        self.recovery_multiplier: float = c["recovery_multiplier"]
        self.max_recovery_s: float = c["max_recovery_s"]
        self.half_open_max_calls: int = c["half_open_max_calls"]
        self.success_threshold: int = c["success_threshold"]
        self.slow_call_s: float | None = c["slow_call_s"]
        self.probe_timeout_s: float = c["probe_timeout_s"]
        self.healthy_reset_s: float = c["healthy_reset_s"]
        self._width = self.window_s / WINDOW_BUCKETS
        self._lock = threading.Lock()
        self.phase = "closed"
        self.closed_since = -_INF
        self.open_until = 0.0
        self.successes = 0
        self.permits: deque[float] = deque()
        self.failures: deque[float] = deque()
        self.slots: list[list[int]] = [[-(2**63), 0, 0] for _ in range(WINDOW_BUCKETS)]
        self.opens = 0
        self.streak = 0
        self.timeout = self.recovery_s
        self.transitions: deque[Transition] = deque()
        self.dropped = 0

    # time buckets for the failure-rate rule
    def _add(self, now: float, failed: bool) -> None:
        epoch = math.floor(now / self._width)
        slot = self.slots[epoch % WINDOW_BUCKETS]
        if slot[0] != epoch:
            if slot[0] > epoch:
                return
            slot[:] = [epoch, 0, 0]
        slot[1] += 1
        slot[2] += int(failed)

    def _totals(self, now: float) -> tuple[int, int]:
        epoch = math.floor(now / self._width)
        calls = failed = 0
        for e, c, f in self.slots:
            if epoch - WINDOW_BUCKETS < e <= epoch:
                calls += c
                failed += f
        return calls, failed

    def _recovery_for(self, streak: int) -> float:
        growth = self.recovery_multiplier ** min(max(streak - 1, 0), 1024)
        return min(self.recovery_s * growth, self.max_recovery_s)

    def _push(self, frm: str, to: str, at: float, reason: str) -> Transition:
        t = (frm, to, at, reason)
        if len(self.transitions) >= MAX_QUEUED_TRANSITIONS:
            self.transitions.popleft()
            self.dropped += 1
        self.transitions.append(t)
        return t

    def _advance(self, now: float) -> Transition | None:
        last = None
        if self.phase == "open" and now >= self.open_until:
            self.phase = "half_open"
            self.successes = 0
            self.permits.clear()
            last = self._push("open", "half_open", self.open_until, "recovery_elapsed")
        if self.phase == "half_open":
            while self.permits and now - self.permits[0] >= self.probe_timeout_s:
                self.permits.popleft()
        return last

    def _clear_window(self) -> None:
        self.failures.clear()
        for slot in self.slots:
            slot[:] = [-(2**63), 0, 0]

    def _streak_after_close(self, now: float) -> int:
        return 0 if now - self.closed_since >= self.healthy_reset_s else self.streak

    def _open(self, now: float, reason: str) -> Transition:
        frm = self.phase
        if frm == "closed":
            self.streak = self._streak_after_close(now)
        self.streak += 1
        self.timeout = self._recovery_for(self.streak)
        self.opens += 1
        self.phase = "open"
        self.open_until = now + self.timeout
        self._clear_window()
        return self._push(frm, "open", now, reason)

    def _close(self, now: float, reason: str) -> Transition:
        frm = self.phase
        self.phase = "closed"
        self.closed_since = now
        self._clear_window()
        return self._push(frm, "closed", now, reason)

    def allow(self, now: float | None = None) -> bool:
        now = monotonic() if now is None else now
        with self._lock:
            self._advance(now)
            if self.phase == "closed":
                return True
            if self.phase == "open":
                return False
            if len(self.permits) < self.half_open_max_calls:
                self.permits.append(now)
                return True
            return False

    def record_success(
        self, now: float | None = None, duration_s: float = 0.0
    ) -> Transition | None:
        if self.slow_call_s is not None and duration_s >= self.slow_call_s:
            return self.record_failure(now)
        now = monotonic() if now is None else now
        with self._lock:
            last = self._advance(now)
            if self.phase == "closed":
                self._add(now, False)
            elif self.phase == "half_open" and self.permits:
                self.permits.popleft()
                self.successes += 1
                if self.successes >= self.success_threshold:
                    last = self._close(now, "probe_succeeded")
            return last

    def record_failure(self, now: float | None = None) -> Transition | None:
        now = monotonic() if now is None else now
        with self._lock:
            last = self._advance(now)
            if self.phase == "closed":
                self._add(now, True)
                threshold = self.failure_threshold
                if threshold > 0:
                    self.failures.append(now)
                    self._trim(now)
                if threshold > 0 and len(self.failures) >= threshold:
                    last = self._open(now, "failure_threshold")
                elif self.failure_rate is not None:
                    calls, failed = self._totals(now)
                    if calls >= self.min_calls and failed >= self.failure_rate * calls:
                        last = self._open(now, "failure_rate")
            elif self.phase == "half_open" and self.permits:
                self.permits.popleft()
                last = self._open(now, "probe_failed")
            return last

    def _trim(self, now: float) -> None:
        start = now - self.window_s
        while self.failures and self.failures[0] <= start:
            self.failures.popleft()

    def state(self, now: float | None = None) -> str:
        now = monotonic() if now is None else now
        with self._lock:
            self._advance(now)
            return self.phase

    def _retry_after(self, now: float) -> float:
        if self.phase == "closed":
            return 0.0
        if self.phase == "open":
            return max(self.open_until - now, 0.0)
        if len(self.permits) < self.half_open_max_calls:
            return 0.0
        oldest = self.permits[0] if self.permits else now
        return max(oldest + self.probe_timeout_s - now, 0.0)

    def retry_after(self, now: float | None = None) -> float:
        now = monotonic() if now is None else now
        with self._lock:
            self._advance(now)
            return self._retry_after(now)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = monotonic() if now is None else now
        with self._lock:
            self._advance(now)
            if self.phase == "closed":
                self._trim(now)
            calls, window_failures = self._totals(now)
            failures = len(self.failures) if self.failure_threshold > 0 else window_failures
            if self.phase == "closed":
                streak = self._streak_after_close(now)
                consecutive, timeout, probes = streak, self._recovery_for(streak + 1), 0
            else:
                consecutive, timeout = self.streak, self.timeout
                probes = len(self.permits) if self.phase == "half_open" else 0
            return {
                "state": self.phase,
                "failures": failures,
                "calls": calls,
                "opens": self.opens,
                "consecutive_opens": consecutive,
                "recovery_timeout": timeout,
                "retry_after": self._retry_after(now),
                "probes_in_flight": probes,
                "dropped_transitions": self.dropped,
            }

    def reset(self, now: float | None = None) -> Transition | None:
        now = monotonic() if now is None else now
        with self._lock:
            last = self._advance(now)
            if self.phase != "closed":
                last = self._close(now, "reset")
            self.streak = 0
            self.timeout = self.recovery_s
            self._clear_window()
            return last

    def drain_transitions(self) -> list[Transition]:
        with self._lock:
            out = list(self.transitions)
            self.transitions.clear()
            return out
