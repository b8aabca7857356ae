//! Tests of the circuit breaker; time is injected, so all are deterministic.

use super::*;

const T0: f64 = 1000.0;

fn breaker(config: BreakerConfig) -> CircuitBreaker {
    CircuitBreaker::new(config).expect("valid config")
}

/// Opens a closed breaker at `now` with the default count rule.
fn trip(b: &CircuitBreaker, now: f64) -> Transition {
    let n = b.config().failure_threshold;
    for _ in 1..n {
        assert_eq!(b.record_failure(now), None);
    }
    b.record_failure(now).expect("the threshold failure opens it")
}

fn kinds(ts: &[Transition]) -> Vec<(State, State, Reason)> {
    ts.iter().map(|t| (t.from, t.to, t.reason)).collect()
}

#[test]
fn full_lifecycle_with_the_defaults() {
    let b = CircuitBreaker::default();
    assert_eq!(b.state(T0), State::Closed);
    assert!(b.allow(T0));
    for i in 0..4 {
        assert_eq!(b.record_failure(T0 + i as f64), None);
    }
    assert_eq!(b.snapshot(T0 + 4.0).failures, 4);
    let t = b.record_failure(T0 + 4.0).unwrap();
    assert_eq!(
        (t.from, t.to, t.at, t.reason),
        (State::Closed, State::Open, T0 + 4.0, Reason::FailureThreshold)
    );
    assert!(!b.allow(T0 + 5.0));
    assert_eq!(b.state(T0 + 5.0), State::Open);
    assert_eq!(b.retry_after(T0 + 5.0), 29.0);

    // 30 s after opening, one probe goes through; the next waits.
    assert!(!b.allow(T0 + 33.9));
    assert_eq!(b.state(T0 + 34.0), State::HalfOpen);
    assert_eq!(b.retry_after(T0 + 34.0), 0.0);
    assert!(b.allow(T0 + 34.0));
    assert!(!b.allow(T0 + 34.5));
    assert_eq!(b.snapshot(T0 + 34.5).probes_in_flight, 1);
    let t = b.record_success(T0 + 35.0, 1.0).unwrap();
    assert_eq!((t.from, t.to, t.reason), (State::HalfOpen, State::Closed, Reason::ProbeSucceeded));
    assert!(b.allow(T0 + 35.0));
    assert_eq!(b.snapshot(T0 + 35.0).failures, 0);

    assert_eq!(
        kinds(&b.drain_transitions()),
        vec![
            (State::Closed, State::Open, Reason::FailureThreshold),
            (State::Open, State::HalfOpen, Reason::RecoveryElapsed),
            (State::HalfOpen, State::Closed, Reason::ProbeSucceeded),
        ]
    );
    assert!(b.drain_transitions().is_empty());
}

#[test]
fn only_failures_inside_the_window_count() {
    let b = CircuitBreaker::default();
    for i in 0..4 {
        b.record_failure(T0 + 20.0 * i as f64);
    }
    // Failures at T0 .. T0+60; the one at T0 left the window at T0+60.
    assert_eq!(b.record_failure(T0 + 60.0), None);
    assert_eq!(b.snapshot(T0 + 60.0).failures, 4);
    let t = b.record_failure(T0 + 61.0).unwrap();
    assert_eq!(t.to, State::Open);
    // Successes do not erase failures under the count rule.
    let b = CircuitBreaker::default();
    for i in 0..5 {
        b.record_success(T0 + i as f64, 0.1);
        assert_eq!(b.state(T0 + i as f64), State::Closed);
        let t = b.record_failure(T0 + i as f64);
        assert_eq!(t.is_some(), i == 4);
    }
}

#[test]
fn the_open_transition_reports_its_logical_time() {
    let b = CircuitBreaker::default();
    trip(&b, T0);
    // Noticed late, still dated at the end of the recovery timeout.
    assert_eq!(b.state(T0 + 100.0), State::HalfOpen);
    let ts = b.drain_transitions();
    assert_eq!(ts[1].at, T0 + 30.0);
    assert_eq!(ts[1].reason, Reason::RecoveryElapsed);
}

#[test]
fn recovery_timeout_grows_on_reopens_up_to_the_cap() {
    let b = CircuitBreaker::default();
    let mut now = T0;
    trip(&b, now);
    let mut seen = vec![b.snapshot(now).recovery_timeout_s];
    for _ in 0..6 {
        now += b.retry_after(now);
        assert!(b.allow(now), "probe at {now}");
        let t = b.record_failure(now).unwrap();
        assert_eq!((t.from, t.to, t.reason), (State::HalfOpen, State::Open, Reason::ProbeFailed));
        seen.push(b.snapshot(now).recovery_timeout_s);
    }
    assert_eq!(seen, vec![30.0, 60.0, 120.0, 240.0, 300.0, 300.0, 300.0]);
    assert_eq!(b.snapshot(now).consecutive_opens, 7);
    assert_eq!(b.snapshot(now).opens, 7);
}

#[test]
fn the_timeout_resets_only_after_staying_closed_and_healthy() {
    let b = CircuitBreaker::default();
    trip(&b, T0);
    assert!(b.allow(T0 + 30.0));
    b.record_failure(T0 + 30.0); // re-open: 60 s
    assert!(b.allow(T0 + 90.0));
    b.record_success(T0 + 90.0, 0.0); // closed at T0+90, streak 2
    // Tripped again 59 s later: a consecutive open, 120 s.
    trip(&b, T0 + 149.0);
    assert_eq!(b.snapshot(T0 + 149.0).recovery_timeout_s, 120.0);
    assert_eq!(b.retry_after(T0 + 149.0), 120.0);
    assert!(b.allow(T0 + 269.0));
    b.record_success(T0 + 269.0, 0.0);
    // Closed for 60 s: healthy, the next open starts from 30 s again.
    let s = b.snapshot(T0 + 329.0);
    assert_eq!((s.consecutive_opens, s.recovery_timeout_s), (0, 30.0));
    trip(&b, T0 + 329.0);
    assert_eq!(b.retry_after(T0 + 329.0), 30.0);
    assert_eq!(b.snapshot(T0 + 329.0).consecutive_opens, 1);
}

#[test]
fn failure_rate_rule_needs_the_minimum_calls() {
    let b = breaker(BreakerConfig {
        failure_threshold: 0,
        failure_rate: Some(0.5),
        min_calls: 10,
        ..BreakerConfig::default()
    });
    // 9 straight failures: below the minimum, stays closed.
    for i in 0..9 {
        assert_eq!(b.record_failure(T0 + i as f64), None);
    }
    let s = b.snapshot(T0 + 9.0);
    assert_eq!((s.calls, s.failures), (9, 9));
    let t = b.record_failure(T0 + 9.0).unwrap();
    assert_eq!(t.reason, Reason::FailureRate);

    let b = breaker(BreakerConfig {
        failure_threshold: 0,
        failure_rate: Some(0.5),
        min_calls: 10,
        ..BreakerConfig::default()
    });
    for i in 0..6 {
        b.record_success(T0 + i as f64, 0.0);
    }
    for i in 0..4 {
        assert_eq!(b.record_failure(T0 + 6.0 + i as f64), None, "{i}");
    }
    // 10 calls, 4 failed: 40 %. Two more failures: 6 of 12, 50 %.
    assert_eq!(b.record_failure(T0 + 10.0), None);
    assert_eq!(b.record_failure(T0 + 11.0).unwrap().reason, Reason::FailureRate);
}

#[test]
fn failure_rate_forgets_calls_that_left_the_window() {
    let b = breaker(BreakerConfig {
        failure_threshold: 0,
        failure_rate: Some(0.5),
        min_calls: 4,
        ..BreakerConfig::default()
    });
    for _ in 0..3 {
        b.record_failure(T0);
    }
    assert_eq!(b.snapshot(T0 + 59.0).calls, 3);
    assert_eq!(b.snapshot(T0 + 60.0).calls, 0);
    assert_eq!(b.record_failure(T0 + 60.0), None);
}

#[test]
fn both_rules_together_open_on_whichever_comes_first() {
    let b = breaker(BreakerConfig {
        failure_threshold: 3,
        failure_rate: Some(0.9),
        min_calls: 2,
        ..BreakerConfig::default()
    });
    b.record_success(T0, 0.0);
    b.record_failure(T0);
    b.record_failure(T0);
    assert_eq!(b.record_failure(T0).unwrap().reason, Reason::FailureThreshold);
}

#[test]
fn slow_calls_count_as_failures() {
    let b = breaker(BreakerConfig {
        slow_call_s: Some(2.0),
        ..BreakerConfig::default()
    });
    for _ in 0..4 {
        assert_eq!(b.record_success(T0, 2.0), None);
    }
    b.record_success(T0, 1.99);
    assert_eq!(b.state(T0), State::Closed);
    assert_eq!(b.record_success(T0, 30.0).unwrap().reason, Reason::FailureThreshold);
    // A slow probe re-opens it.
    assert!(b.allow(T0 + 30.0));
    assert_eq!(b.record_success(T0 + 30.0, 5.0).unwrap().reason, Reason::ProbeFailed);
    // Without the option, duration does not matter.
    let b = CircuitBreaker::default();
    for _ in 0..10 {
        b.record_success(T0, 1e6);
    }
    assert_eq!(b.state(T0), State::Closed);
}

#[test]
fn half_open_admits_a_bounded_number_of_probes() {
    let b = breaker(BreakerConfig {
        half_open_max_calls: 2,
        success_threshold: 2,
        ..BreakerConfig::default()
    });
    trip(&b, T0);
    let t = T0 + 30.0;
    assert!(b.allow(t));
    assert!(b.allow(t));
    assert!(!b.allow(t));
    assert_eq!(b.record_success(t + 1.0, 0.0), None);
    assert_eq!(b.state(t + 1.0), State::HalfOpen);
    // The returned permit lets one more probe through.
    assert!(b.allow(t + 1.0));
    assert!(!b.allow(t + 1.0));
    let done = b.record_success(t + 2.0, 0.0).unwrap();
    assert_eq!(done.to, State::Closed);
    assert!(b.allow(t + 2.0) && b.allow(t + 2.0) && b.allow(t + 2.0));
}

#[test]
fn an_abandoned_probe_permit_expires() {
    let b = CircuitBreaker::default();
    trip(&b, T0);
    let t = T0 + 30.0;
    assert!(b.allow(t)); // the caller is cancelled and never records
    assert!(!b.allow(t + 59.0));
    assert_eq!(b.retry_after(t + 59.0), 1.0);
    assert!(b.allow(t + 60.0));
    assert_eq!(b.record_success(t + 61.0, 0.0).unwrap().to, State::Closed);
}

#[test]
fn outcomes_without_a_permit_are_ignored() {
    let b = CircuitBreaker::default();
    trip(&b, T0);
    // Calls let through before it opened finish while open: ignored.
    assert_eq!(b.record_success(T0 + 1.0, 0.0), None);
    assert_eq!(b.record_failure(T0 + 1.0), None);
    assert_eq!(b.snapshot(T0 + 1.0).opens, 1);
    // ...and while half-open without a probe out: ignored too.
    assert_eq!(b.state(T0 + 30.0), State::HalfOpen);
    assert_eq!(b.record_failure(T0 + 31.0), None);
    assert_eq!(b.record_success(T0 + 31.0, 0.0), None);
    assert_eq!(b.state(T0 + 31.0), State::HalfOpen);
}

#[test]
fn a_record_can_report_the_transition_time_made() {
    let b = CircuitBreaker::default();
    trip(&b, T0);
    // No probe out, so the failure itself is ignored, but the call noticed
    // the end of the recovery timeout.
    let t = b.record_failure(T0 + 40.0).unwrap();
    assert_eq!((t.to, t.at), (State::HalfOpen, T0 + 30.0));
}

#[test]
fn reset_closes_and_forgets() {
    let b = CircuitBreaker::default();
    trip(&b, T0);
    let t = b.reset(T0 + 1.0).unwrap();
    assert_eq!((t.from, t.to, t.reason), (State::Open, State::Closed, Reason::Reset));
    assert!(b.allow(T0 + 1.0));
    assert_eq!(b.reset(T0 + 2.0), None);
    trip(&b, T0 + 3.0);
    assert_eq!(b.retry_after(T0 + 3.0), 30.0);
}

#[test]
fn pending_count_follows_the_queue() {
    let b = CircuitBreaker::default();
    assert_eq!(b.pending_transitions(), 0);
    trip(&b, T0);
    assert_eq!(b.pending_transitions(), 1);
    b.state(T0 + 30.0);
    assert_eq!(b.pending_transitions(), 2);
    assert_eq!(b.drain_transitions().len(), 2);
    assert_eq!(b.pending_transitions(), 0);
}

#[test]
fn an_undrained_queue_stays_bounded() {
    let b = breaker(BreakerConfig {
        failure_threshold: 1,
        ..BreakerConfig::default()
    });
    let mut now = T0;
    for _ in 0..600 {
        b.record_failure(now); // closed -> open
        now += b.retry_after(now); // open -> half-open
        assert!(b.allow(now));
        b.record_success(now, 0.0); // half-open -> closed
    }
    assert_eq!(b.pending_transitions(), MAX_QUEUED_TRANSITIONS);
    assert_eq!(b.snapshot(now).dropped_transitions, 1800 - 1024);
    let ts = b.drain_transitions();
    assert_eq!(ts.last().unwrap().to, State::Closed);
}

#[test]
fn concurrent_probes_never_exceed_the_bound() {
    let b = breaker(BreakerConfig {
        half_open_max_calls: 3,
        ..BreakerConfig::default()
    });
    trip(&b, T0);
    let granted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..1000 {
                    if b.allow(T0 + 30.0) {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(granted.into_inner(), 3);
}

#[test]
fn invalid_configs_are_refused() {
    let bad = [
        BreakerConfig {
            window_s: 0.0,
            ..BreakerConfig::default()
        },
        BreakerConfig {
            failure_threshold: 0,
            ..BreakerConfig::default()
        },
        BreakerConfig {
            failure_rate: Some(1.5),
            ..BreakerConfig::default()
        },
        BreakerConfig {
            recovery_multiplier: 0.5,
            ..BreakerConfig::default()
        },
        BreakerConfig {
            max_recovery_s: 10.0,
            ..BreakerConfig::default()
        },
        BreakerConfig {
            half_open_max_calls: 0,
            ..BreakerConfig::default()
        },
        BreakerConfig {
            slow_call_s: Some(f64::NAN),
            ..BreakerConfig::default()
        },
    ];
    for config in bad {
        assert!(CircuitBreaker::new(config).is_err(), "{config:?}");
    }
}

#[test]
fn names_are_stable() {
    assert_eq!(State::HalfOpen.as_str(), "half_open");
    assert_eq!(Reason::FailureThreshold.as_str(), "failure_threshold");
}

#[test]
fn force_open_adopts_a_peers_open_and_its_cool_down() {
    let b = CircuitBreaker::default();
    let t = b.force_open(T0, 7.0).expect("closed -> open");
    assert_eq!((t.from, t.to, t.at, t.reason), (State::Closed, State::Open, T0, Reason::Peer));
    assert!(!b.allow(T0 + 6.9));
    assert_eq!(b.snapshot(T0).opens, 1);
    assert_eq!(b.snapshot(T0).recovery_timeout_s, 7.0);
    // Already open: the end moves (a hold while a peer probes), no transition.
    assert_eq!(b.force_open(T0 + 6.0, 10.0), None);
    assert_eq!(b.state(T0 + 15.9), State::Open);
    assert_eq!(b.snapshot(T0 + 15.9).opens, 1);
    assert!(b.allow(T0 + 16.0), "half-open after the new end: one probe");
    assert!(!b.allow(T0 + 16.0));
    // From half-open: back to open, and the probe's late outcome says nothing.
    let t = b.force_open(T0 + 16.5, 5.0).expect("half_open -> open");
    assert_eq!((t.from, t.to, t.reason), (State::HalfOpen, State::Open, Reason::Peer));
    assert_eq!(b.record_success(T0 + 16.6, 0.1), None);
    assert_eq!(b.state(T0 + 16.6), State::Open);
    // Bad lengths are taken as 0: open until now, then half-open.
    assert_eq!(b.force_open(T0 + 17.0, f64::NAN), None);
    assert_eq!(b.state(T0 + 17.0), State::HalfOpen);
}

#[test]
fn force_close_keeps_the_streak() {
    let b = CircuitBreaker::default();
    assert_eq!(b.force_close(T0), None, "closed already");
    trip(&b, T0);
    let t = b.force_close(T0 + 1.0).expect("open -> closed");
    assert_eq!((t.from, t.to, t.reason), (State::Open, State::Closed, Reason::Peer));
    assert!(b.allow(T0 + 1.0));
    // A relapse soon after waits twice as long: the streak was kept.
    let t = trip(&b, T0 + 2.0);
    assert_eq!(t.to, State::Open);
    assert_eq!(b.retry_after(T0 + 2.0), 60.0);
    assert_eq!(Reason::Peer.as_str(), "peer");
}
