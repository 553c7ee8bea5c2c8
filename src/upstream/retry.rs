//! `retry_policy` (§2.8): which failures are retried, how often, and how
//! long each try may wait. Retries happen inside the route timeout, and a
//! request whose body was streamed upstream beyond Pingora's retry buffer
//! is never sent twice.

use std::time::Duration;

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
pub fn conditions(retry_on: &str) -> Result<(Option<RetryOn>, Vec<&str>), String> {
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
            other => {
                return Err(format!(
                    "unknown retry_on condition {other:?} (5xx, gateway-error, connect-failure, \
                     retriable-4xx, reset, refused-stream, retriable-status-codes)"
                ))
            }
        }
    }
    Ok((on.any().then_some(on), unsupported))
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
    // `try_`: a huge value would panic `from_secs_f64`; one that rounds to
    // zero would make a health check loop without pause.
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("99999999999999999999h"), None);
        assert_eq!(parse_duration("0.0000000001s"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1d"), None);
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
