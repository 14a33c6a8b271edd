//! Token buckets (GCRA: one timestamp per bucket, refilled continuously)
//! and concurrency slots, in memory, sharded so that no lock is global.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proxy::ctx::IdentityId;

/// A bucket: what it limits (a tier or a route, by name) and for whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub scope: Scope,
    pub identity: IdentityId,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Tier(Arc<str>),
    Route(Arc<str>),
    TierTokens(Arc<str>),
    RouteTokens(Arc<str>),
}

/// The outcome of taking from a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket's capacity (the per-minute figure).
    pub limit: u64,
    /// Whole units left after this decision.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When refused: until the request would fit.
    pub retry_after: Duration,
}

impl Decision {
    /// How long until `cost` units fit in the bucket as this decision
    /// left it (zero when they fit now).
    pub fn wait_for(&self, cost: u64) -> Duration {
        let interval = WINDOW.as_nanos() as u64 / self.limit.max(1);
        let needed = Duration::from_nanos(interval.saturating_mul(cost));
        (self.reset + needed).saturating_sub(WINDOW)
    }
}

const SHARDS: usize = 64;
/// The period of every per-minute limit.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Buckets and slots of one process.
pub struct MemoryLimiter {
    hasher: RandomState,
    buckets: Vec<Mutex<Buckets>>,
    slots: Vec<Mutex<HashMap<BucketKey, u64>>>,
    epoch: Instant,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        MemoryLimiter {
            hasher: RandomState::new(),
            buckets: (0..SHARDS)
                .map(|_| Mutex::new(Buckets::default()))
                .collect(),
            slots: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: Instant::now(),
        }
    }
}

impl MemoryLimiter {
    fn shard(&self, key: &BucketKey) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Takes `cost` units from a bucket of `per_minute` capacity, refilled
    /// continuously (GCRA), if they fit.
    pub fn take(&self, key: &BucketKey, per_minute: u64, cost: u64, now: Instant) -> Decision {
        let per_minute = per_minute.max(1);
        // ns per unit; at least 1 so that absurdly high limits stay defined.
        let interval = (WINDOW.as_nanos() as u64 / per_minute).max(1);
        let window = WINDOW.as_nanos() as u64;
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let Ok(mut shard) = self.buckets[self.shard(key)].lock() else {
            // A poisoned shard must not turn into refusals for everyone.
            return Decision {
                allowed: true,
                limit: per_minute,
                remaining: per_minute,
                reset: Duration::ZERO,
                retry_after: Duration::ZERO,
            };
        };
        let decide = |tat: u64| {
            let new_tat = tat.saturating_add(interval.saturating_mul(cost));
            let ahead = new_tat - now_ns;
            if ahead > window {
                let used = tat - now_ns;
                let refused = Decision {
                    allowed: false,
                    limit: per_minute,
                    remaining: (window.saturating_sub(used)) / interval,
                    reset: Duration::from_nanos(used),
                    retry_after: Duration::from_nanos(ahead - window),
                };
                return (refused, None);
            }
            let allowed = Decision {
                allowed: true,
                limit: per_minute,
                remaining: (window - ahead) / interval,
                reset: Duration::from_nanos(ahead),
                retry_after: Duration::ZERO,
            };
            (allowed, Some(new_tat))
        };
        // A bucket in use is updated in place: one lookup, no key cloned.
        if let Some(tat) = shard.tats.get_mut(key) {
            let (decision, taken) = decide((*tat).max(now_ns));
            if let Some(new_tat) = taken {
                *tat = new_tat;
            }
            return decision;
        }
        shard.sweep_if_due(now_ns);
        let (decision, taken) = decide(now_ns);
        if let Some(new_tat) = taken {
            shard.tats.insert(key.clone(), new_tat);
        }
        decision
    }

    /// Settles a reservation: adds `delta` units to a bucket whatever its
    /// level (usage beyond the estimate is charged after the fact), or
    /// gives units back when `delta` is negative.
    pub fn adjust(&self, key: &BucketKey, per_minute: u64, delta: i64, now: Instant) {
        let interval = (WINDOW.as_nanos() as u64 / per_minute.max(1)).max(1);
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let Ok(mut shard) = self.buckets[self.shard(key)].lock() else {
            return;
        };
        let change = interval.saturating_mul(delta.unsigned_abs());
        match shard.tats.get_mut(key) {
            Some(tat) => {
                let base = (*tat).max(now_ns);
                *tat = if delta >= 0 {
                    base.saturating_add(change)
                } else {
                    base.saturating_sub(change).max(now_ns)
                };
            }
            // Swept as full since it was taken from: it still owes what
            // the usage went beyond its reservation.
            None if delta > 0 => {
                shard
                    .tats
                    .insert(key.clone(), now_ns.saturating_add(change));
            }
            None => {}
        }
    }

    /// One of `max` concurrent slots, held until the returned guard drops.
    pub fn acquire(self: &Arc<Self>, key: &BucketKey, max: u64) -> Option<MemorySlot> {
        let Ok(mut shard) = self.slots[self.shard(key)].lock() else {
            return None;
        };
        let held = shard.entry(key.clone()).or_insert(0);
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(MemorySlot {
            limiter: self.clone(),
            key: key.clone(),
        })
    }

    fn release(&self, key: &BucketKey) {
        if let Ok(mut shard) = self.slots[self.shard(key)].lock()
            && let Some(held) = shard.get_mut(key)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                shard.remove(key);
            }
        }
    }
}

/// One shard's buckets: per bucket its theoretical arrival time, in ns
/// since the limiter's epoch.
#[derive(Default)]
struct Buckets {
    tats: HashMap<BucketKey, u64>,
    /// The size at which full buckets are next swept out.
    sweep_at: usize,
}

/// Buckets a shard holds before its first sweep.
const SWEEP_FLOOR: usize = 1024;

impl Buckets {
    /// Drops buckets that are full again (their time has passed), which
    /// are the same as absent ones: anonymous callers are keyed by address,
    /// so without this every address ever seen would stay in memory. Run
    /// when the shard has doubled since the last sweep: amortized O(1).
    fn sweep_if_due(&mut self, now_ns: u64) {
        if self.tats.len() < self.sweep_at.max(SWEEP_FLOOR) {
            return;
        }
        self.tats.retain(|_, tat| *tat > now_ns);
        self.sweep_at = self.tats.len().saturating_mul(2);
    }
}

/// A held concurrency slot; dropping it (response ended, client gone)
/// frees it.
pub struct MemorySlot {
    limiter: Arc<MemoryLimiter>,
    key: BucketKey,
}

impl std::fmt::Debug for MemorySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySlot")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for MemorySlot {
    fn drop(&mut self) {
        self.limiter.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_buckets_are_swept_out() {
        let l = MemoryLimiter::default();
        let t0 = Instant::now();
        let many = SHARDS * SWEEP_FLOOR * 2;
        for i in 0..many {
            assert!(l.take(&key(&format!("ip-{i}")), 60, 1, t0).allowed);
        }
        let count = |l: &MemoryLimiter| -> usize {
            l.buckets.iter().map(|b| b.lock().unwrap().tats.len()).sum()
        };
        assert_eq!(count(&l), many, "nothing is full yet: nothing swept");
        // A minute on, every one of them is full again: new callers sweep
        // them out, shard by shard.
        let later = t0 + WINDOW;
        for i in 0..many {
            assert!(l.take(&key(&format!("new-{i}")), 60, 1, later).allowed);
        }
        assert!(count(&l) < many + many / 2, "{} buckets kept", count(&l));
        // A swept bucket is a full one: its caller has its whole minute.
        for _ in 0..60 {
            assert!(l.take(&key("ip-0"), 60, 1, later).allowed);
        }
        assert!(!l.take(&key("ip-0"), 60, 1, later).allowed);
    }

    #[test]
    fn a_peek_says_how_long_until_units_fit() {
        let l = MemoryLimiter::default();
        let now = Instant::now();
        let peek = |at| l.take(&key("p"), 4, 0, at);
        assert_eq!(peek(now).wait_for(1), Duration::ZERO);
        for _ in 0..4 {
            assert!(l.take(&key("p"), 4, 1, now).allowed);
        }
        // Empty: one unit comes back every 15 s.
        assert_eq!(peek(now).wait_for(1), Duration::from_secs(15));
        assert_eq!(peek(now).wait_for(3), Duration::from_secs(45));
        let later = now + Duration::from_secs(10);
        assert_eq!(peek(later).wait_for(1), Duration::from_secs(5));
        assert_eq!(
            l.take(&key("p"), 4, 1, now).retry_after,
            peek(now).wait_for(1)
        );
    }

    fn key(id: &str) -> BucketKey {
        BucketKey {
            scope: Scope::Tier("free".into()),
            identity: IdentityId::Key(id.into()),
        }
    }

    #[test]
    fn bucket_allows_its_capacity_then_refills_continuously() {
        let l = MemoryLimiter::default();
        let t0 = Instant::now();
        for i in 0..5 {
            let d = l.take(&key("a"), 5, 1, t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let refused = l.take(&key("a"), 5, 1, t0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(12));
        // Another identity has its own bucket.
        assert!(l.take(&key("b"), 5, 1, t0).allowed);
        // One unit comes back every 12 s.
        assert!(
            l.take(&key("a"), 5, 1, t0 + Duration::from_secs(12))
                .allowed
        );
        assert!(
            !l.take(&key("a"), 5, 1, t0 + Duration::from_secs(12))
                .allowed
        );
    }

    #[test]
    fn huge_limits_do_not_divide_by_zero() {
        let l = MemoryLimiter::default();
        let d = l.take(&key("a"), u64::MAX, 1, Instant::now());
        assert!(d.allowed);
        l.adjust(&key("a"), u64::MAX, -5, Instant::now());
    }

    #[test]
    fn slots_are_returned_on_drop() {
        let l = Arc::new(MemoryLimiter::default());
        let a = l.acquire(&key("a"), 2).unwrap();
        let _b = l.acquire(&key("a"), 2).unwrap();
        assert!(l.acquire(&key("a"), 2).is_none());
        drop(a);
        assert!(l.acquire(&key("a"), 2).is_some());
    }
}
