//! Tests of the rate limiter; time is injected, so all are deterministic.

use super::*;

const T0: f64 = 1000.0;

fn only(tier: Tier, limit: u64) -> Limits {
    Limits::UNLIMITED.with(tier, limit)
}

/// Admits `cost` repeatedly at one instant; returns how many were admitted.
fn burst(l: &RateLimiter, key: &str, cost: Cost, now: f64, tries: usize) -> usize {
    (0..tries).filter(|_| l.check(key, cost, now).allowed).count()
}

/// A small deterministic generator so the randomised tests need no crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn layout_stays_compact() {
    assert_eq!(std::mem::size_of::<Key>(), 24);
    assert!(std::mem::size_of::<Entry>() <= 80);
}

#[test]
fn each_tier_admits_exactly_its_limit_from_full() {
    for tier in Tier::ALL {
        let l = RateLimiter::new(only(tier, 7));
        let cost = match tier {
            Tier::ExpensivePerHour => Cost::ONE.expensive(),
            Tier::TokensPerMinute => Cost::requests(0).with_tokens(1),
            _ => Cost::ONE,
        };
        assert_eq!(burst(&l, "k", cost, T0, 20), 7, "{tier:?}");
        let d = l.check("k", cost, T0);
        assert!(!d.allowed);
        assert_eq!(d.denied_by().collect::<Vec<_>>(), vec![tier]);
        // One unit comes back after period / limit seconds, not before.
        let unit = tier.period_s() / 7.0;
        assert!(!l.check("k", cost, T0 + unit * 0.999).allowed, "{tier:?}");
        assert!(l.check("k", cost, T0 + unit).allowed, "{tier:?}");
        assert!(!l.check("k", cost, T0 + unit).allowed, "{tier:?}");
    }
}

#[test]
fn default_limits_follow_the_design() {
    let l = RateLimiter::default();
    assert_eq!(l.default_limits(), Limits::DEFAULT);
    assert_eq!(burst(&l, "t", Cost::ONE, T0, 100), 60);
    let d = l.status("t", Cost::ONE, T0);
    let names: Vec<_> = d.tiers().map(|s| s.tier.name()).collect();
    assert_eq!(
        names,
        ["per_minute", "per_hour", "per_day", "expensive_per_hour"]
    );
    let hour = d.tier(Tier::PerHour).unwrap();
    assert_eq!((hour.limit, hour.remaining), (1000, 940));
    assert!(d.tier(Tier::TokensPerMinute).is_none());
}

#[test]
fn a_denial_consumes_nothing_on_any_tier() {
    let limits = Limits {
        per_minute: 10,
        per_hour: 100,
        per_day: 0,
        expensive_per_hour: 2,
        tokens_per_minute: 1000,
    };
    let l = RateLimiter::new(limits);
    let exp = Cost::ONE.expensive().with_tokens(100);
    assert!(l.check("k", exp, T0).allowed);
    assert!(l.check("k", exp, T0).allowed);
    let before = l.status("k", Cost::ONE, T0);
    let d = l.check("k", exp, T0);
    assert!(!d.allowed);
    assert_eq!(
        d.denied_by().collect::<Vec<_>>(),
        vec![Tier::ExpensivePerHour]
    );
    let after = l.status("k", Cost::ONE, T0);
    assert_eq!(before, after);
    assert_eq!(after.tier(Tier::PerMinute).unwrap().remaining, 8);
    assert_eq!(after.tier(Tier::TokensPerMinute).unwrap().remaining, 800);
    // Cheap calls still pass: the expensive tier is not in their way.
    assert_eq!(burst(&l, "k", Cost::ONE.with_tokens(100), T0, 20), 8);
}

#[test]
fn weighted_costs_consume_their_weight() {
    let l = RateLimiter::new(Limits {
        tokens_per_minute: 1000,
        ..Limits::DEFAULT
    });
    let d = l.check("k", Cost::requests(5).with_tokens(400), T0);
    assert!(d.allowed);
    assert_eq!(d.tier(Tier::PerMinute).unwrap().remaining, 55);
    assert_eq!(d.tier(Tier::PerDay).unwrap().remaining, 9995);
    assert_eq!(d.tier(Tier::ExpensivePerHour).unwrap().remaining, 10);
    assert_eq!(d.tier(Tier::TokensPerMinute).unwrap().remaining, 600);
    assert!(!l.check("k", Cost::ONE.with_tokens(601), T0).allowed);
    assert!(l.check("k", Cost::ONE.with_tokens(600), T0).allowed);
    let d = l.check("k", Cost::requests(3).expensive(), T0);
    assert_eq!(d.tier(Tier::ExpensivePerHour).unwrap().remaining, 7);
    assert_eq!(d.tier(Tier::PerMinute).unwrap().remaining, 51);
}

#[test]
fn retry_after_is_exact() {
    let l = RateLimiter::new(only(Tier::PerMinute, 60));
    assert_eq!(burst(&l, "k", Cost::ONE, T0, 60), 60);
    let d = l.check("k", Cost::requests(3), T0);
    assert!(!d.allowed);
    assert!((d.retry_after - 3.0).abs() < 1e-9, "{}", d.retry_after);
    assert!(!l.check("k", Cost::requests(3), T0 + d.retry_after - 1e-6).allowed);
    assert!(l.check("k", Cost::requests(3), T0 + d.retry_after).allowed);
}

#[test]
fn retry_after_waits_for_the_slowest_denying_tier() {
    let l = RateLimiter::new(Limits {
        per_minute: 2,
        per_hour: 3,
        ..Limits::UNLIMITED
    });
    assert_eq!(burst(&l, "k", Cost::ONE, T0, 5), 2);
    // Minute tier frees one unit in 30 s; hour tier (1 left) admits 1 now.
    let d = l.status("k", Cost::ONE, T0);
    assert_eq!(d.denied_by().collect::<Vec<_>>(), vec![Tier::PerMinute]);
    assert!((d.retry_after - 30.0).abs() < 1e-9);
    let d = l.status("k", Cost::requests(2), T0);
    assert_eq!(
        d.denied_by().collect::<Vec<_>>(),
        vec![Tier::PerMinute, Tier::PerHour]
    );
    // Hour tier needs 1 more unit: 1200 s; minute tier needs 60 s.
    assert!((d.retry_after - 1200.0).abs() < 1e-6, "{}", d.retry_after);
    assert!(!l.check("k", Cost::requests(2), T0 + 1199.0).allowed);
    assert!(l.check("k", Cost::requests(2), T0 + 1200.0).allowed);
}

#[test]
fn a_cost_above_the_limit_is_never_admitted() {
    let l = RateLimiter::new(Limits {
        tokens_per_minute: 100,
        ..Limits::DEFAULT
    });
    let d = l.check("k", Cost::ONE.with_tokens(101), T0);
    assert!(!d.allowed);
    assert!(d.retry_after.is_infinite());
    assert_eq!(l.status("k", Cost::ONE, T0).tier(Tier::PerMinute).unwrap().remaining, 60);
}

#[test]
fn reset_and_remaining_track_continuous_refill() {
    let l = RateLimiter::new(only(Tier::PerHour, 3600));
    let d = l.check("k", Cost::requests(1800), T0);
    let s = d.tier(Tier::PerHour).unwrap();
    assert_eq!(s.remaining, 1800);
    assert!((s.reset_s - 1800.0).abs() < 1e-9);
    let s = l.status("k", Cost::ONE, T0 + 600.5).tier(Tier::PerHour).unwrap();
    assert_eq!(s.remaining, 2400);
    assert!((s.reset_s - 1199.5).abs() < 1e-9);
    let s = l.status("k", Cost::ONE, T0 + 5000.0).tier(Tier::PerHour).unwrap();
    assert_eq!((s.remaining, s.reset_s), (3600, 0.0));
}

#[test]
fn status_consumes_nothing_and_stores_nothing() {
    let l = RateLimiter::new(only(Tier::PerMinute, 1));
    for _ in 0..5 {
        assert!(l.status("k", Cost::ONE, T0).allowed);
    }
    assert_eq!(l.len(), 0);
    assert!(l.check("k", Cost::ONE, T0).allowed);
    assert!(!l.status("k", Cost::ONE, T0).allowed);
    assert_eq!(l.len(), 1);
}

#[test]
fn time_going_backwards_refills_nothing() {
    let l = RateLimiter::new(only(Tier::PerMinute, 2));
    assert_eq!(burst(&l, "k", Cost::ONE, T0 + 10.0, 3), 2);
    assert!(!l.check("k", Cost::ONE, T0).allowed);
    assert!(!l.check("k", Cost::ONE, T0 + 10.0).allowed);
    assert!(l.check("k", Cost::ONE, T0 + 40.0).allowed);
}

#[test]
fn disabled_tiers_admit_everything() {
    let l = RateLimiter::new(Limits::UNLIMITED);
    let d = l.check("k", Cost::requests(1 << 40).expensive().with_tokens(1 << 40), T0);
    assert!(d.allowed);
    assert_eq!(d.tiers().count(), 0);
}

#[test]
fn per_key_overrides_and_runtime_changes() {
    let l = RateLimiter::new(only(Tier::PerMinute, 2));
    l.set_limits("vip", Some(only(Tier::PerMinute, 5)), T0);
    assert_eq!(l.limits("vip"), only(Tier::PerMinute, 5));
    assert_eq!(l.limits("other"), only(Tier::PerMinute, 2));
    assert_eq!(burst(&l, "vip", Cost::ONE, T0, 10), 5);
    assert_eq!(burst(&l, "other", Cost::ONE, T0, 10), 2);

    // Raising the default frees the others at once. (Before time moves on:
    // a later check may sweep "other" away once its bucket has refilled.)
    l.set_default_limits(only(Tier::PerMinute, 4), T0);
    assert_eq!(burst(&l, "other", Cost::ONE, T0, 10), 2);

    // Lowering the limit keeps what was used: nothing left until it refills.
    l.set_limits("vip", Some(only(Tier::PerMinute, 3)), T0);
    let d = l.check("vip", Cost::ONE, T0);
    assert!(!d.allowed);
    assert_eq!(d.tier(Tier::PerMinute).unwrap().remaining, 0);
    // 5 used, refilling at 3/min: 1 unit fits after (5 - 3 + 1) / 3 min.
    assert!(!l.check("vip", Cost::ONE, T0 + 59.0).allowed);
    assert!(l.check("vip", Cost::ONE, T0 + 60.0).allowed);

    // Back to the default for vip.
    l.set_limits("vip", None, T0 + 60.0);
    assert_eq!(l.limits("vip"), only(Tier::PerMinute, 4));
    assert_eq!(burst(&l, "vip", Cost::ONE, T0 + 60.0, 10), 1);

    // Disabling a tier admits freely; re-enabling starts it full.
    l.set_limits("vip", Some(Limits::UNLIMITED), T0 + 60.0);
    assert_eq!(burst(&l, "vip", Cost::ONE, T0 + 60.0, 10), 10);
    l.set_limits("vip", Some(only(Tier::PerMinute, 4)), T0 + 60.0);
    assert_eq!(burst(&l, "vip", Cost::ONE, T0 + 60.0, 10), 4);
}

#[test]
fn a_change_refills_at_the_old_rate_up_to_the_change() {
    let l = RateLimiter::new(only(Tier::PerMinute, 60));
    assert_eq!(burst(&l, "k", Cost::ONE, T0, 60), 60);
    // 30 s at 1/s frees 30; then the rate drops to 0.1/s (6/min) and the
    // 30 still used exceed the new limit.
    l.set_limits("k", Some(only(Tier::PerMinute, 6)), T0 + 30.0);
    let s = l.status("k", Cost::ONE, T0 + 30.0).tier(Tier::PerMinute).unwrap();
    assert_eq!(s.remaining, 0);
    assert!((s.reset_s - 300.0).abs() < 1e-9, "{}", s.reset_s);
}

#[test]
fn overrides_survive_eviction() {
    let l = RateLimiter::new(only(Tier::PerMinute, 2));
    l.set_limits("vip", Some(only(Tier::PerMinute, 5)), T0);
    assert!(l.check("vip", Cost::ONE, T0).allowed);
    assert_eq!(l.evict_idle(T0 + 120.0), 1);
    assert_eq!(l.len(), 0);
    assert_eq!(burst(&l, "vip", Cost::ONE, T0 + 120.0, 10), 5);
}

#[test]
fn only_full_keys_are_evicted() {
    let l = RateLimiter::new(Limits::DEFAULT);
    for i in 0..100 {
        l.check(&format!("k{i}"), Cost::ONE, T0);
    }
    l.check("busy", Cost::requests(30), T0);
    assert_eq!(l.len(), 101);
    // One request takes 86400 / 10000 = 8.64 s to refill on the day tier.
    assert_eq!(l.evict_idle(T0 + 8.0), 0);
    assert_eq!(l.evict_idle(T0 + 8.65), 100);
    assert_eq!(l.len(), 1);
    assert_eq!(l.evict_idle(T0 + 30.0 * 8.64 - 0.01), 0);
    assert_eq!(l.evict_idle(T0 + 30.0 * 8.64 + 0.01), 1);
    assert!(l.is_empty());
}

#[test]
fn checks_sweep_idle_keys_as_they_go() {
    let l = RateLimiter::with_shards(Limits::DEFAULT, 4);
    for i in 0..10_000 {
        l.check(&format!("old-{i}"), Cost::ONE, T0);
    }
    assert_eq!(l.len(), 10_000);
    // A day later every old key is idle; new traffic alone reclaims them,
    // most during the first pass over the new keys, the rest during the
    // second (which inserts nothing).
    let later = T0 + 86_400.0;
    for pass in 0..2 {
        for i in 0..10_000 {
            let d = l.check(&format!("new-{i}"), Cost::ONE, later);
            assert_eq!(d.tier(Tier::PerMinute).unwrap().remaining, 59 - pass);
        }
        assert!(l.len() < 20_000, "{}", l.len());
    }
    assert_eq!(l.len(), 10_000);
    assert_eq!(l.evict_idle(later), 0);
}

#[test]
fn long_keys_work_like_short_ones() {
    let l = RateLimiter::new(only(Tier::PerMinute, 3));
    let long = "k".repeat(200);
    let almost = format!("{}x", "k".repeat(199));
    assert_eq!(burst(&l, &long, Cost::ONE, T0, 5), 3);
    assert_eq!(burst(&l, &almost, Cost::ONE, T0, 5), 3);
    assert_eq!(burst(&l, "", Cost::ONE, T0, 5), 3);
    assert_eq!(burst(&l, "ünïcödé-ключ", Cost::ONE, T0, 5), 3);
    assert_eq!(l.evict_idle(T0 + 60.0), 4);
}

/// Eviction must be invisible: the same random workload on a limiter that
/// evicts after every step and on one that never does gives equal answers.
#[test]
fn eviction_preserves_behaviour() {
    let limits = Limits {
        per_minute: 5,
        per_hour: 20,
        per_day: 50,
        expensive_per_hour: 3,
        tokens_per_minute: 300,
    };
    let keeper = RateLimiter::new(limits);
    let evictor = RateLimiter::with_shards(limits, 1);
    keeper.set_limits("k1", Some(only(Tier::PerMinute, 2)), T0);
    evictor.set_limits("k1", Some(only(Tier::PerMinute, 2)), T0);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut now = T0;
    let mut evicted = 0;
    for _ in 0..20_000 {
        now += match rng.below(4) {
            0 => 0.0,
            1 => rng.below(1000) as f64 / 100.0,
            2 => rng.below(600) as f64,
            _ => rng.below(20_000) as f64,
        };
        let key = format!("k{}", rng.below(4));
        let cost = Cost {
            requests: rng.below(3),
            expensive: rng.below(4) == 0,
            tokens: rng.below(120),
        };
        let a = keeper.check(&key, cost, now);
        let b = evictor.check(&key, cost, now);
        assert_eq!(a, b, "at {now} for {key} {cost:?}");
        evicted += evictor.evict_idle(now);
    }
    assert!(evicted > 1000, "the workload should make keys idle: {evicted}");
}

#[test]
fn admitted_cost_never_exceeds_the_bucket_bound() {
    // In any interval [t0, t1]: admitted <= limit + limit * (t1 - t0) / period.
    let limit = 10u64;
    let l = RateLimiter::new(only(Tier::PerMinute, limit));
    let mut rng = XorShift(42);
    let mut now = T0;
    let mut admitted: Vec<(f64, u64)> = Vec::new();
    for _ in 0..3000 {
        now += rng.below(3000) as f64 / 1000.0;
        let cost = 1 + rng.below(4);
        if l.check("k", Cost::requests(cost), now).allowed {
            admitted.push((now, cost));
        }
    }
    let rate = limit as f64 / 60.0;
    for i in 0..admitted.len() {
        let mut total = 0;
        for &(t, c) in &admitted[i..] {
            total += c;
            let bound = limit as f64 + rate * (t - admitted[i].0);
            assert!(total as f64 <= bound + 1e-6, "{total} > {bound}");
        }
    }
}

#[test]
fn concurrent_checks_never_admit_more_than_the_limit() {
    let l = RateLimiter::new(Limits {
        per_minute: 1000,
        per_hour: 1500,
        ..Limits::UNLIMITED
    });
    let admitted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (l, admitted) = (&l, &admitted);
            s.spawn(move || {
                for i in 0..2000 {
                    let cost = 1 + (i + t) % 3;
                    if l.check("shared", Cost::requests(cost), T0).allowed {
                        admitted.fetch_add(cost, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Other keys in the same shards keep the locks busy.
                    l.check(&format!("t{t}-{}", i % 50), Cost::ONE, T0);
                }
            });
        }
    });
    let total = admitted.into_inner();
    // Costs of 1 keep coming after the bucket is nearly empty, so it is
    // drained exactly, never beyond.
    assert_eq!(total, 1000);
    let d = l.status("shared", Cost::ONE, T0);
    assert_eq!(d.tier(Tier::PerMinute).unwrap().remaining, 1000 - total);
}

#[test]
fn tier_names_round_trip() {
    for tier in Tier::ALL {
        assert_eq!(Tier::from_name(tier.name()), Some(tier));
    }
    assert_eq!(Tier::from_name("per_week"), None);
}
