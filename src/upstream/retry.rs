//! `retry_policy`
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/retries>):
//! which failures are retried, how often, and how long each try may wait.
//! Retries happen inside the route timeout, and a request whose body was
//! streamed upstream beyond Pingora's retry buffer is never sent twice.

use std::time::Duration;

use crate::config::bounds;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
}

/// The failures a policy retries (`retry_on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// The upstream could not be reached (refused, timed out, unreachable).
    pub connect_failure: bool,
    /// The connection broke before a response arrived.
    pub reset: bool,
    /// `5xx`: any 5xx response, and a try that timed out (Envoy counts it
    /// as a 504).
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, and a try that timed out.
    pub gateway_error: bool,
    /// `retriable-4xx`: 409.
    pub conflict: bool,
}

impl RetryOn {
    /// Whether a response with this status is tried again.
    pub fn status(&self, status: u16) -> bool {
        (self.server_error && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.conflict && status == 409)
    }

    fn any(&self) -> bool {
        self.connect_failure
            || self.reset
            || self.server_error
            || self.gateway_error
            || self.conflict
    }
}

/// The `retry_on` conditions pingress acts on, and those it cannot
/// (`retriable-status-codes` needs a list of codes Emissary's
/// `retry_policy` has no field for). `None`: nothing is retried.
pub fn conditions(retry_on: &str) -> Result<(Option<RetryOn>, Vec<&str>), RetryOnError> {
    let (mut on, mut unsupported) = (RetryOn::default(), Vec::new());
    for condition in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match condition {
            "connect-failure" => on.connect_failure = true,
            "reset" | "refused-stream" => on.reset = true,
            // Envoy's 5xx and gateway-error also cover failed connections
            // and resets.
            "5xx" => {
                on.server_error = true;
                on.connect_failure = true;
                on.reset = true;
            }
            "gateway-error" => {
                on.gateway_error = true;
                on.connect_failure = true;
                on.reset = true;
            }
            "retriable-4xx" => on.conflict = true,
            "retriable-status-codes" => unsupported.push(condition),
            other => return Err(RetryOnError(other.to_string())),
        }
    }
    Ok((on.any().then_some(on), unsupported))
}

/// A `retry_on` condition Envoy does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown retry_on condition {0:?} (5xx, gateway-error, connect-failure, retriable-4xx, reset, \
     refused-stream, retriable-status-codes)"
)]
pub struct RetryOnError(pub String);

/// Envoy durations as Emissary writes them: `250ms`, `1s`, `1.5s`, `2m`,
/// at most a year ([`bounds::MAX_DURATION`]): they become timers and
/// deadlines (`Instant + d` panics on overflow). The error is a message
/// for the field's diagnostic.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let shown = text;
    let text = text.trim();
    let not_a_duration = || DurationError::NotADuration(shown.to_string());
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(not_a_duration)?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| not_a_duration())?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(not_a_duration()),
    };
    let not_above_zero = || DurationError::NotAboveZero(shown.to_string());
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(not_above_zero());
    }
    let too_long = || DurationError::TooLong(shown.to_string());
    // Compared as seconds first: `from_secs_f64` panics on huge values.
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if d > bounds::MAX_DURATION => Err(too_long()),
        // One that rounds to zero would make a health check loop without
        // pause.
        Ok(d) if d.is_zero() => Err(not_above_zero()),
        Ok(d) => Ok(d),
        Err(_) => Err(too_long()),
    }
}

/// A configured duration pingress cannot use; each variant holds the text as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration")]
    NotADuration(String),
    /// Negative, zero, or so short it rounds to zero.
    #[error("{0:?} is not a duration above zero")]
    NotAboveZero(String),
    #[error("{0:?} is longer than a year, the longest pingress accepts")]
    TooLong(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("8760h"), Ok(bounds::MAX_DURATION));
        for text in ["8761h", "525601m", "99999999999999999999h"] {
            let e = parse_duration(text).unwrap_err().to_string();
            assert!(e.contains("longer than a year"), "{text}: {e}");
        }
        for text in ["0.0000000001s", "-1s", "0s", "NaNs", "5", "1d", ""] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn retry_on() {
        let (on, unsupported) = conditions("connect-failure").unwrap();
        let on = on.unwrap();
        assert!(on.connect_failure && !on.reset && !on.status(503));
        assert!(unsupported.is_empty());

        let (on, _) = conditions("gateway-error, retriable-4xx").unwrap();
        let on = on.unwrap();
        assert!(on.connect_failure && on.reset);
        for (status, retried) in [
            (500, false),
            (502, true),
            (504, true),
            (409, true),
            (404, false),
        ] {
            assert_eq!(on.status(status), retried, "{status}");
        }
        let (on, _) = conditions("5xx").unwrap();
        assert!(on.unwrap().status(500) && !on.unwrap().status(409));

        assert_eq!(
            conditions("retriable-status-codes").unwrap(),
            (None, vec!["retriable-status-codes"])
        );
        assert!(conditions("sometimes").is_err());
    }
}
