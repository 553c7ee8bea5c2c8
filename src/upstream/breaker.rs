//! Circuit breakers (`circuit_breakers`,
//! <https://www.getambassador.io/docs/emissary/latest/topics/using/circuit-breakers>):
//! at most `max_connections` exchanges with a cluster at once, at most
//! `max_pending_requests` waiting for one of them; beyond that the gateway
//! answers 503 with `x-envoy-overloaded: true`, as Envoy does, instead of
//! piling up load on an upstream that cannot keep up. At most `max_retries`
//! requests retry at once; beyond that a failure is answered without
//! another try.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The thresholds of the `default` priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Thresholds {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_retries: usize,
}

impl Default for Thresholds {
    /// Envoy's defaults.
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_retries: 3,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    thresholds: Thresholds,
    active: Arc<Semaphore>,
    pending: AtomicUsize,
    retrying: Arc<Semaphore>,
}

/// An admitted exchange; dropping it frees its place.
pub type Admission = OwnedSemaphorePermit;

impl Breaker {
    pub fn new(thresholds: Thresholds) -> Breaker {
        // Validation bounds thresholds (`config::bounds`); tokio panics
        // above MAX_PERMITS, which is smaller than those bounds on 32-bit
        // targets, so the semaphores are clamped too.
        let permits = |n: usize| n.min(Semaphore::MAX_PERMITS);
        Breaker {
            thresholds,
            active: Arc::new(Semaphore::new(permits(thresholds.max_connections))),
            pending: AtomicUsize::new(0),
            retrying: Arc::new(Semaphore::new(permits(thresholds.max_retries))),
        }
    }

    /// A place now, or none: a tunnel has no request that could wait.
    pub fn try_admit(&self) -> Option<Admission> {
        self.active.clone().try_acquire_owned().ok()
    }

    /// A place among the requests retrying now; a request keeps it until
    /// it ends, whatever number of tries it takes.
    pub fn try_retry(&self) -> Option<Admission> {
        self.retrying.clone().try_acquire_owned().ok()
    }

    /// Waits for a place until `deadline` (the request's route timeout),
    /// or refuses at once when too many already wait.
    pub async fn admit(&self, deadline: Option<Instant>) -> Option<Admission> {
        if let Ok(permit) = self.active.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.thresholds.max_pending_requests {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        // Given back however the wait ends, a client that went away
        // included.
        let _waiting = Waiting(&self.pending);
        let wait = self.active.clone().acquire_owned();
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), wait)
                .await
                .ok()
                .and_then(Result::ok),
            None => wait.await.ok(),
        }
    }
}

/// A request's place among those waiting for a breaker place.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_refused_and_places_come_back() {
        let breaker = Arc::new(Breaker::new(Thresholds {
            max_connections: 1,
            max_pending_requests: 1,
            max_retries: 1,
        }));
        let first = breaker.admit(None).await.expect("a free place");
        let waiting = tokio::spawn({
            let breaker = breaker.clone();
            async move { breaker.admit(None).await.is_some() }
        });
        tokio::task::yield_now().await;
        // One active, one pending: the third is refused.
        assert!(breaker.admit(None).await.is_none());
        drop(first);
        assert!(waiting.await.unwrap());

        let retrying = breaker.try_retry().expect("a free retry");
        assert!(breaker.try_retry().is_none());
        drop(retrying);
        assert!(breaker.try_retry().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_the_deadline() {
        let breaker = Breaker::new(Thresholds {
            max_connections: 1,
            max_pending_requests: 1,
            max_retries: 1,
        });
        let _held = breaker.admit(None).await.expect("a free place");
        let two = std::time::Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        assert!(breaker.admit(Some(Instant::now() + two)).await.is_none());
        assert!(started.elapsed() >= two);
        // The waiter gave its pending place back.
        assert_eq!(breaker.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn thresholds_beyond_tokio_are_clamped() {
        let breaker = Breaker::new(Thresholds {
            max_connections: usize::MAX,
            max_pending_requests: usize::MAX,
            max_retries: usize::MAX,
        });
        assert!(breaker.try_admit().is_some());
    }
}
