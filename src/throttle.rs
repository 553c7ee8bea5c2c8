//! Log lines a client can cause at will (a refused connection, a request
//! over a LogOnly limit, an upstream that keeps failing) are throttled: a
//! flood of them would cost more than the requests themselves and bury the
//! lines that matter. Each source writes a few lines a second; the next
//! line written says how many were held back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use log::{Log, Metadata, Record};

/// At most `per_second` lines a second from one source.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    second: AtomicU64,
    left: AtomicU32,
    held_back: AtomicU64,
}

impl Throttle {
    pub const fn new(per_second: u32) -> Throttle {
        Throttle {
            per_second,
            second: AtomicU64::new(u64::MAX),
            left: AtomicU32::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were
    /// held back since the last one; `None` when it must be held back.
    pub fn admit(&self) -> Option<u64> {
        let now = seconds();
        if self.second.load(Ordering::Relaxed) != now
            && self.second.swap(now, Ordering::Relaxed) != now
        {
            self.left.store(self.per_second, Ordering::Relaxed);
        }
        let taken = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            });
        match taken {
            Ok(_) => Some(self.held_back.swap(0, Ordering::Relaxed)),
            Err(_) => {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Whole seconds on a monotonic clock.
fn seconds() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs()
}

/// Lines a second from one call site that a client can reach at will.
pub const LINES_PER_SECOND: u32 = 5;

/// `log::warn!` or `log::error!` at most [`LINES_PER_SECOND`] times a
/// second from this call site; the next line written says how many were
/// held back. For lines any client can cause with each request.
macro_rules! throttled {
    ($level:ident, $($arg:tt)+) => {{
        static SITE: $crate::throttle::Throttle =
            $crate::throttle::Throttle::new($crate::throttle::LINES_PER_SECOND);
        match SITE.admit() {
            Some(0) => log::$level!($($arg)+),
            Some(held_back) => log::$level!(
                "{} ({held_back} similar lines held back)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}
pub(crate) use throttled;

/// The process's logger: `inner` for every line, but Pingora's own warnings
/// and errors, which a client triggers with every malformed or cut
/// connection, go through a throttle per call site.
pub struct ThrottledLog<L> {
    inner: L,
    /// Pingora's call sites by target and line: a few dozen at most.
    sites: Mutex<HashMap<(String, u32), Arc<Throttle>>>,
}

impl<L: Log> ThrottledLog<L> {
    pub fn new(inner: L) -> ThrottledLog<L> {
        ThrottledLog {
            inner,
            sites: Mutex::default(),
        }
    }

    fn site(&self, record: &Record<'_>) -> Arc<Throttle> {
        let key = (record.target().to_string(), record.line().unwrap_or(0));
        self.sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(Throttle::new(LINES_PER_SECOND)))
            .clone()
    }
}

impl<L: Log> Log for ThrottledLog<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let client_triggered =
            record.level() <= log::Level::Warn && record.target().starts_with("pingora");
        if !client_triggered {
            return self.inner.log(record);
        }
        match self.site(record).admit() {
            None => {}
            Some(0) => self.inner.log(record),
            Some(held_back) => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} ({held_back} similar lines held back)",
                        record.args()
                    ))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_few_a_second_and_counts_the_rest() {
        let throttle = Throttle::new(3);
        let admitted: Vec<Option<u64>> = (0..10).map(|_| throttle.admit()).collect();
        // A second boundary may fall inside the loop; either way no more
        // than 3 pass per second and every held-back line is counted.
        let passed = admitted.iter().filter(|a| a.is_some()).count();
        assert!((3..=6).contains(&passed), "{admitted:?}");
        let counted: u64 = admitted.iter().flatten().sum();
        assert!(counted <= 10 - passed as u64);
        assert_eq!(admitted[0], Some(0));
    }
}
