//! Circuit breaker for one provider or deployment.
//!
//! Closed: outcomes are recorded; when the failures within the monitoring
//! window reach the threshold (or, optionally, the failure rate over at
//! least `min_calls` calls reaches `failure_rate`) it opens. Open: every call
//! is refused until the recovery timeout has passed; the timeout grows by
//! `recovery_multiplier` on each consecutive re-open up to `max_recovery_s`,
//! and falls back to `recovery_s` once the breaker has stayed closed for
//! `healthy_reset_s` (Envoy's outlier detection works alike). Half-open: up
//! to `half_open_max_calls` probes may be in flight; `success_threshold`
//! probe successes close it, one probe failure re-opens it. A probe whose
//! outcome never arrives (the caller was cancelled) stops counting after
//! `probe_timeout_s`, so the breaker cannot wedge. Slow calls
//! (`duration >= slow_call_s`) count as failures.
//!
//! State changes are computed lazily from `now` (no timers), returned by the
//! call that caused them and queued for `drain_transitions`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Buckets of the sliding window that counts calls for the failure-rate rule
/// (so that rule, unlike the exact count rule, moves in steps of
/// `window_s / WINDOW_BUCKETS`).
const WINDOW_BUCKETS: usize = 60;

/// Transitions kept for `drain_transitions` when nobody drains them.
const MAX_QUEUED_TRANSITIONS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// Why a transition happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Failures in the window reached `failure_threshold`.
    FailureThreshold,
    /// The failure rate reached `failure_rate` over at least `min_calls`.
    FailureRate,
    /// The recovery timeout passed: probes may go through.
    RecoveryElapsed,
    ProbeSucceeded,
    ProbeFailed,
    /// `reset` was called (an operator's decision).
    Reset,
    /// Another gateway process's breaker for the same provider changed
    /// (`force_open` / `force_close`); not news to publish again.
    Peer,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::FailureThreshold => "failure_threshold",
            Reason::FailureRate => "failure_rate",
            Reason::RecoveryElapsed => "recovery_elapsed",
            Reason::ProbeSucceeded => "probe_succeeded",
            Reason::ProbeFailed => "probe_failed",
            Reason::Reset => "reset",
            Reason::Peer => "peer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// When it happened logically: for open -> half-open that is the end of
    /// the recovery timeout, even if it was noticed later.
    pub at: f64,
    pub reason: Reason,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Failures within `window_s` that open the breaker; 0 disables the rule.
    pub failure_threshold: u32,
    pub window_s: f64,
    /// Optional failure-rate rule (0 < rate <= 1), evaluated once the window
    /// holds at least `min_calls` calls.
    pub failure_rate: Option<f64>,
    pub min_calls: u32,
    pub recovery_s: f64,
    pub recovery_multiplier: f64,
    pub max_recovery_s: f64,
    pub half_open_max_calls: u32,
    pub success_threshold: u32,
    pub slow_call_s: Option<f64>,
    pub probe_timeout_s: f64,
    pub healthy_reset_s: f64,
}

impl BreakerConfig {
    /// The product defaults (DESIGN.md): 5 failures in 60 s open it, 30 s
    /// later one probe goes through.
    pub const DEFAULT: BreakerConfig = BreakerConfig {
        failure_threshold: 5,
        window_s: 60.0,
        failure_rate: None,
        min_calls: 20,
        recovery_s: 30.0,
        recovery_multiplier: 2.0,
        max_recovery_s: 300.0,
        half_open_max_calls: 1,
        success_threshold: 1,
        slow_call_s: None,
        probe_timeout_s: 60.0,
        healthy_reset_s: 60.0,
    };
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig::DEFAULT
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ConfigError(format!("{name} must be a positive number, got {v}")))
            }
        };
        positive("window_s", self.window_s)?;
        positive("recovery_s", self.recovery_s)?;
        positive("max_recovery_s", self.max_recovery_s)?;
        positive("probe_timeout_s", self.probe_timeout_s)?;
        if !(self.healthy_reset_s.is_finite() && self.healthy_reset_s >= 0.0) {
            return Err(ConfigError("healthy_reset_s must be >= 0".into()));
        }
        if !(self.recovery_multiplier.is_finite() && self.recovery_multiplier >= 1.0) {
            return Err(ConfigError("recovery_multiplier must be >= 1".into()));
        }
        if self.max_recovery_s < self.recovery_s {
            return Err(ConfigError("max_recovery_s must be >= recovery_s".into()));
        }
        if let Some(rate) = self.failure_rate {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(ConfigError(format!("failure_rate must be in (0, 1], got {rate}")));
            }
            if self.min_calls == 0 {
                return Err(ConfigError("min_calls must be >= 1".into()));
            }
        } else if self.failure_threshold == 0 {
            return Err(ConfigError(
                "failure_threshold 0 needs a failure_rate rule, or nothing would open it".into(),
            ));
        }
        if let Some(slow) = self.slow_call_s {
            positive("slow_call_s", slow)?;
        }
        if self.half_open_max_calls == 0 || self.success_threshold == 0 {
            return Err(ConfigError(
                "half_open_max_calls and success_threshold must be >= 1".into(),
            ));
        }
        Ok(())
    }

    /// The recovery timeout of the `streak`-th consecutive open (from 1).
    fn recovery_for(&self, streak: u32) -> f64 {
        let growth = self.recovery_multiplier.powi(streak.saturating_sub(1).min(1024) as i32);
        (self.recovery_s * growth).min(self.max_recovery_s)
    }
}

/// What `snapshot` reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub state: State,
    /// Failures within the window (0 while open or half-open: the window
    /// restarts when the breaker closes).
    pub failures: u32,
    /// Calls within the window, as the bucketed failure-rate rule sees them.
    pub calls: u32,
    /// Times the breaker has opened, ever.
    pub opens: u64,
    /// Opens in a row without a healthy close in between.
    pub consecutive_opens: u32,
    /// The recovery timeout in force (open, half-open), or the one the next
    /// open would get (closed).
    pub recovery_timeout_s: f64,
    pub retry_after_s: f64,
    pub probes_in_flight: u32,
    /// Transitions dropped because nobody drained the queue.
    pub dropped_transitions: u64,
}

#[derive(Clone, Debug)]
enum Phase {
    Closed { since: f64 },
    Open { until: f64 },
    HalfOpen { successes: u32, permits: VecDeque<f64> },
}

/// Calls and failures per time bucket, for the failure-rate rule.
#[derive(Clone, Debug)]
struct Window {
    width: f64,
    slots: [(i64, u32, u32); WINDOW_BUCKETS],
}

impl Window {
    fn new(window_s: f64) -> Window {
        Window {
            width: window_s / WINDOW_BUCKETS as f64,
            slots: [(i64::MIN, 0, 0); WINDOW_BUCKETS],
        }
    }

    fn epoch(&self, now: f64) -> i64 {
        (now / self.width).floor() as i64
    }

    fn add(&mut self, now: f64, failed: bool) {
        let epoch = self.epoch(now);
        let slot = &mut self.slots[epoch.rem_euclid(WINDOW_BUCKETS as i64) as usize];
        if slot.0 != epoch {
            if slot.0 > epoch {
                // An outcome older than the window (threads racing): drop it.
                return;
            }
            *slot = (epoch, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u32::from(failed);
    }

    /// (calls, failures) in the buckets covering the last `window_s`.
    fn totals(&self, now: f64) -> (u32, u32) {
        let epoch = self.epoch(now);
        let oldest = epoch - WINDOW_BUCKETS as i64;
        self.slots
            .iter()
            .filter(|s| s.0 > oldest && s.0 <= epoch)
            .fold((0, 0), |(c, f), s| (c + s.1, f + s.2))
    }

    fn clear(&mut self) {
        self.slots = [(i64::MIN, 0, 0); WINDOW_BUCKETS];
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Times of the failures in the window, for the exact count rule; never
    /// more than `failure_threshold` of them while closed.
    failures: VecDeque<f64>,
    window: Window,
    opens: u64,
    streak: u32,
    timeout: f64,
    transitions: VecDeque<Transition>,
    dropped: u64,
}

/// A circuit breaker, safe to share between threads.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// Queued transitions, readable without the lock so a caller can check
    /// for news cheaply after every call.
    pending: AtomicUsize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(BreakerConfig::default()).expect("the defaults are valid")
    }
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Result<CircuitBreaker, ConfigError> {
        config.validate()?;
        Ok(CircuitBreaker {
            config,
            inner: Mutex::new(Inner {
                phase: Phase::Closed {
                    since: f64::NEG_INFINITY,
                },
                failures: VecDeque::new(),
                window: Window::new(config.window_s),
                opens: 0,
                streak: 0,
                timeout: config.recovery_s,
                transitions: VecDeque::new(),
                dropped: 0,
            }),
            pending: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held; a poisoned lock is still
        // consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a call may go through now. When half-open this takes one of
    /// the probe permits, which the call's outcome gives back.
    pub fn allow(&self, now: f64) -> bool {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        let ok = match &mut inner.phase {
            Phase::Closed { .. } => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen { permits, .. } => {
                if permits.len() < self.config.half_open_max_calls as usize {
                    permits.push_back(now);
                    true
                } else {
                    false
                }
            }
        };
        self.publish(&inner);
        ok
    }

    /// Records a successful call that took `duration_s`; a slow one counts
    /// as a failure. Returns the last transition this caused, if any.
    pub fn record_success(&self, now: f64, duration_s: f64) -> Option<Transition> {
        if self.config.slow_call_s.is_some_and(|slow| duration_s >= slow) {
            return self.record_failure(now);
        }
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        match &mut inner.phase {
            Phase::Closed { .. } => inner.window.add(now, false),
            Phase::Open { .. } => {}
            Phase::HalfOpen {
                successes, permits, ..
            } => {
                // Outcomes of calls let through before the breaker opened
                // carry no permit and say nothing about recovery.
                if permits.pop_front().is_some() {
                    *successes += 1;
                    if *successes >= self.config.success_threshold {
                        self.close(&mut inner, now, Reason::ProbeSucceeded, &mut last);
                    }
                }
            }
        }
        self.publish(&inner);
        last
    }

    /// Records a failed call. Returns the last transition this caused.
    pub fn record_failure(&self, now: f64) -> Option<Transition> {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        match &mut inner.phase {
            Phase::Closed { .. } => {
                inner.window.add(now, true);
                let threshold = self.config.failure_threshold as usize;
                if threshold > 0 {
                    inner.failures.push_back(now);
                    self.trim_failures(&mut inner, now);
                }
                if threshold > 0 && inner.failures.len() >= threshold {
                    self.open(&mut inner, now, Reason::FailureThreshold, &mut last);
                } else if let Some(rate) = self.config.failure_rate {
                    let (calls, failed) = inner.window.totals(now);
                    if calls >= self.config.min_calls && failed as f64 >= rate * calls as f64 {
                        self.open(&mut inner, now, Reason::FailureRate, &mut last);
                    }
                }
            }
            Phase::Open { .. } => {}
            Phase::HalfOpen { permits, .. } => {
                if permits.pop_front().is_some() {
                    self.open(&mut inner, now, Reason::ProbeFailed, &mut last);
                }
            }
        }
        self.publish(&inner);
        last
    }

    pub fn state(&self, now: f64) -> State {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        self.publish(&inner);
        phase_state(&inner.phase)
    }

    /// Seconds until a call (or probe) would be admitted; 0 when it would
    /// be now.
    pub fn retry_after(&self, now: f64) -> f64 {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        self.publish(&inner);
        self.retry_after_locked(&inner, now)
    }

    fn retry_after_locked(&self, inner: &Inner, now: f64) -> f64 {
        match &inner.phase {
            Phase::Closed { .. } => 0.0,
            Phase::Open { until } => (until - now).max(0.0),
            Phase::HalfOpen { permits, .. } => {
                if permits.len() < self.config.half_open_max_calls as usize {
                    0.0
                } else {
                    // The oldest permit expires first.
                    let oldest = permits.front().copied().unwrap_or(now);
                    (oldest + self.config.probe_timeout_s - now).max(0.0)
                }
            }
        }
    }

    pub fn snapshot(&self, now: f64) -> Snapshot {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        self.publish(&inner);
        if matches!(inner.phase, Phase::Closed { .. }) {
            self.trim_failures(&mut inner, now);
        }
        let (calls, window_failures) = inner.window.totals(now);
        let failures = if self.config.failure_threshold > 0 {
            inner.failures.len() as u32
        } else {
            window_failures
        };
        let (consecutive_opens, recovery_timeout_s, probes_in_flight) = match &inner.phase {
            Phase::Closed { since } => {
                let streak = self.streak_after_close(inner.streak, *since, now);
                (streak, self.config.recovery_for(streak + 1), 0)
            }
            Phase::Open { .. } => (inner.streak, inner.timeout, 0),
            Phase::HalfOpen { permits, .. } => (inner.streak, inner.timeout, permits.len() as u32),
        };
        Snapshot {
            state: phase_state(&inner.phase),
            failures,
            calls,
            opens: inner.opens,
            consecutive_opens,
            recovery_timeout_s,
            retry_after_s: self.retry_after_locked(&inner, now),
            probes_in_flight,
            dropped_transitions: inner.dropped,
        }
    }

    /// Closes the breaker and forgets its history (an operator's override).
    pub fn reset(&self, now: f64) -> Option<Transition> {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        if !matches!(inner.phase, Phase::Closed { .. }) {
            self.close(&mut inner, now, Reason::Reset, &mut last);
        }
        inner.streak = 0;
        inner.timeout = self.config.recovery_s;
        inner.failures.clear();
        inner.window.clear();
        self.publish(&inner);
        last
    }

    /// Opens the breaker for `open_for_s` from `now` because a peer's breaker
    /// for the same provider did (or, already open, moves the end of the
    /// open period to `now + open_for_s`: a peer's new cool-down, or a hold
    /// while a peer sends the fleet's one probe). A negative or non-finite
    /// `open_for_s` is taken as 0. Returns the transition when it was not
    /// open (reason `Peer`).
    pub fn force_open(&self, now: f64, open_for_s: f64) -> Option<Transition> {
        let open_for = if open_for_s.is_finite() { open_for_s.max(0.0) } else { 0.0 };
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        if !matches!(inner.phase, Phase::Open { .. }) {
            self.open(&mut inner, now, Reason::Peer, &mut last);
        }
        inner.timeout = open_for;
        inner.phase = Phase::Open {
            until: now + open_for,
        };
        self.publish(&inner);
        last
    }

    /// Closes the breaker because a peer's probe succeeded; unlike `reset`
    /// it keeps the streak of opens (a relapse waits longer). Returns the
    /// transition when it was not closed (reason `Peer`).
    pub fn force_close(&self, now: f64) -> Option<Transition> {
        let mut inner = self.lock();
        let mut last = None;
        self.advance(&mut inner, now, &mut last);
        if !matches!(inner.phase, Phase::Closed { .. }) {
            self.close(&mut inner, now, Reason::Peer, &mut last);
        }
        self.publish(&inner);
        last
    }

    /// Takes every queued transition, oldest first.
    pub fn drain_transitions(&self) -> Vec<Transition> {
        let mut inner = self.lock();
        let out = inner.transitions.drain(..).collect();
        self.publish(&inner);
        out
    }

    /// Transitions waiting in the queue (no lock taken).
    pub fn pending_transitions(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    fn publish(&self, inner: &Inner) {
        self.pending
            .store(inner.transitions.len(), Ordering::Release);
    }

    /// Applies what the passage of time alone does: open -> half-open after
    /// the recovery timeout, and expiry of abandoned probe permits.
    fn advance(&self, inner: &mut Inner, now: f64, last: &mut Option<Transition>) {
        if let Phase::Open { until } = inner.phase {
            if now >= until {
                inner.phase = Phase::HalfOpen {
                    successes: 0,
                    permits: VecDeque::new(),
                };
                self.push(inner, State::Open, State::HalfOpen, until, Reason::RecoveryElapsed, last);
            }
        }
        if let Phase::HalfOpen { permits, .. } = &mut inner.phase {
            let timeout = self.config.probe_timeout_s;
            while permits.front().is_some_and(|&t| now - t >= timeout) {
                permits.pop_front();
            }
        }
    }

    fn trim_failures(&self, inner: &mut Inner, now: f64) {
        let start = now - self.config.window_s;
        while inner.failures.front().is_some_and(|&t| t <= start) {
            inner.failures.pop_front();
        }
    }

    /// The streak a breaker closed since `since` has at `now`: healthy long
    /// enough, and the next open counts as the first again.
    fn streak_after_close(&self, streak: u32, since: f64, now: f64) -> u32 {
        if now - since >= self.config.healthy_reset_s {
            0
        } else {
            streak
        }
    }

    fn open(&self, inner: &mut Inner, now: f64, reason: Reason, last: &mut Option<Transition>) {
        let from = phase_state(&inner.phase);
        if let Phase::Closed { since } = inner.phase {
            inner.streak = self.streak_after_close(inner.streak, since, now);
        }
        inner.streak = inner.streak.saturating_add(1);
        inner.timeout = self.config.recovery_for(inner.streak);
        inner.opens += 1;
        inner.phase = Phase::Open {
            until: now + inner.timeout,
        };
        inner.failures.clear();
        inner.window.clear();
        self.push(inner, from, State::Open, now, reason, last);
    }

    fn close(&self, inner: &mut Inner, now: f64, reason: Reason, last: &mut Option<Transition>) {
        let from = phase_state(&inner.phase);
        inner.phase = Phase::Closed { since: now };
        inner.failures.clear();
        inner.window.clear();
        self.push(inner, from, State::Closed, now, reason, last);
    }

    fn push(
        &self,
        inner: &mut Inner,
        from: State,
        to: State,
        at: f64,
        reason: Reason,
        last: &mut Option<Transition>,
    ) {
        let t = Transition {
            from,
            to,
            at,
            reason,
        };
        if inner.transitions.len() >= MAX_QUEUED_TRANSITIONS {
            inner.transitions.pop_front();
            inner.dropped += 1;
        }
        inner.transitions.push_back(t);
        *last = Some(t);
    }
}

fn phase_state(phase: &Phase) -> State {
    match phase {
        Phase::Closed { .. } => State::Closed,
        Phase::Open { .. } => State::Open,
        Phase::HalfOpen { .. } => State::HalfOpen,
    }
}

#[cfg(test)]
#[path = "breaker_tests.rs"]
mod tests;
