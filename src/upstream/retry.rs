//! `retry_policy` (§2.8): which failures are retried, how often, and how
//! long each try may wait. Retries happen inside the route timeout, and a
//! request whose body was streamed upstream without being buffered is never
//! sent twice.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The upstream could not be reached (refused, timed out, unreachable).
    pub connect_failure: bool,
    /// The connection broke before a response arrived.
    pub reset: bool,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
}

/// The `retry_on` conditions pingress acts on, and those it does not yet
/// (retries decided by the response status).
pub fn conditions(retry_on: &str) -> Result<(bool, bool, Vec<&str>), String> {
    let (mut connect_failure, mut reset, mut unsupported) = (false, false, Vec::new());
    for condition in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match condition {
            "connect-failure" => connect_failure = true,
            "reset" | "refused-stream" => reset = true,
            // Envoy's 5xx and gateway-error also cover failed connections
            // and resets; their status-based half is not done yet.
            "5xx" | "gateway-error" => {
                connect_failure = true;
                reset = true;
                unsupported.push(condition);
            }
            "retriable-4xx" | "retriable-status-codes" => unsupported.push(condition),
            other => {
                return Err(format!(
                    "unknown retry_on condition {other:?} (5xx, gateway-error, connect-failure, \
                     retriable-4xx, reset, refused-stream, retriable-status-codes)"
                ))
            }
        }
    }
    Ok((connect_failure, reset, unsupported))
}

/// Envoy durations as Emissary writes them: `250ms`, `1s`, `1.5s`, `2m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn retry_on() {
        assert_eq!(
            conditions("connect-failure").unwrap(),
            (true, false, vec![])
        );
        assert_eq!(conditions("5xx, reset").unwrap(), (true, true, vec!["5xx"]));
        assert!(conditions("sometimes").is_err());
    }
}
