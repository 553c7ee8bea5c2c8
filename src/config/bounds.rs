//! Upper bounds of the numbers a configuration hands to std and tokio.
//!
//! `Instant + Duration` and `Duration` arithmetic panic on overflow, and
//! tokio's `Semaphore::new` panics above `Semaphore::MAX_PERMITS`: a number
//! that a typo made huge must be an error naming its field, never a panic
//! of `pingress -t` or of a serving gateway. Plain numbers are bounded
//! where the YAML is read (`#[serde(deserialize_with)]`), so the error
//! carries the field path like any type error (`spec.timeout_ms: ...`);
//! durations written as text (`per_try_timeout: 5s`) are bounded by
//! [`crate::upstream::retry::parse_duration`].

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// The longest duration any setting takes: a year. Longer than any request
/// or connection should wait, and `Instant::now() + d` (and tokio's timer
/// arithmetic on it) stays many orders of magnitude from overflowing.
pub const MAX_MILLISECONDS: u64 = 365 * 24 * 60 * 60 * 1000;

/// [`MAX_MILLISECONDS`] as a duration.
pub const MAX_DURATION: Duration = Duration::from_millis(MAX_MILLISECONDS);

/// The largest circuit breaker threshold. Envoy types the thresholds
/// `uint32`, and manifests write 4294967295 to mean "no limit", so every
/// value Envoy accepts is accepted. A threshold becomes the permits of a
/// tokio semaphore, which allows `usize::MAX >> 3`: far more on 64-bit
/// targets (`Breaker::new` clamps on smaller ones).
pub const MAX_BREAKER_THRESHOLD: u64 = u32::MAX as u64;

/// The largest rate of a rate limit, per unit. Token counts stay exact in
/// the `f64` of the in-memory buckets (below 2^53) and within Redis's
/// signed 64-bit counters, and no gateway serves a trillion requests a
/// second anyway.
pub const MAX_RATE: u64 = 1_000_000_000_000;

/// A duration in milliseconds (`timeout_ms` and its kin), at most a year.
pub(crate) fn milliseconds<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    let value = Option::<u64>::deserialize(deserializer)?;
    match value {
        Some(ms) if ms > MAX_MILLISECONDS => Err(D::Error::custom(too_many_milliseconds(ms))),
        _ => Ok(value),
    }
}

/// The message for a number of milliseconds above [`MAX_MILLISECONDS`].
pub(crate) fn too_many_milliseconds(ms: u64) -> String {
    format!("{ms} is more than a year ({MAX_MILLISECONDS} ms), the longest pingress accepts")
}

/// A circuit breaker threshold, at most [`MAX_BREAKER_THRESHOLD`].
pub(crate) fn breaker_threshold<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<usize>, D::Error> {
    match Option::<u64>::deserialize(deserializer)? {
        None => Ok(None),
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|_| n <= MAX_BREAKER_THRESHOLD)
            .map(Some)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "{n} is above {MAX_BREAKER_THRESHOLD}, the largest threshold Envoy and \
                     pingress accept"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Sample {
        #[serde(default, deserialize_with = "milliseconds")]
        timeout_ms: Option<u64>,
        #[serde(default, deserialize_with = "breaker_threshold")]
        max_connections: Option<usize>,
    }

    fn parse(yaml: &str) -> Result<Sample, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn numbers_up_to_the_bound_pass() {
        let sample = parse("timeout_ms: 31536000000\nmax_connections: 4294967295").unwrap();
        assert_eq!(sample.timeout_ms, Some(MAX_MILLISECONDS));
        assert_eq!(sample.max_connections, Some(u32::MAX as usize));
        let sample = parse("timeout_ms: null").unwrap();
        assert_eq!((sample.timeout_ms, sample.max_connections), (None, None));
        // Adding the longest duration to now cannot overflow.
        assert!(std::time::Instant::now()
            .checked_add(MAX_DURATION)
            .is_some());
    }

    #[test]
    fn numbers_above_the_bound_are_errors() {
        let e = parse("timeout_ms: 31536000001").unwrap_err().to_string();
        assert!(e.contains("more than a year"), "{e}");
        let e = parse("max_connections: 3000000000000000000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is above 4294967295"), "{e}");
        // Still a type error when it is no number at all.
        assert!(parse("timeout_ms: 3s").is_err());
    }
}
