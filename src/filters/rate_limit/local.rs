//! Token buckets in this process's memory: `rate` tokens, refilled evenly
//! over the limit's unit. They are process-wide, keyed by limit and label
//! values, so a reload that keeps a limit keeps its buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::Decision;

/// Buckets are swept once the map holds this many.
const SWEEP_ABOVE: usize = 4096;
/// And at most this often, so a flood of new clients costs one sweep a
/// second, not one per request.
const SWEEP_EVERY_MS: u64 = 1000;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refilled(&self, capacity: f64, per_second: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * per_second).min(capacity)
    }
}

pub(crate) struct LocalBuckets {
    /// A sharded map: requests for different buckets rarely share a lock,
    /// and each holds it for a few arithmetic operations.
    buckets: DashMap<String, (Bucket, f64, f64)>,
    /// Times below are milliseconds since this instant.
    origin: Instant,
    /// When the next sweep is due. One atomic load per request decides;
    /// the request that wins the exchange sweeps.
    next_sweep: AtomicU64,
}

/// The process's buckets.
pub(crate) fn buckets() -> &'static LocalBuckets {
    static BUCKETS: OnceLock<LocalBuckets> = OnceLock::new();
    BUCKETS.get_or_init(LocalBuckets::new)
}

impl LocalBuckets {
    fn new() -> LocalBuckets {
        LocalBuckets {
            buckets: DashMap::new(),
            origin: Instant::now(),
            next_sweep: AtomicU64::new(0),
        }
    }

    /// Takes a token from the bucket `key` of a limit of `rate` per
    /// `period`.
    pub fn take(&self, key: String, rate: u64, period: Duration, now: Instant) -> Decision {
        let capacity = rate as f64;
        let per_second = capacity / period.as_secs_f64().max(f64::MIN_POSITIVE);
        let fresh = || {
            (
                Bucket {
                    tokens: capacity,
                    updated: now,
                },
                capacity,
                per_second,
            )
        };
        let decision = {
            let mut slot = self.buckets.entry(key).or_insert_with(fresh);
            let (bucket, _, _) = &mut *slot;
            let mut tokens = bucket.refilled(capacity, per_second, now);
            let allowed = tokens >= 1.0;
            if allowed {
                tokens -= 1.0;
            }
            bucket.tokens = tokens;
            bucket.updated = now;
            Decision {
                allowed,
                limit: rate,
                remaining: tokens.floor() as u64,
                reset: seconds_until(capacity - tokens, per_second),
                retry_after: seconds_until(1.0 - tokens, per_second).max(1),
            }
        };
        if self.buckets.len() > SWEEP_ABOVE {
            self.sweep(now);
        }
        decision
    }

    /// Drops buckets that have refilled: a full bucket is the same as none.
    /// Buckets of limits that no longer exist fill up too, and go.
    fn sweep(&self, now: Instant) {
        let since = now.saturating_duration_since(self.origin).as_millis();
        let now_ms = u64::try_from(since).unwrap_or(u64::MAX);
        let due = self.next_sweep.load(Ordering::Relaxed);
        let next = now_ms.saturating_add(SWEEP_EVERY_MS);
        if now_ms < due
            || self
                .next_sweep
                .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.buckets.retain(|_, (bucket, capacity, per_second)| {
            bucket.refilled(*capacity, *per_second, now) < *capacity
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
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

    #[test]
    fn a_bucket_allows_its_rate_then_refills_evenly() {
        let buckets = LocalBuckets::new();
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        for left in (0..3).rev() {
            let d = buckets.take("k".into(), 3, minute, t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let denied = buckets.take("k".into(), 3, minute, t0);
        assert!(!denied.allowed);
        assert_eq!((denied.limit, denied.remaining), (3, 0));
        // One token per 20 s.
        assert_eq!(denied.retry_after, 20);
        assert_eq!(denied.reset, 60);
        // Other keys have their own bucket.
        assert!(buckets.take("other".into(), 3, minute, t0).allowed);
        let later = buckets.take("k".into(), 3, minute, t0 + Duration::from_secs(20));
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
        assert!(
            !buckets
                .take("k".into(), 3, minute, t0 + Duration::from_secs(21))
                .allowed
        );
    }

    #[test]
    fn full_buckets_are_swept() {
        let buckets = LocalBuckets::new();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        for i in 0..=SWEEP_ABOVE {
            buckets.take(format!("k{i}"), 10, second, t0);
        }
        assert_eq!(buckets.len(), SWEEP_ABOVE + 1);
        // Two seconds on, every one of them has refilled.
        buckets.take("new".into(), 10, second, t0 + Duration::from_secs(2));
        assert_eq!(buckets.len(), 1);
    }
}
