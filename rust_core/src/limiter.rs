//! Multi-tier token-bucket rate limiter.
//!
//! Every key (tenant) has one bucket per tier: requests per minute, per hour
//! and per day, expensive operations per hour, and tokens per minute. A
//! bucket holds `limit` units and refills continuously at `limit / period`
//! per second. The state stored per tier is the amount *used* (0 = full), so
//! a key that was never seen and a key whose buckets have all refilled look
//! the same: that is what lets idle keys be evicted without changing any
//! answer.
//!
//! Memory: a key costs one 80-byte slab entry (the key is stored inline up
//! to 22 bytes) plus 5 bytes in a `HashTable<u32>` index; limits live in a
//! few shared, interned profiles and each entry holds only a `u32` id.
//!
//! Time is passed in (`now`, seconds on a monotonic clock); a `now` older
//! than a key's last update (threads racing) is treated as "no time passed".

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::{DefaultHashBuilder, HashTable};

/// Number of tiers each key has.
pub const TIER_COUNT: usize = 5;

/// Headroom, as a fraction of a tier's limit, that float rounding may use:
/// without it, a retry made exactly `retry_after` seconds later could be
/// refused by a rounding error of 1e-15 tokens.
const TOLERANCE: f64 = 1e-9;

/// Entries examined by the incremental sweep on each check. A check inserts
/// at most one entry, so with two the sweep outruns growth: a full pass over
/// a shard (which reclaims every idle entry) ends before the shard can
/// triple, and checks of known keys keep it going with no growth at all.
const SWEEP_PER_CHECK: usize = 2;

/// Longest key stored without a heap allocation.
const INLINE_KEY: usize = 22;

/// One rate-limit tier. The discriminant is the index into per-tier arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    PerMinute = 0,
    PerHour = 1,
    PerDay = 2,
    ExpensivePerHour = 3,
    TokensPerMinute = 4,
}

impl Tier {
    pub const ALL: [Tier; TIER_COUNT] = [
        Tier::PerMinute,
        Tier::PerHour,
        Tier::PerDay,
        Tier::ExpensivePerHour,
        Tier::TokensPerMinute,
    ];

    /// The name used in configuration (`[[tenants]] limits`) and in Python.
    pub const fn name(self) -> &'static str {
        match self {
            Tier::PerMinute => "per_minute",
            Tier::PerHour => "per_hour",
            Tier::PerDay => "per_day",
            Tier::ExpensivePerHour => "expensive_per_hour",
            Tier::TokensPerMinute => "tokens_per_minute",
        }
    }

    /// Seconds in which an empty bucket refills completely.
    pub const fn period_s(self) -> f64 {
        match self {
            Tier::PerMinute | Tier::TokensPerMinute => 60.0,
            Tier::PerHour | Tier::ExpensivePerHour => 3600.0,
            Tier::PerDay => 86400.0,
        }
    }

    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == name)
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Per-tier limits of one key. 0 disables a tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limits {
    pub per_minute: u64,
    pub per_hour: u64,
    pub per_day: u64,
    pub expensive_per_hour: u64,
    pub tokens_per_minute: u64,
}

impl Limits {
    /// The product defaults (DESIGN.md): 60/min, 1000/h, 10000/day,
    /// 10 expensive/h, no tokens tier.
    pub const DEFAULT: Limits = Limits {
        per_minute: 60,
        per_hour: 1000,
        per_day: 10_000,
        expensive_per_hour: 10,
        tokens_per_minute: 0,
    };

    /// Every tier disabled: admits everything.
    pub const UNLIMITED: Limits = Limits {
        per_minute: 0,
        per_hour: 0,
        per_day: 0,
        expensive_per_hour: 0,
        tokens_per_minute: 0,
    };

    pub const fn get(&self, tier: Tier) -> u64 {
        match tier {
            Tier::PerMinute => self.per_minute,
            Tier::PerHour => self.per_hour,
            Tier::PerDay => self.per_day,
            Tier::ExpensivePerHour => self.expensive_per_hour,
            Tier::TokensPerMinute => self.tokens_per_minute,
        }
    }

    /// A copy with one tier's limit replaced.
    pub const fn with(mut self, tier: Tier, limit: u64) -> Limits {
        match tier {
            Tier::PerMinute => self.per_minute = limit,
            Tier::PerHour => self.per_hour = limit,
            Tier::PerDay => self.per_day = limit,
            Tier::ExpensivePerHour => self.expensive_per_hour = limit,
            Tier::TokensPerMinute => self.tokens_per_minute = limit,
        }
        self
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// What one check consumes: `requests` units from each request tier (and
/// from the expensive tier when `expensive`), `tokens` from the tokens tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cost {
    pub requests: u64,
    pub expensive: bool,
    pub tokens: u64,
}

impl Cost {
    pub const ONE: Cost = Cost {
        requests: 1,
        expensive: false,
        tokens: 0,
    };

    pub const fn requests(n: u64) -> Cost {
        Cost {
            requests: n,
            expensive: false,
            tokens: 0,
        }
    }

    pub const fn expensive(mut self) -> Cost {
        self.expensive = true;
        self
    }

    pub const fn with_tokens(mut self, tokens: u64) -> Cost {
        self.tokens = tokens;
        self
    }

    fn amounts(&self) -> [f64; TIER_COUNT] {
        let r = self.requests as f64;
        [r, r, r, if self.expensive { r } else { 0.0 }, self.tokens as f64]
    }
}

impl Default for Cost {
    fn default() -> Self {
        Cost::ONE
    }
}

/// Limits turned into the floats the hot path uses; `cap == 0.0` means the
/// tier is disabled (its rate is 0 too).
#[derive(Clone, Copy, Debug)]
struct Profile {
    limits: Limits,
    cap: [f64; TIER_COUNT],
    rate: [f64; TIER_COUNT],
}

impl Profile {
    fn new(limits: Limits) -> Profile {
        let mut cap = [0.0; TIER_COUNT];
        let mut rate = [0.0; TIER_COUNT];
        for tier in Tier::ALL {
            let limit = limits.get(tier) as f64;
            cap[tier.index()] = limit;
            rate[tier.index()] = limit / tier.period_s();
        }
        Profile { limits, cap, rate }
    }
}

/// Limit, remaining and reset of one tier, as the `x-ratelimit-*` headers
/// report them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierStatus {
    pub tier: Tier,
    pub limit: u64,
    /// Whole units that could be consumed right now.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_s: f64,
}

/// The answer to a check (or a non-consuming status query).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Seconds until every denying tier would admit the same cost; 0 when
    /// allowed, infinite when the cost exceeds a tier's whole limit.
    pub retry_after: f64,
    denied: u8,
    limits: Limits,
    used: [f64; TIER_COUNT],
    rate: [f64; TIER_COUNT],
}

impl Decision {
    /// The tiers that refused this cost (empty when allowed).
    pub fn denied_by(&self) -> impl Iterator<Item = Tier> + '_ {
        Tier::ALL
            .into_iter()
            .filter(move |t| self.denied & (1 << t.index()) != 0)
    }

    /// The state of one tier after this check; `None` when it is disabled.
    pub fn tier(&self, tier: Tier) -> Option<TierStatus> {
        let limit = self.limits.get(tier);
        if limit == 0 {
            return None;
        }
        let i = tier.index();
        let cap = limit as f64;
        let left = cap - self.used[i];
        let remaining = if left <= 0.0 {
            0
        } else {
            (left + cap * TOLERANCE).floor() as u64
        };
        let reset_s = if self.used[i] > 0.0 {
            self.used[i] / self.rate[i]
        } else {
            0.0
        };
        Some(TierStatus {
            tier,
            limit,
            remaining,
            reset_s,
        })
    }

    /// Every enabled tier, in `Tier::ALL` order.
    pub fn tiers(&self) -> impl Iterator<Item = TierStatus> + '_ {
        Tier::ALL.into_iter().filter_map(move |t| self.tier(t))
    }

    /// The limits that applied to this key.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// A key stored without a heap allocation when it is short (the common case:
/// tenant ids), so a million keys cost no million small allocations.
#[derive(Clone, Debug)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(key: &[u8]) -> Key {
        if key.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Heap(b) => b,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    key: Key,
    profile: u32,
    last: f64,
    used: [f64; TIER_COUNT],
}

/// Refills `used` from `last` up to `now` at the profile's rates.
#[inline]
fn refill(used: &mut [f64; TIER_COUNT], last: &mut f64, p: &Profile, now: f64) {
    let elapsed = now - *last;
    if elapsed > 0.0 {
        for (u, rate) in used.iter_mut().zip(p.rate) {
            *u = (*u - elapsed * rate).max(0.0);
        }
        *last = now;
    }
}

/// True when every bucket of the entry is full at `now`, i.e. the entry is
/// indistinguishable from a key never seen.
fn is_idle(entry: &Entry, p: &Profile, now: f64) -> bool {
    let elapsed = (now - entry.last).max(0.0);
    (0..TIER_COUNT).all(|i| entry.used[i] - elapsed * p.rate[i] <= 0.0)
}

/// The all-or-nothing check on one entry's (already refilled) state; with
/// `consume`, an admitted cost is taken from every tier.
#[inline]
fn evaluate(used: &mut [f64; TIER_COUNT], p: &Profile, cost: &Cost, consume: bool) -> Decision {
    let amounts = cost.amounts();
    let mut denied = 0u8;
    let mut retry_after = 0.0f64;
    for i in 0..TIER_COUNT {
        let (cap, amount) = (p.cap[i], amounts[i]);
        if cap == 0.0 || amount == 0.0 {
            continue;
        }
        let excess = used[i] + amount - cap;
        if excess > cap * TOLERANCE {
            denied |= 1 << i;
            let wait = if amount > cap {
                f64::INFINITY
            } else {
                excess / p.rate[i]
            };
            retry_after = retry_after.max(wait);
        }
    }
    let allowed = denied == 0;
    if allowed && consume {
        for i in 0..TIER_COUNT {
            if p.cap[i] != 0.0 {
                used[i] += amounts[i];
            }
        }
    }
    Decision {
        allowed,
        retry_after,
        denied,
        limits: p.limits,
        used: *used,
        rate: p.rate,
    }
}

struct Shard {
    /// Maps a key's hash to its position in `entries`.
    index: HashTable<u32>,
    entries: Vec<Entry>,
    /// A copy of the limiter's profile list (few, rarely changed), so a check
    /// takes only its shard's lock.
    profiles: Vec<Profile>,
    /// Per-key limits outlive the key's bucket state: eviction must not
    /// forget them.
    overrides: HashMap<Box<[u8]>, u32>,
    /// Position of the incremental idle sweep.
    cursor: usize,
    hasher: DefaultHashBuilder,
}

impl Shard {
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let entries = &self.entries;
        self.index
            .find(hash, |&i| entries[i as usize].key.as_bytes() == key)
            .map(|&i| i as usize)
    }

    fn insert(&mut self, hash: u64, key: &[u8], now: f64) -> usize {
        let profile = if self.overrides.is_empty() {
            0
        } else {
            self.overrides.get(key).copied().unwrap_or(0)
        };
        let pos = self.entries.len();
        self.entries.push(Entry {
            key: Key::new(key),
            profile,
            last: now,
            used: [0.0; TIER_COUNT],
        });
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(hash, pos as u32, |&i| {
            hasher.hash_one(entries[i as usize].key.as_bytes())
        });
        pos
    }

    /// Removes the entry at `pos`; the last entry moves into its place.
    fn remove_at(&mut self, pos: usize) {
        let hash = self.hasher.hash_one(self.entries[pos].key.as_bytes());
        if let Ok(slot) = self.index.find_entry(hash, |&i| i as usize == pos) {
            slot.remove();
        }
        let last = self.entries.len() - 1;
        self.entries.swap_remove(pos);
        if pos != last {
            let hash = self.hasher.hash_one(self.entries[pos].key.as_bytes());
            if let Some(slot) = self.index.find_mut(hash, |&i| i as usize == last) {
                *slot = pos as u32;
            }
        }
    }

    fn idle_at(&self, pos: usize, now: f64) -> bool {
        let entry = &self.entries[pos];
        is_idle(entry, &self.profiles[entry.profile as usize], now)
    }

    /// Examines up to `budget` entries from the cursor, evicting idle ones.
    fn sweep(&mut self, now: f64, budget: usize) {
        for _ in 0..budget {
            if self.entries.is_empty() {
                return;
            }
            if self.cursor >= self.entries.len() {
                self.cursor = 0;
            }
            if self.idle_at(self.cursor, now) {
                self.remove_at(self.cursor);
            } else {
                self.cursor += 1;
            }
        }
    }

    fn evict_all_idle(&mut self, now: f64) -> usize {
        let before = self.entries.len();
        let mut pos = 0;
        while pos < self.entries.len() {
            if self.idle_at(pos, now) {
                self.remove_at(pos);
            } else {
                pos += 1;
            }
        }
        let len = self.entries.len();
        // Give memory back after a large idle wave, keeping room to regrow.
        if self.entries.capacity() > 64 && self.entries.capacity() > 4 * len {
            self.entries.shrink_to(2 * len);
            let (entries, hasher) = (&self.entries, &self.hasher);
            self.index.shrink_to(2 * len, |&i| {
                hasher.hash_one(entries[i as usize].key.as_bytes())
            });
        }
        before - len
    }

    /// Moves an existing entry to another profile: its buckets are refilled
    /// at the old rates up to `now` first, and the tiers the new profile
    /// disables are emptied (so a later re-enable starts from full, as a
    /// new key would).
    fn switch_profile(&mut self, pos: usize, profile: u32, now: f64) {
        let old = self.profiles[self.entries[pos].profile as usize];
        let new = self.profiles[profile as usize];
        let entry = &mut self.entries[pos];
        refill(&mut entry.used, &mut entry.last, &old, now);
        for i in 0..TIER_COUNT {
            if new.cap[i] == 0.0 {
                entry.used[i] = 0.0;
            }
        }
        entry.profile = profile;
    }
}

/// Cache-line aligned so neighbouring shard locks don't share a line.
#[repr(align(128))]
struct Padded<T>(T);

/// The interned limit profiles. Id 0 is the default (mutable); every other
/// id is an immutable override shared by all keys with the same limits.
struct Registry {
    profiles: Vec<Limits>,
    interned: HashMap<Limits, u32>,
}

/// A sharded multi-tier rate limiter, safe to share between threads.
pub struct RateLimiter {
    shards: Box<[Padded<Mutex<Shard>>]>,
    shard_mask: usize,
    hasher: DefaultHashBuilder,
    registry: Mutex<Registry>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path panics while holding a lock, and the state is valid
    // between statements anyway: a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RateLimiter {
    pub const DEFAULT_SHARDS: usize = 64;

    pub fn new(default: Limits) -> RateLimiter {
        RateLimiter::with_shards(default, RateLimiter::DEFAULT_SHARDS)
    }

    /// `shards` is rounded up to a power of two, between 1 and 4096.
    pub fn with_shards(default: Limits, shards: usize) -> RateLimiter {
        let n = shards.clamp(1, 4096).next_power_of_two();
        let hasher = DefaultHashBuilder::default();
        let shards = (0..n)
            .map(|_| {
                Padded(Mutex::new(Shard {
                    index: HashTable::new(),
                    entries: Vec::new(),
                    profiles: vec![Profile::new(default)],
                    overrides: HashMap::new(),
                    cursor: 0,
                    hasher: hasher.clone(),
                }))
            })
            .collect();
        RateLimiter {
            shards,
            shard_mask: n - 1,
            hasher,
            registry: Mutex::new(Registry {
                profiles: vec![default],
                interned: HashMap::new(),
            }),
        }
    }

    fn locate(&self, key: &[u8]) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        // hashbrown uses the low bits (bucket) and the top 7 (tag) of the
        // hash; the shard takes bits from the middle so neither loses entropy.
        let shard = (hash >> 32) as usize & self.shard_mask;
        (hash, lock(&self.shards[shard].0))
    }

    /// Checks and, when every tier admits it, consumes `cost` for `key`.
    pub fn check(&self, key: &str, cost: Cost, now: f64) -> Decision {
        let key = key.as_bytes();
        let (hash, mut guard) = self.locate(key);
        let shard = &mut *guard;
        let pos = match shard.find(hash, key) {
            Some(pos) => pos,
            None => shard.insert(hash, key, now),
        };
        let entry = &mut shard.entries[pos];
        let profile = &shard.profiles[entry.profile as usize];
        refill(&mut entry.used, &mut entry.last, profile, now);
        let decision = evaluate(&mut entry.used, profile, &cost, true);
        shard.sweep(now, SWEEP_PER_CHECK);
        decision
    }

    /// Whether `check` would admit `cost`, without consuming or storing
    /// anything; the tiers report the current state.
    pub fn status(&self, key: &str, cost: Cost, now: f64) -> Decision {
        let key = key.as_bytes();
        let (hash, shard) = self.locate(key);
        let (mut used, mut last, profile) = match shard.find(hash, key) {
            Some(pos) => {
                let e = &shard.entries[pos];
                (e.used, e.last, e.profile)
            }
            None => {
                let profile = shard.overrides.get(key).copied().unwrap_or(0);
                ([0.0; TIER_COUNT], now, profile)
            }
        };
        let profile = &shard.profiles[profile as usize];
        refill(&mut used, &mut last, profile, now);
        evaluate(&mut used, profile, &cost, false)
    }

    /// The limits that apply to `key`.
    pub fn limits(&self, key: &str) -> Limits {
        let key = key.as_bytes();
        let (_, shard) = self.locate(key);
        let id = shard.overrides.get(key).copied().unwrap_or(0);
        shard.profiles[id as usize].limits
    }

    pub fn default_limits(&self) -> Limits {
        lock(&self.registry).profiles[0]
    }

    /// Gives `key` its own limits (`None`: back to the default). Its buckets
    /// keep what they have used; remaining is then measured against the new
    /// limits.
    pub fn set_limits(&self, key: &str, limits: Option<Limits>, now: f64) {
        let id = match limits {
            Some(limits) => self.intern(limits),
            None => 0,
        };
        let key = key.as_bytes();
        let (hash, mut shard) = self.locate(key);
        if let Some(pos) = shard.find(hash, key) {
            shard.switch_profile(pos, id, now);
        }
        if id == 0 {
            shard.overrides.remove(key);
        } else {
            shard.overrides.insert(key.into(), id);
        }
    }

    /// Changes the limits of every key without an override. O(keys): every
    /// affected bucket is refilled at the old rates up to `now` first.
    pub fn set_default_limits(&self, limits: Limits, now: f64) {
        let mut registry = lock(&self.registry);
        registry.profiles[0] = limits;
        let profile = Profile::new(limits);
        for shard in self.shards.iter() {
            let mut shard = lock(&shard.0);
            let old = shard.profiles[0];
            shard.profiles[0] = profile;
            for entry in shard.entries.iter_mut().filter(|e| e.profile == 0) {
                refill(&mut entry.used, &mut entry.last, &old, now);
                for i in 0..TIER_COUNT {
                    if profile.cap[i] == 0.0 {
                        entry.used[i] = 0.0;
                    }
                }
            }
        }
    }

    /// The id of an override profile with these limits, adding it to every
    /// shard if it is new. Lock order: registry, then shards.
    fn intern(&self, limits: Limits) -> u32 {
        let mut registry = lock(&self.registry);
        if let Some(&id) = registry.interned.get(&limits) {
            return id;
        }
        let id = u32::try_from(registry.profiles.len()).expect("fewer than 2^32 distinct limits");
        registry.profiles.push(limits);
        registry.interned.insert(limits, id);
        let profile = Profile::new(limits);
        for shard in self.shards.iter() {
            lock(&shard.0).profiles.push(profile);
        }
        id
    }

    /// Drops every key whose buckets are all full at `now`; returns how many.
    pub fn evict_idle(&self, now: f64) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(&shard.0).evict_all_idle(now))
            .sum()
    }

    /// Keys currently holding state (idle keys not yet evicted included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.0).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(Limits::DEFAULT)
    }
}

#[cfg(test)]
#[path = "limiter_tests.rs"]
mod tests;
