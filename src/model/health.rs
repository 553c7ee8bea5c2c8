//! `health_checks` of a Mapping, in Emissary's v3 shape.

use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::config::diagnostics::{Code, Reporter};
use crate::config::resources::{AddHeaderValue, HealthCheckSpec, HttpHealthCheckSpec};
use crate::upstream::health::HealthCheck;
use crate::upstream::retry::parse_duration;

use super::edge::header_names;

/// Emissary's (and Envoy's) defaults.
const INTERVAL: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(3);
const UNHEALTHY_THRESHOLD: u32 = 2;
const HEALTHY_THRESHOLD: u32 = 1;

/// The first usable check of the list. `None` (outer): the Mapping is
/// invalid; `Some(None)`: nothing to check.
pub fn health_check(
    list: &[HealthCheckSpec],
    field: &str,
    report: &mut Reporter,
) -> Option<Option<HealthCheck>> {
    let mut checks = Vec::new();
    for (index, spec) in list.iter().enumerate() {
        let entry = format!("{field}[{index}]");
        if let Some(check) = one(spec, &entry, report)? {
            checks.push((entry, check));
        }
    }
    if let Some((entry, _)) = checks.get(1) {
        report.warning(
            entry,
            "pingress runs one health check per Mapping: only the first is used",
        );
    }
    Some(checks.into_iter().next().map(|(_, check)| check))
}

fn one(spec: &HealthCheckSpec, field: &str, report: &mut Reporter) -> Option<Option<HealthCheck>> {
    let kind = spec.health_check.clone().unwrap_or_default();
    let http = match (kind.http, kind.grpc) {
        (Some(_), Some(_)) => {
            report.error(
                &format!("{field}.health_check"),
                "http and grpc exclude each other",
            );
            return None;
        }
        (None, Some(_)) => {
            report
                .warning(
                    &format!("{field}.health_check.grpc"),
                    "gRPC health checks are not supported by pingress yet; this check is ignored",
                )
                .with_code(Code::KeyIgnored);
            return Some(None);
        }
        (None, None) => {
            report
                .error(
                    &format!("{field}.health_check"),
                    "a health check needs health_check.http",
                )
                .with_hint("e.g. health_check: {http: {path: /healthz}}");
            return None;
        }
        (Some(http), None) => http,
    };
    let duration =
        |text: &Option<String>, key: &str, default: Duration, report: &mut Reporter| match text
            .as_deref()
        {
            None => Some(default),
            Some(text) => parse_duration(text)
                .map_err(|e| {
                    report
                        .error(&format!("{field}.{key}"), e.to_string())
                        .with_hint("e.g. 500ms, 5s or 1m");
                })
                .ok(),
        };
    let interval = duration(&spec.interval, "interval", INTERVAL, report)?;
    let timeout = duration(&spec.timeout, "timeout", TIMEOUT, report)?;
    let threshold = |value: Option<u32>, key: &str, default: u32, report: &mut Reporter| match value
    {
        None => Some(default),
        Some(0) => {
            report.error(
                &format!("{field}.{key}"),
                "a threshold of 0 is never reached",
            );
            None
        }
        Some(n) => Some(n),
    };
    let unhealthy_threshold = threshold(
        spec.unhealthy_threshold,
        "unhealthy_threshold",
        UNHEALTHY_THRESHOLD,
        report,
    )?;
    let healthy_threshold = threshold(
        spec.healthy_threshold,
        "healthy_threshold",
        HEALTHY_THRESHOLD,
        report,
    )?;
    let http_field = format!("{field}.health_check.http");
    let request = http_request(&http, &http_field, report)?;
    Some(Some(HealthCheck {
        interval,
        timeout,
        unhealthy_threshold,
        healthy_threshold,
        ..request
    }))
}

/// The request half of a check; intervals and thresholds are filled in by
/// the caller.
fn http_request(
    http: &HttpHealthCheckSpec,
    field: &str,
    report: &mut Reporter,
) -> Option<HealthCheck> {
    let path = match http.path.as_deref() {
        Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => path,
        Some(path) => {
            report.error(
                &format!("{field}.path"),
                format!("{path:?} is not a request path (it starts with /)"),
            );
            return None;
        }
        None => {
            report.error(&format!("{field}.path"), "path is required");
            return None;
        }
    };
    if let Some(host) = &http.hostname {
        if HeaderValue::from_str(host).is_err() || host.is_empty() {
            report.error(
                &format!("{field}.hostname"),
                format!("{host:?} is not a host name"),
            );
            return None;
        }
    }
    let mut expected = Vec::new();
    for (index, range) in http.expected_statuses.iter().flatten().enumerate() {
        if !(100..=599).contains(&range.min)
            || !(100..=599).contains(&range.max)
            || range.min > range.max
        {
            report
                .error(
                    &format!("{field}.expected_statuses[{index}]"),
                    format!(
                        "min {} and max {} are not a range of statuses",
                        range.min, range.max
                    ),
                )
                .with_hint("both between 100 and 599, min <= max (both included)");
            return None;
        }
        expected.push((range.min, range.max));
    }
    if expected.is_empty() {
        expected.push((200, 200));
    }
    let mut add_headers = Vec::new();
    for (name, value) in http.add_request_headers.iter().flat_map(|m| m.0.iter()) {
        let (text, append) = match value {
            AddHeaderValue::Plain(text) => (text, true),
            AddHeaderValue::Detailed { value, append } => (value, append.unwrap_or(true)),
        };
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(text),
        ) {
            (Ok(name), Ok(value)) => add_headers.push((name, value, append)),
            (Err(_), _) => {
                report.error(
                    &format!("{field}.add_request_headers.{name}"),
                    "not a valid header name",
                );
                return None;
            }
            (_, Err(_)) => {
                report.error(
                    &format!("{field}.add_request_headers.{name}"),
                    crate::routing::headers::invalid_value(text).to_string(),
                );
                return None;
            }
        }
    }
    let remove_headers = http
        .remove_request_headers
        .as_ref()
        .map(|list| header_names(list, &format!("{field}.remove_request_headers"), report))
        .unwrap_or_default();
    Some(HealthCheck {
        interval: INTERVAL,
        timeout: TIMEOUT,
        unhealthy_threshold: UNHEALTHY_THRESHOLD,
        healthy_threshold: HEALTHY_THRESHOLD,
        path: path.to_string(),
        hostname: http.hostname.clone(),
        expected,
        add_headers,
        remove_headers,
    })
}
