//! Token buckets in this process's memory: `rate` tokens, refilled evenly
//! over the limit's unit.
//!
//! Each limit has its own buckets, named by [`BucketKey`] (a fixed-size
//! digest of the label values) and at most [`MAX_BUCKETS_PER_LIMIT`] of
//! them, so a client that sends a new value with every request cannot make
//! the gateway grow. A full bucket is the same as none: each take drops up
//! to two full buckets from the least recently used end, so idle buckets
//! go in small steps and no sweep ever walks them all, and at the cap a
//! new value takes the place of the least recently used bucket only if
//! that one is full. Otherwise the request counts against the limit's one
//! shared overflow bucket (`pingress_rate_limit_overflow_total`): evicting
//! a spent bucket would hand its client a fresh quota, so a flood of new
//! values must never be the way to reset one.
//!
//! A reload that keeps a limit (same domain, name, rate and unit) keeps
//! its buckets: they are shared by every snapshot that holds the limit.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus::IntCounter;

use super::limits::{BucketKey, Limit};
use super::Decision;
use crate::metrics::metrics;

/// Enough for every active client of a busy site; at about 100 bytes a
/// bucket, 10 MB per limit at most.
pub const MAX_BUCKETS_PER_LIMIT: usize = 100_000;

/// Requests for different buckets rarely share a lock, and each holds it
/// for a few arithmetic operations.
const SHARDS: usize = 16;

/// Full buckets dropped from the least recently used end per take.
const SWEEP_STEP: usize = 2;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The buckets of one limit.
pub(crate) struct LimitBuckets {
    rate: u64,
    capacity: f64,
    per_second: f64,
    shards: Box<[Mutex<LruCache<BucketKey, Bucket>>]>,
    /// Which shard a key goes to: keyed per process, so no client can aim
    /// its values at another client's shard.
    spread: RandomState,
    /// Every value that found no place at the cap, together.
    overflow: Mutex<Bucket>,
    overflowed: IntCounter,
}

/// Every live snapshot's buckets, by limit identity.
pub(crate) type LiveBuckets = Mutex<HashMap<String, Weak<LimitBuckets>>>;

/// The buckets of `limit`: those of the same limit in a live snapshot,
/// else new ones.
pub(crate) fn for_limit(limit: &Limit, live: &LiveBuckets) -> Arc<LimitBuckets> {
    let mut live = live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    live.retain(|_, weak| weak.strong_count() > 0);
    if let Some(found) = live.get(limit.identity()).and_then(Weak::upgrade) {
        return found;
    }
    let period = Duration::from_secs(limit.unit.seconds());
    let buckets = Arc::new(LimitBuckets::new(
        &limit.name,
        limit.rate,
        period,
        MAX_BUCKETS_PER_LIMIT,
    ));
    live.insert(limit.identity().to_string(), Arc::downgrade(&buckets));
    buckets
}

impl LimitBuckets {
    fn new(name: &str, rate: u64, period: Duration, max_buckets: usize) -> LimitBuckets {
        let capacity = rate as f64;
        let per_shard =
            NonZeroUsize::new(max_buckets.div_ceil(SHARDS)).unwrap_or(NonZeroUsize::MIN);
        LimitBuckets {
            rate,
            capacity,
            per_second: capacity / period.as_secs_f64().max(f64::MIN_POSITIVE),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            spread: RandomState::new(),
            overflow: Mutex::new(Bucket {
                tokens: capacity,
                updated: Instant::now(),
            }),
            overflowed: metrics().rate_limit_overflow(name),
        }
    }

    /// Takes a token from the bucket `key`.
    pub fn take(&self, key: BucketKey, now: Instant) -> Decision {
        let shard = &self.shards[self.spread.hash_one(key) as usize % SHARDS];
        let mut buckets = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A full bucket is the same as none.
        for _ in 0..SWEEP_STEP {
            match buckets.peek_lru() {
                Some((_, idle)) if self.refilled(idle, now) >= self.capacity => {
                    buckets.pop_lru();
                }
                _ => break,
            }
        }
        if buckets.len() == buckets.cap().get() && !buckets.contains(&key) {
            drop(buckets);
            self.overflowed.inc();
            let mut overflow = self
                .overflow
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            return self.spend(&mut overflow, now);
        }
        let bucket = buckets.get_or_insert_mut(key, || Bucket {
            tokens: self.capacity,
            updated: now,
        });
        self.spend(bucket, now)
    }

    /// Takes a token from `bucket`, if it has one.
    fn spend(&self, bucket: &mut Bucket, now: Instant) -> Decision {
        let mut tokens = self.refilled(bucket, now);
        let allowed = tokens >= 1.0;
        if allowed {
            tokens -= 1.0;
        }
        bucket.tokens = tokens;
        bucket.updated = now;
        Decision {
            allowed,
            limit: self.rate,
            remaining: tokens.floor() as u64,
            reset: seconds_until(self.capacity - tokens, self.per_second),
            retry_after: seconds_until(1.0 - tokens, self.per_second).max(1),
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.per_second).min(self.capacity)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|b| b.len()).unwrap_or(0))
            .sum()
    }
}

/// Whole seconds until `tokens` more have flowed in, rounded up.
fn seconds_until(tokens: f64, per_second: f64) -> u64 {
    if tokens <= 0.0 {
        0
    } else {
        (tokens / per_second).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> BucketKey {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        BucketKey(bytes)
    }

    #[test]
    fn a_bucket_allows_its_rate_then_refills_evenly() {
        let minute = Duration::from_secs(60);
        let buckets = LimitBuckets::new("test", 3, minute, 100);
        let t0 = Instant::now();
        for left in (0..3).rev() {
            let d = buckets.take(key(1), t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let denied = buckets.take(key(1), t0);
        assert!(!denied.allowed);
        assert_eq!((denied.limit, denied.remaining), (3, 0));
        // One token per 20 s.
        assert_eq!(denied.retry_after, 20);
        assert_eq!(denied.reset, 60);
        // Other keys have their own bucket.
        assert!(buckets.take(key(2), t0).allowed);
        let later = buckets.take(key(1), t0 + Duration::from_secs(20));
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
        assert!(!buckets.take(key(1), t0 + Duration::from_secs(21)).allowed);
    }

    #[test]
    fn at_the_cap_new_values_share_one_bucket_and_spent_ones_stay() {
        let day = Duration::from_secs(86_400);
        // One bucket per shard: at most SHARDS values are tracked.
        let buckets = LimitBuckets::new("cap", 1, day, SHARDS);
        let t0 = Instant::now();
        let mut tracked = Vec::new();
        let mut n = 0;
        while tracked.len() < SHARDS {
            // The first value of each shard.
            if buckets.take(key(n), t0).allowed && buckets.len() > tracked.len() {
                tracked.push(n);
            }
            n += 1;
        }
        // Every tracked value is spent, and stays spent: a flood of new
        // values cannot evict it and hand it a fresh quota.
        let overflowed = buckets.overflowed.get();
        for flood in 10_000..10_100 {
            buckets.take(key(flood), t0);
        }
        assert!(buckets.overflowed.get() >= overflowed + 100);
        for spent in &tracked {
            assert!(!buckets.take(key(*spent), t0).allowed, "{spent} was reset");
        }
        // The new values share the overflow bucket: one request passed.
        assert!(!buckets.take(key(20_000), t0).allowed);
        assert_eq!(buckets.len(), SHARDS);
        // A day on, full buckets make room again.
        let later = t0 + day;
        assert!(buckets.take(key(30_000), later).allowed);
    }

    #[test]
    fn full_buckets_go_in_small_steps() {
        let second = Duration::from_secs(1);
        let buckets = LimitBuckets::new("sweep", 10, second, 10_000);
        let t0 = Instant::now();
        for n in 0..100 {
            buckets.take(key(n), t0);
        }
        assert_eq!(buckets.len(), 100);
        // Two seconds on, every one of them has refilled; a take drops at
        // most two from the idle end of its shard, and adds its own.
        let later = t0 + Duration::from_secs(2);
        buckets.take(key(1000), later);
        assert!(buckets.len() >= 99, "{}", buckets.len());
        // Enough takes reach every shard a few times: the refilled ones
        // are all gone, the new ones stay.
        for n in 0..2000 {
            buckets.take(key(2000 + n), later);
        }
        assert_eq!(buckets.len(), 2001);
    }
}
