//! `kind: RateLimit` (Edge Stack's shape: a domain and limits whose
//! patterns match label groups) and `kind: RateLimitService`, which in
//! pingress names a Redis server that replicas share counters through,
//! validated into the [`RateLimits`] of `filters::rate_limit`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;

use super::spec::{check_unknown_fields, parse_section};
use super::{count, ModuleSettings};
use crate::config::bounds;
use crate::config::diagnostics::{Code, Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::StringOrList;
use crate::filters::rate_limit::limits::{Limit, PatternItem, RedisSettings, Unit};
use crate::filters::rate_limit::RateLimits;
use crate::upstream::service::redacted;

#[derive(Debug, Default, Deserialize)]
struct RateLimitSpec {
    domain: Option<String>,
    limits: Option<Vec<LimitSpec>>,
    #[serde(rename = "ambassador_id")]
    _ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LimitSpec {
    name: Option<String>,
    action: Option<String>,
    pattern: Option<Vec<BTreeMap<String, String>>>,
    rate: Option<u64>,
    unit: Option<String>,
    burst_factor: Option<Value>,
    inject_request_headers: Option<Value>,
    inject_response_headers: Option<Value>,
    error_response: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RateLimitServiceSpec {
    service: Option<String>,
    protocol_version: Option<String>,
    domain: Option<String>,
    #[serde(default, deserialize_with = "crate::config::bounds::milliseconds")]
    timeout_ms: Option<u64>,
    failure_mode_deny: Option<bool>,
    tls: Option<Value>,
    #[serde(rename = "ambassador_id")]
    _ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

const SERVICE_FIELDS: &[&str] = &[
    "service",
    "protocol_version",
    "domain",
    "timeout_ms",
    "failure_mode_deny",
    "tls",
    "ambassador_id",
];
const SERVICE_LATER: &[&str] = &["stats_name", "grpc", "circuit_breakers", "v3StatsName"];

/// Validates the RateLimitService (at most one) and every RateLimit.
pub(crate) fn validate(
    limits: &[&RawResource],
    services: &[&RawResource],
    module: &ModuleSettings,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> RateLimits {
    let mut service: Option<(&ResourceRef, Option<String>, Option<RedisSettings>)> = None;
    for raw in services {
        let mut report = Reporter::new(raw.location(), diags);
        if let Some((first, ..)) = &service {
            report
                .error(
                    "metadata.name",
                    format!("{first} is the RateLimitService already; only one may exist"),
                )
                .with_code(Code::Conflict)
                .with_hint("counters live in one Redis: remove this one");
            continue;
        }
        if let Some((domain, redis)) = validate_service(raw, &mut report) {
            if !report.has_errors() {
                count(accepted, "RateLimitService");
                service = Some((&raw.id, domain, redis));
            }
        }
    }
    let (domain, redis) = match service {
        Some((_, domain, redis)) => (domain, redis),
        None => (None, None),
    };
    let domain = domain.unwrap_or_else(|| module.default_label_domain.clone());

    let mut all = Vec::new();
    for raw in limits {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(parsed) = validate_rate_limit(raw, &domain, &mut report) else {
            continue;
        };
        if report.has_errors() {
            continue;
        }
        count(accepted, "RateLimit");
        all.extend(parsed);
    }
    RateLimits {
        domain,
        limits: all,
        redis,
    }
}

/// `(domain, redis)` of a RateLimitService.
fn validate_service(
    raw: &RawResource,
    report: &mut Reporter,
) -> Option<(Option<String>, Option<RedisSettings>)> {
    let spec = parse_section::<RateLimitServiceSpec>(raw, "spec", report)?;
    check_unknown_fields(&spec.other, "spec", SERVICE_FIELDS, SERVICE_LATER, report);
    if spec.tls.is_some() {
        report
            .error("spec.tls", "pingress talks to Redis in cleartext only")
            .with_hint("reach Redis over a private network or a local TLS tunnel");
    }
    if let Some(version) = spec.protocol_version.as_deref().filter(|v| *v != "v3") {
        report
            .warning(
                "spec.protocol_version",
                format!("{version:?} ignored: pingress speaks Redis, not rls.proto"),
            )
            .with_code(Code::KeyIgnored);
    }
    let Some(service) = spec.service.as_deref() else {
        report
            .error("spec.service", "service is required")
            .with_hint("redis://host:port: the Redis server that replicas share counters in");
        return None;
    };
    if !service.starts_with("redis://") {
        report
            .error(
                "spec.service",
                format!(
                    "{:?} is not a redis:// address: pingress does not speak Envoy's \
                     rls.proto, it keeps shared counters in Redis itself",
                    redacted(service)
                ),
            )
            .with_hint(
                "write service: redis://host:port, or delete the RateLimitService to count \
                 in each gateway's memory",
            );
        return None;
    }
    let client = match redis::Client::open(service) {
        Ok(client) => client,
        Err(e) => {
            report.error(
                "spec.service",
                format!("{:?} is not a Redis address: {e}", redacted(service)),
            );
            return None;
        }
    };
    let timeout_ms = spec.timeout_ms.unwrap_or(20);
    if timeout_ms == 0 {
        report.error("spec.timeout_ms", "a timeout of 0 would fail every call");
        return None;
    }
    let redis = RedisSettings {
        url: service.to_string(),
        address: client.get_connection_info().addr().to_string(),
        timeout: Duration::from_millis(timeout_ms),
        failure_mode_deny: spec.failure_mode_deny.unwrap_or(false),
    };
    Some((spec.domain.filter(|d| !d.is_empty()), Some(redis)))
}

fn validate_rate_limit(
    raw: &RawResource,
    domain: &str,
    report: &mut Reporter,
) -> Option<Vec<Arc<Limit>>> {
    let spec = parse_section::<RateLimitSpec>(raw, "spec", report)?;
    check_unknown_fields(
        &spec.other,
        "spec",
        &["domain", "limits", "ambassador_id"],
        &[],
        report,
    );
    let Some(own_domain) = spec.domain.filter(|d| !d.is_empty()) else {
        report
            .error("spec.domain", "domain is required")
            .with_hint(format!(
                "the label domain this gateway evaluates is {domain:?}"
            ));
        return None;
    };
    if own_domain != domain {
        report
            .warning(
                "spec.domain",
                format!(
                    "domain {own_domain:?} is never evaluated: this gateway evaluates the labels \
                     of domain {domain:?}"
                ),
            )
            .with_hint(
                "the evaluated domain is the RateLimitService's domain, else the Module's \
                 default_label_domain (ambassador)",
            );
    }
    let Some(specs) = spec.limits.filter(|l| !l.is_empty()) else {
        report.error("spec.limits", "a RateLimit needs at least one limit");
        return None;
    };
    let limits: Vec<Option<Arc<Limit>>> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let default_name = format!("{}.{}-{i}", raw.id.name, raw.id.namespace);
            limit(
                spec,
                &format!("spec.limits[{i}]"),
                default_name,
                &own_domain,
                report,
            )
        })
        .collect();
    // Limits of another domain are checked but never apply.
    let limits: Option<Vec<Arc<Limit>>> = limits.into_iter().collect();
    Some(
        limits?
            .into_iter()
            .filter(|_| own_domain == domain)
            .collect(),
    )
}

fn limit(
    spec: &LimitSpec,
    field: &str,
    default_name: String,
    domain: &str,
    report: &mut Reporter,
) -> Option<Arc<Limit>> {
    let supported = only_supported_keys(spec, field, report);
    let enforce = enforce(spec, field, report);
    let pattern = match spec.pattern.as_deref() {
        Some(items) if !items.is_empty() => pattern(items, &format!("{field}.pattern"), report),
        _ => {
            report
                .error(&format!("{field}.pattern"), "a limit needs a pattern")
                .with_hint("e.g. pattern: [{generic_key: my-api}, {remote_address: \"*\"}]");
            None
        }
    };
    let rate = rate(spec, field, report);
    let unit = unit(spec, field, report);
    let (pattern, rate, unit) = (pattern?, rate?, unit?);
    let enforce = enforce.filter(|_| supported)?;
    let name = spec.name.clone().unwrap_or(default_name);
    let limit = Limit::new(name, enforce, pattern, rate, unit, domain);
    Some(Arc::new(limit))
}

/// Edge Stack's limit keys that pingress does not implement: each one set
/// is an error, as the limit would not do what it says.
fn only_supported_keys(spec: &LimitSpec, field: &str, report: &mut Reporter) -> bool {
    let unsupported = [
        (
            "burstFactor",
            spec.burst_factor.is_some(),
            "a limit allows `rate` requests per `unit`, refilled evenly",
        ),
        (
            "injectRequestHeaders",
            spec.inject_request_headers.is_some(),
            "Go templates are not supported",
        ),
        (
            "injectResponseHeaders",
            spec.inject_response_headers.is_some(),
            "Go templates are not supported",
        ),
        (
            "errorResponse",
            spec.error_response.is_some(),
            "the 429 carries Retry-After and RateLimit-* headers",
        ),
    ];
    let mut ok = true;
    for (name, present, hint) in unsupported {
        if present {
            report
                .error(&format!("{field}.{name}"), "not supported by pingress")
                .with_hint(hint);
            ok = false;
        }
    }
    ok
}

/// `action`: whether requests over the limit are refused (`Enforce`) or
/// only logged (`LogOnly`), in any case. `None` when it is neither.
fn enforce(spec: &LimitSpec, field: &str, report: &mut Reporter) -> Option<bool> {
    match spec
        .action
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("enforce") => Some(true),
        Some("logonly") => Some(false),
        Some(_) => {
            report
                .error(&format!("{field}.action"), "action is Enforce or LogOnly")
                .with_hint("LogOnly logs requests over the limit and lets them through");
            None
        }
    }
}

/// The required `rate`, between 1 and the largest rate counted.
fn rate(spec: &LimitSpec, field: &str, report: &mut Reporter) -> Option<u64> {
    match spec.rate {
        Some(rate) if rate > bounds::MAX_RATE => {
            report
                .error(
                    &format!("{field}.rate"),
                    format!(
                        "{rate} is above {}, the largest rate pingress counts",
                        bounds::MAX_RATE
                    ),
                )
                .with_hint("a limit that high limits nothing: remove it instead");
            None
        }
        Some(rate) if rate > 0 => Some(rate),
        Some(_) => {
            report
                .error(&format!("{field}.rate"), "rate must be at least 1")
                .with_hint("to refuse all requests, use a Mapping without an upstream instead");
            None
        }
        None => {
            report.error(&format!("{field}.rate"), "rate is required");
            None
        }
    }
}

/// The required `unit` the rate is counted per.
fn unit(spec: &LimitSpec, field: &str, report: &mut Reporter) -> Option<Unit> {
    match spec.unit.as_deref() {
        Some(text) => {
            let unit = Unit::parse(text);
            if unit.is_none() {
                report.error(
                    &format!("{field}.unit"),
                    format!("{text:?} is not second, minute, hour or day"),
                );
            }
            unit
        }
        None => {
            report
                .error(&format!("{field}.unit"), "unit is required")
                .with_hint("second, minute, hour or day");
            None
        }
    }
}

pub(crate) fn pattern(
    items: &[BTreeMap<String, String>],
    field: &str,
    report: &mut Reporter,
) -> Option<Vec<PatternItem>> {
    let mut ok = true;
    let pattern = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            if item.is_empty() {
                report
                    .error(
                        &format!("{field}[{i}]"),
                        "an empty pattern item matches nothing",
                    )
                    .with_hint("write {key: value}; a value of \"*\" or \"\" matches any value");
                ok = false;
            }
            item.iter()
                .map(|(key, value)| {
                    let any = value.is_empty() || value == "*";
                    (key.clone(), (!any).then(|| value.clone()))
                })
                .collect()
        })
        .collect();
    ok.then_some(pattern)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key_coverage::{document, validate_yaml, Coverage};

    /// The evaluated limits and Redis settings of `kind` with `spec`.
    fn rate_limits(kind: &str, spec: &str) -> (String, Vec<Diagnostic>) {
        let yaml = document(kind, "r", spec);
        let (model, diags) = validate_yaml(&yaml, &crate::filters::Registry::default());
        (format!("{:?}", model.rate_limits), diags)
    }

    /// Each RateLimitService key changes where and how counters are kept,
    /// or is warned about.
    #[test]
    fn every_rate_limit_service_key_is_used_or_warned() {
        Coverage {
            base: "service: redis://127.0.0.1:6379\nambassador_id: [default]",
            listed: SERVICE_FIELDS,
            later: SERVICE_LATER,
            samples: &[
                ("service", "", "service: redis://127.0.0.1:6380"),
                ("protocol_version", "", "protocol_version: v2"),
                ("domain", "", "domain: other"),
                ("timeout_ms", "", "timeout_ms: 100"),
                ("failure_mode_deny", "", "failure_mode_deny: true"),
                ("ambassador_id", "", "ambassador_id: [other]"),
            ],
            // Redis is spoken in cleartext only.
            refused: &[("tls", "tls: true")],
            specs: &[("", &RateLimitServiceSpec::default())],
        }
        .check(|spec| rate_limits("RateLimitService", spec));
    }

    /// Each RateLimit key, and each key of its limits, changes the limits
    /// evaluated or is warned about; Edge Stack's keys that pingress has
    /// no equivalent for are refused.
    #[test]
    fn every_rate_limit_key_is_used_or_warned() {
        let limit: LimitSpec = serde_yaml::from_str("{}").unwrap();
        Coverage {
            base: "domain: ambassador\n\
                   limits: [{pattern: [{generic_key: a}], rate: 10, unit: minute}]\n\
                   ambassador_id: [default]",
            samples: &[
                ("domain", "", "domain: other"),
                (
                    "limits",
                    "",
                    "limits: [{}, {pattern: [{generic_key: b}], rate: 5, unit: second}]",
                ),
                ("limits.name", "", "limits: [{name: n}]"),
                ("limits.action", "", "limits: [{action: LogOnly}]"),
                (
                    "limits.pattern",
                    "",
                    "limits: [{pattern: [{generic_key: b}]}]",
                ),
                ("limits.rate", "", "limits: [{rate: 20}]"),
                ("limits.unit", "", "limits: [{unit: hour}]"),
                ("ambassador_id", "", "ambassador_id: [other]"),
            ],
            refused: &[
                ("limits.burstFactor", "limits: [{burstFactor: 2}]"),
                (
                    "limits.injectRequestHeaders",
                    "limits: [{injectRequestHeaders: []}]",
                ),
                (
                    "limits.injectResponseHeaders",
                    "limits: [{injectResponseHeaders: []}]",
                ),
                ("limits.errorResponse", "limits: [{errorResponse: {}}]"),
            ],
            specs: &[("", &RateLimitSpec::default()), ("limits.", &limit)],
            ..Coverage::default()
        }
        .check(|spec| rate_limits("RateLimit", spec));
    }
}
