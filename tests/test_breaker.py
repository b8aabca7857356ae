"""The Rust circuit breaker from Python: facade, listeners, threads, state machine.

The state-machine test drives the Rust breaker and the pure-Python reference
(``benchmarks/pure_python.py``) with the same random events and requires the
same answers and the same transitions, each of them a legal edge.
"""

from __future__ import annotations

import doctest
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tollway
import tollway.breaker
from reference import load_reference
from tollway import _core
from tollway.breaker import BreakerTransition, CircuitBreaker

ref = load_reference()

LEGAL = {
    ("closed", "open"), ("open", "half_open"), ("half_open", "closed"), ("half_open", "open"),
    ("open", "closed"),  # reset
}


def test_the_package_exports_the_facade() -> None:
    assert tollway.CircuitBreaker is CircuitBreaker
    assert tollway.BreakerTransition is BreakerTransition


def test_lifecycle_and_listeners() -> None:
    breaker = CircuitBreaker("openai")
    seen: list[BreakerTransition] = []
    breaker.on_change(seen.append)
    for i in range(4):
        assert breaker.record_failure(now=100.0 + i) is None
    opened = breaker.record_failure(now=104.0)
    assert opened == BreakerTransition("openai", "closed", "open", 104.0, "failure_threshold")
    assert not breaker.allow(now=110.0)
    assert breaker.retry_after(now=110.0) == 24.0
    snap = breaker.snapshot(now=110.0)
    assert (snap.state, snap.opens, snap.recovery_timeout, snap.retry_after) == (
        "open", 1, 30.0, 24.0)
    # Noticed by allow(): the listener hears of it without any record call.
    assert breaker.allow(now=134.0)
    assert seen[-1] == BreakerTransition("openai", "open", "half_open", 134.0,
                                         "recovery_elapsed")
    assert not breaker.allow(now=134.5)
    closed = breaker.record_success(now=135.0, duration_s=0.8)
    assert closed is not None and closed.to_state == "closed"
    assert [(t.from_state, t.to_state) for t in seen] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert breaker.state(now=135.0) == "closed"


def test_recovery_timeout_grows_and_caps() -> None:
    breaker = CircuitBreaker("p", failure_threshold=1, recovery_s=10.0, max_recovery_s=35.0)
    now = 0.0
    breaker.record_failure(now=now)
    timeouts = []
    for _ in range(4):
        timeouts.append(breaker.snapshot(now=now).recovery_timeout)
        now += breaker.retry_after(now=now)
        assert breaker.allow(now=now)
        assert breaker.record_failure(now=now) == BreakerTransition(
            "p", "half_open", "open", now, "probe_failed")
    assert timeouts == [10.0, 20.0, 35.0, 35.0]


def test_failure_rate_and_slow_calls() -> None:
    breaker = CircuitBreaker("p", failure_threshold=0, failure_rate=0.5, min_calls=4,
                             slow_call_s=2.0)
    breaker.record_success(now=1.0, duration_s=0.1)
    breaker.record_success(now=1.0, duration_s=0.1)
    breaker.record_success(now=1.0, duration_s=2.5)  # slow: a failure
    opened = breaker.record_failure(now=1.5)
    assert opened is not None and opened.reason == "failure_rate"


def test_an_abandoned_probe_does_not_wedge_the_breaker() -> None:
    breaker = CircuitBreaker("p", failure_threshold=1, probe_timeout_s=5.0)
    breaker.record_failure(now=0.0)
    assert breaker.allow(now=30.0)  # this caller is cancelled and never records
    assert not breaker.allow(now=34.0)
    assert breaker.retry_after(now=34.0) == pytest.approx(1.0)
    assert breaker.allow(now=35.0)


def test_reset_and_unsubscribe() -> None:
    breaker = CircuitBreaker("p", failure_threshold=1)
    seen: list[BreakerTransition] = []
    unsubscribe = breaker.on_change(seen.append)
    breaker.record_failure(now=0.0)
    unsubscribe()
    reset = breaker.reset(now=1.0)
    assert reset is not None and reset.reason == "reset"
    assert len(seen) == 1
    assert breaker.state(now=1.0) == "closed"


def test_a_failing_listener_neither_breaks_the_call_nor_hides_the_change(
        caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker("p", failure_threshold=1)
    seen: list[str] = []

    def broken(t: BreakerTransition) -> None:
        raise RuntimeError("subscriber down")

    breaker.on_change(broken)
    breaker.on_change(lambda t: seen.append(t.to_state))
    with caplog.at_level(logging.ERROR, logger="tollway.breaker"):
        assert breaker.record_failure(now=0.0) is not None
    assert seen == ["open"]
    assert "listener" in caplog.text and "subscriber down" in caplog.text


def test_a_listener_may_call_back_into_the_breaker() -> None:
    breaker = CircuitBreaker("p", failure_threshold=1)
    seen: list[tuple[str, str]] = []

    def listener(t: BreakerTransition) -> None:
        seen.append((t.to_state, breaker.state(now=t.at + 100.0)))

    breaker.on_change(listener)
    breaker.record_failure(now=0.0)
    # The callback itself moved the breaker to half-open; that transition
    # is delivered after the one being handled, not inside it.
    assert seen == [("open", "half_open"), ("half_open", "half_open")]


def test_defaults_agree_everywhere() -> None:
    # The binding's literal defaults, Rust's BreakerConfig::DEFAULT (used by
    # the Rust tests) and the reference model's must be the same numbers.
    assert _core.CircuitBreaker().config() == ref.BREAKER_DEFAULTS
    assert CircuitBreaker("p").options == ref.BREAKER_DEFAULTS


def test_options_and_validation() -> None:
    breaker = CircuitBreaker("p", window_s=30.0)
    assert breaker.options["window_s"] == 30.0
    assert breaker.options["failure_threshold"] == 5
    assert "closed" in repr(breaker)
    with pytest.raises(ValueError, match="failure_rate"):
        CircuitBreaker("p", failure_rate=1.5)
    with pytest.raises(ValueError, match="window_s"):
        CircuitBreaker("p", window_s=0.0)
    with pytest.raises(TypeError):
        CircuitBreaker("p", bogus=1)  # type: ignore[call-arg]


def test_now_defaults_to_the_monotonic_clock() -> None:
    breaker = CircuitBreaker("p", failure_threshold=1, recovery_s=100.0, max_recovery_s=100.0)
    before = time.monotonic()
    opened = breaker.record_failure()
    after = time.monotonic()
    assert opened is not None and before - 0.01 <= opened.at <= after + 0.01
    assert breaker.retry_after(now=opened.at + 40.0) == pytest.approx(60.0)


def test_module_examples_hold() -> None:
    assert doctest.testmod(tollway.breaker).failed == 0


def test_threads_get_at_most_the_probe_permits() -> None:
    breaker = CircuitBreaker("p", failure_threshold=1, half_open_max_calls=3)
    breaker.record_failure(now=0.0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        granted = sum(pool.map(lambda _: sum(breaker.allow(now=30.0) for _ in range(500)),
                               range(8)))
    assert granted == 3


def test_listeners_see_every_transition_once_and_in_order_under_threads() -> None:
    breaker = CircuitBreaker("p", failure_threshold=2, recovery_s=0.01, max_recovery_s=0.01,
                             healthy_reset_s=0.0)
    seen: list[BreakerTransition] = []
    lock = threading.Lock()

    def listener(t: BreakerTransition) -> None:
        with lock:
            seen.append(t)

    breaker.on_change(listener)
    clock = iter(range(10**9))
    clock_lock = threading.Lock()

    def tick() -> float:
        with clock_lock:
            return next(clock) * 0.001

    def worker(seed: int) -> None:
        for i in range(2000):
            if breaker.allow(now=tick()):
                if (i * 7 + seed) % 3:
                    breaker.record_failure(now=tick())
                else:
                    breaker.record_success(now=tick())

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(worker, range(4)))
    breaker.state(now=tick())  # delivers anything still queued
    assert len(seen) > 10
    snap = breaker.snapshot(now=tick())
    assert snap.dropped_transitions == 0
    assert snap.opens == sum(t.to_state == "open" for t in seen)
    for prev, nxt in itertools.pairwise(seen):
        assert prev.to_state == nxt.from_state
        assert (nxt.from_state, nxt.to_state) in LEGAL


def test_a_stalled_listener_holds_callers_back_instead_of_losing_transitions() -> None:
    # The deliverer stalls inside a listener (it lets go of the GIL, as one that
    # publishes would) while another thread causes far more transitions than the
    # core's queue holds (1024). They must wait for it, not push the oldest out.
    breaker = CircuitBreaker("p", failure_threshold=1, recovery_s=0.001, max_recovery_s=0.001,
                             healthy_reset_s=0.0)
    seen: list[BreakerTransition] = []
    go = threading.Event()

    def listener(t: BreakerTransition) -> None:
        seen.append(t)
        go.wait(10)

    breaker.on_change(listener)
    first = threading.Thread(target=breaker.record_failure, kwargs={"now": 0.0})
    first.start()  # delivers closed -> open, then stalls in the listener
    while not seen:
        time.sleep(0.001)

    def flap() -> None:  # each round: open -> half_open -> closed -> open
        for i in range(1, 1000):
            now = i * 0.01
            if breaker.allow(now=now):
                breaker.record_success(now=now)
            breaker.record_failure(now=now + 0.001)

    other = threading.Thread(target=flap)
    other.start()
    other.join(0.5)  # old behaviour: done at once, having overflowed the queue
    go.set()
    other.join()
    first.join()
    breaker.state(now=100.0)
    snap = breaker.snapshot(now=100.0)
    assert snap.dropped_transitions == 0
    assert len(seen) > 1024
    assert snap.opens == sum(t.to_state == "open" for t in seen)
    for prev, nxt in itertools.pairwise(seen):
        assert prev.to_state == nxt.from_state


# --- the state machine against the reference model ---------------------------

# Small thresholds and timeouts, so a few dozen steps go around the cycle
# (open, probe, close, stay healthy, re-open) several times.
configs = st.fixed_dictionaries({
    "failure_threshold": st.integers(1, 3),
    "window_s": st.sampled_from([5.0, 60.0]),
    "recovery_s": st.sampled_from([0.5, 2.0]),
    "recovery_multiplier": st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    "max_recovery_s": st.sampled_from([4.0, 300.0]),
    "half_open_max_calls": st.integers(1, 3),
    "success_threshold": st.integers(1, 2),
    "slow_call_s": st.sampled_from([None, 1.0]),
    "probe_timeout_s": st.sampled_from([1.0, 60.0]),
    "healthy_reset_s": st.sampled_from([0.0, 3.0, 60.0]),
    "failure_rate": st.sampled_from([None, None, 0.5, 1.0]),
    "min_calls": st.integers(1, 4),
})


def _snapshot(raw: _core.BreakerSnapshot) -> dict[str, Any]:
    return {name: getattr(raw, name) for name in (
        "state", "failures", "calls", "opens", "consecutive_opens", "recovery_timeout",
        "retry_after", "probes_in_flight", "dropped_transitions")}


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 500.0
        self.rust: _core.CircuitBreaker | None = None
        self.model: Any = None
        self.state = "closed"

    @initialize(config=configs)
    def make(self, config: dict[str, Any]) -> None:
        self.rust = _core.CircuitBreaker(**config)
        self.model = ref.CircuitBreaker(**config)

    @property
    def r(self) -> _core.CircuitBreaker:
        assert self.rust is not None
        return self.rust

    @rule(dt=st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.floats(0.0, 10.0),
                       st.floats(0.0, 100.0)))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule()
    def allow(self) -> None:
        assert self.r.allow(self.now) == self.model.allow(self.now)

    @rule(duration=st.sampled_from([0.0, 0.5, 1.0, 5.0]))
    def success(self, duration: float) -> None:
        assert self.r.record_success(self.now, duration) == \
            self.model.record_success(self.now, duration)

    @rule()
    def failure(self) -> None:
        assert self.r.record_failure(self.now) == self.model.record_failure(self.now)

    @rule(ok=st.booleans(), duration=st.sampled_from([0.0, 5.0]))
    def call(self, ok: bool, duration: float) -> None:
        """What a caller does: ask, and record the outcome if let through."""
        allowed = self.r.allow(self.now)
        assert allowed == self.model.allow(self.now)
        if allowed and ok:
            self.success(duration)
        elif allowed:
            self.failure()

    @rule(roll=st.integers(0, 9))
    def reset(self, roll: int) -> None:
        # Rarely: a reset wipes the history the other rules build up.
        if roll == 0:
            assert self.r.reset(self.now) == self.model.reset(self.now)

    @invariant()
    def observations_agree(self) -> None:
        if self.rust is None:
            return
        assert self.r.state(self.now) == self.model.state(self.now)
        assert self.r.retry_after(self.now) == self.model.retry_after(self.now)
        assert _snapshot(self.r.snapshot(self.now)) == self.model.snapshot(self.now)

    @invariant()
    def transitions_agree_and_are_legal(self) -> None:
        if self.rust is None:
            return
        got = self.r.drain_transitions()
        assert got == self.model.drain_transitions()
        for frm, to, at, reason in got:
            assert frm == self.state, got
            assert (frm, to) in LEGAL or (reason == "reset" and to == "closed")
            assert at <= self.now
            self.state = to
        assert self.r.pending_transitions == 0


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                            deadline=None)
TestBreakerMachine = BreakerMachine.TestCase
