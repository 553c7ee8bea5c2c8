//! Token buckets in this process's memory: `rate` tokens, refilled evenly
//! over the limit's unit.
//!
//! Each limit has its own buckets, named by [`BucketKey`] (a fixed-size
//! digest of the label values) and at most [`MAX_BUCKETS_PER_LIMIT`] of
//! them: a client that sends a new value with every request makes the
//! least recently used bucket go, never the gateway grow
//! (`pingress_rate_limit_buckets_evicted_total` counts them). Each take
//! also drops up to two full buckets from the least recently used end, so
//! idle buckets go in small steps and no sweep ever walks them all.
//!
//! A reload that keeps a limit (same domain, name, rate and unit) keeps
//! its buckets: they are shared by every snapshot that holds the limit.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock, Weak};
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
    evicted: IntCounter,
}

/// The buckets of `limit`: those of the same limit in a live snapshot,
/// else new ones.
pub(crate) fn for_limit(limit: &Limit) -> Arc<LimitBuckets> {
    static LIVE: OnceLock<Mutex<HashMap<String, Weak<LimitBuckets>>>> = OnceLock::new();
    let mut live = LIVE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
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
            evicted: metrics().rate_limit_evictions(name),
        }
    }

    /// Takes a token from the bucket `key`.
    pub fn take(&self, key: BucketKey, now: Instant) -> Decision {
        let shard = &self.shards[usize::from(key.0[0]) % SHARDS];
        let mut buckets = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() == buckets.cap().get() && !buckets.contains(&key) {
            self.evicted.inc();
        }
        let bucket = buckets.get_or_insert_mut(key, || Bucket {
            tokens: self.capacity,
            updated: now,
        });
        let mut tokens = self.refilled(bucket, now);
        let allowed = tokens >= 1.0;
        if allowed {
            tokens -= 1.0;
        }
        bucket.tokens = tokens;
        bucket.updated = now;
        // A full bucket is the same as none.
        for _ in 0..SWEEP_STEP {
            match buckets.peek_lru() {
                Some((_, idle)) if self.refilled(idle, now) >= self.capacity => {
                    buckets.pop_lru();
                }
                _ => break,
            }
        }
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
    fn the_least_recently_used_bucket_goes_at_the_cap() {
        let day = Duration::from_secs(86_400);
        // One bucket per shard: keys 0 and 16 share shard 0.
        let buckets = LimitBuckets::new("cap", 1, day, SHARDS);
        let t0 = Instant::now();
        assert!(buckets.take(key(0), t0).allowed);
        assert!(!buckets.take(key(0), t0).allowed);
        let evicted = buckets.evicted.get();
        assert!(buckets.take(key(16), t0).allowed);
        assert_eq!(buckets.evicted.get(), evicted + 1);
        // Key 0 was evicted: it starts full again. That is the price of a
        // bound, and the metric shows when it is paid.
        assert!(buckets.take(key(0), t0).allowed);
        assert_eq!(buckets.len(), 1);
    }

    #[test]
    fn full_buckets_go_in_small_steps() {
        let second = Duration::from_secs(1);
        let buckets = LimitBuckets::new("sweep", 10, second, 1000);
        let t0 = Instant::now();
        for n in 0..100 {
            buckets.take(key(n), t0);
        }
        assert_eq!(buckets.len(), 100);
        // Two seconds on, every one of them has refilled; each take drops
        // at most two from the idle end of its shard.
        let later = t0 + Duration::from_secs(2);
        buckets.take(key(1000), later);
        let left = buckets.len();
        assert!((98..100).contains(&left), "{left}");
        for n in 0..200 {
            buckets.take(key(2000 + n), later);
        }
        assert!(buckets.len() <= 201, "{}", buckets.len());
    }
}
