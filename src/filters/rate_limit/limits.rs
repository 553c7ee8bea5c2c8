//! `kind: RateLimit` (Edge Stack's shape: a domain and limits whose
//! patterns match label groups) and `kind: RateLimitService`, which in
//! pingress names a Redis server that replicas share counters through.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use openssl::sha::Sha256;
use serde::Deserialize;
use serde_yaml::Value;

use super::labels::Entry;
use crate::config::bounds;
use crate::config::diagnostics::{Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::StringOrList;
use crate::model::spec::{check_unknown_fields, parse_section};
use crate::model::{count, ModuleSettings};
use crate::upstream::service::redacted;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Second,
    Minute,
    Hour,
    Day,
}

impl Unit {
    fn parse(text: &str) -> Option<Unit> {
        match text.to_ascii_lowercase().as_str() {
            "second" => Some(Unit::Second),
            "minute" => Some(Unit::Minute),
            "hour" => Some(Unit::Hour),
            "day" => Some(Unit::Day),
            _ => None,
        }
    }

    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
        }
    }
}

/// One item of a pattern: `key: value` pairs of which any may match the
/// label at that position; `None` matches any value of the key.
type PatternItem = Vec<(String, Option<String>)>;

/// One limit of a RateLimit.
#[derive(Debug)]
pub(crate) struct Limit {
    /// `name`, else `<RateLimit name>.<namespace>-<index>` as Edge Stack
    /// names it.
    pub name: String,
    /// `action: LogOnly` limits only log.
    pub enforce: bool,
    pattern: Vec<PatternItem>,
    pub rate: u64,
    pub unit: Unit,
    /// What every bucket key of this limit starts with: the domain, the
    /// name, and the rate, so a changed rate starts from fresh counters.
    key_prefix: String,
}

impl Limit {
    /// Edge Stack's rule: the group must start with the pattern's labels,
    /// in order.
    fn matches(&self, entries: &[Entry<'_>]) -> bool {
        self.pattern.len() <= entries.len()
            && self
                .pattern
                .iter()
                .zip(entries)
                .all(|(item, (key, value))| {
                    item.iter()
                        .any(|(k, v)| k == key && v.as_deref().is_none_or(|v| v == value.as_ref()))
                })
    }

    /// The counter this group's request counts against: one per distinct
    /// set of values of the labels the pattern covers (so a `remote_address:
    /// "*"` item gives each client its own). Lengths prefix every part, so
    /// no two label sets share a key.
    pub fn bucket_key(&self, entries: &[Entry<'_>]) -> BucketKey {
        let mut digest = Sha256::new();
        digest.update(self.key_prefix.as_bytes());
        for (k, v) in entries.iter().take(self.pattern.len()) {
            for part in [k.as_bytes(), v.as_bytes()] {
                digest.update(&(part.len() as u64).to_le_bytes());
                digest.update(part);
            }
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.finish()[..16]);
        BucketKey(key)
    }

    /// What a limit's buckets are kept by across reloads: the domain, the
    /// name and the rate.
    pub(crate) fn identity(&self) -> &str {
        &self.key_prefix
    }
}

/// A bucket's name: 128 bits of a SHA-256 of the limit and the label
/// values, so a bucket costs the same however long the values a client
/// sends, and no client can choose values that share another's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BucketKey(pub [u8; 16]);

impl BucketKey {
    /// The key's hex form, 32 characters.
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(32);
        for byte in self.0 {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

/// Where counters live when replicas share them. `Debug` leaves the URL
/// out: it may hold a password, and the model is debug-printed.
#[derive(Clone)]
pub(crate) struct RedisSettings {
    pub url: String,
    /// `host:port`, for logs: the URL may hold a password.
    pub address: String,
    /// Each Redis call's bound (`timeout_ms`).
    pub timeout: Duration,
    /// 500 instead of letting requests through when Redis cannot answer.
    pub failure_mode_deny: bool,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("failure_mode_deny", &self.failure_mode_deny)
            .finish_non_exhaustive()
    }
}

/// Every limit of the label domain pingress evaluates.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// The RateLimitService's `domain`, else the Module's
    /// `default_label_domain`: only labels of this domain are evaluated.
    pub domain: String,
    pub(crate) limits: Vec<Arc<Limit>>,
    pub(crate) redis: Option<RedisSettings>,
}

impl RateLimits {
    /// The limit for a label group: of those whose pattern matches, the one
    /// with the longest pattern; the first defined among equals.
    /// The most specific limit of the group, and its place in `limits`.
    pub(crate) fn find(&self, entries: &[Entry<'_>]) -> Option<(usize, &Arc<Limit>)> {
        let mut best: Option<(usize, &Arc<Limit>)> = None;
        for (index, limit) in self.limits.iter().enumerate() {
            if limit.matches(entries)
                && best.is_none_or(|(_, b)| limit.pattern.len() > b.pattern.len())
            {
                best = Some((index, limit));
            }
        }
        best
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

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
        report.warning(
            "spec.protocol_version",
            format!("{version:?} ignored: pingress speaks Redis, not rls.proto"),
        );
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
    let enforce = match spec
        .action
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("enforce") => true,
        Some("logonly") => false,
        Some(_) => {
            report
                .error(&format!("{field}.action"), "action is Enforce or LogOnly")
                .with_hint("LogOnly logs requests over the limit and lets them through");
            ok = false;
            true
        }
    };
    let pattern = match spec.pattern.as_deref() {
        Some(items) if !items.is_empty() => pattern(items, &format!("{field}.pattern"), report),
        _ => {
            report
                .error(&format!("{field}.pattern"), "a limit needs a pattern")
                .with_hint("e.g. pattern: [{generic_key: my-api}, {remote_address: \"*\"}]");
            None
        }
    };
    let rate = match spec.rate {
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
    };
    let unit = match spec.unit.as_deref() {
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
    };
    let (pattern, rate, unit) = (pattern?, rate?, unit?);
    if !ok {
        return None;
    }
    let name = spec.name.clone().unwrap_or(default_name);
    let key_prefix = format!(
        "{}:{domain}{}:{name}{rate}/{}|",
        domain.len(),
        name.len(),
        unit.seconds()
    );
    Some(Arc::new(Limit {
        name,
        enforce,
        pattern,
        rate,
        unit,
        key_prefix,
    }))
}

fn pattern(
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
    use std::borrow::Cow;

    fn limit_of(pattern: &str) -> Limit {
        let items: Vec<BTreeMap<String, String>> = serde_yaml::from_str(pattern).unwrap();
        let mut diags = Vec::new();
        let location = crate::config::diagnostics::Location::File("t".into());
        let mut report = Reporter::new(location, &mut diags);
        Limit {
            name: pattern.into(),
            enforce: true,
            pattern: super::pattern(&items, "p", &mut report).unwrap(),
            rate: 1,
            unit: Unit::Minute,
            key_prefix: "p|".into(),
        }
    }

    fn entries<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Entry<'a>> {
        pairs.iter().map(|(k, v)| (*k, Cow::Borrowed(*v))).collect()
    }

    #[test]
    fn patterns_match_a_leading_run_of_labels() {
        let limit = limit_of("[{generic_key: api}, {remote_address: '*'}]");
        let group = entries(&[("generic_key", "api"), ("remote_address", "1.2.3.4")]);
        assert!(limit.matches(&group));
        let longer = entries(&[
            ("generic_key", "api"),
            ("remote_address", "1.2.3.4"),
            ("user", "x"),
        ]);
        assert!(limit.matches(&longer));
        assert!(!limit.matches(&entries(&[("generic_key", "api")])));
        assert!(!limit.matches(&entries(&[
            ("remote_address", "1.2.3.4"),
            ("generic_key", "api")
        ])));
        assert!(!limit.matches(&entries(&[
            ("generic_key", "web"),
            ("remote_address", "1.2.3.4")
        ])));
        // Any of an item's pairs may match.
        let either = limit_of("[{a: '1', b: ''}]");
        assert!(either.matches(&entries(&[("a", "1")])));
        assert!(either.matches(&entries(&[("b", "anything")])));
        assert!(!either.matches(&entries(&[("a", "2")])));
    }

    #[test]
    fn buckets_split_by_the_values_the_pattern_covers() {
        let limit = limit_of("[{generic_key: api}, {remote_address: '*'}]");
        let a = entries(&[
            ("generic_key", "api"),
            ("remote_address", "1.1.1.1"),
            ("x", "1"),
        ]);
        let a2 = entries(&[
            ("generic_key", "api"),
            ("remote_address", "1.1.1.1"),
            ("x", "2"),
        ]);
        let b = entries(&[("generic_key", "api"), ("remote_address", "2.2.2.2")]);
        assert_eq!(limit.bucket_key(&a), limit.bucket_key(&a2));
        assert_ne!(limit.bucket_key(&a), limit.bucket_key(&b));
        // Lengths keep "ab"+"c" apart from "a"+"bc".
        let one = limit_of("[{k: '*'}, {l: '*'}]");
        assert_ne!(
            one.bucket_key(&entries(&[("k", "ab"), ("l", "c")])),
            one.bucket_key(&entries(&[("k", "a"), ("l", "bc")]))
        );
    }

    #[test]
    fn the_longest_matching_pattern_wins() {
        let limits = RateLimits {
            domain: "d".into(),
            limits: vec![
                Arc::new(limit_of("[{generic_key: api}]")),
                Arc::new(limit_of("[{generic_key: api}, {remote_address: '*'}]")),
                Arc::new(limit_of("[{generic_key: other}]")),
            ],
            redis: None,
        };
        let group = entries(&[("generic_key", "api"), ("remote_address", "1.1.1.1")]);
        assert_eq!(limits.find(&group).unwrap().1.pattern.len(), 2);
        let short = entries(&[("generic_key", "api")]);
        assert_eq!(limits.find(&short).unwrap().1.pattern.len(), 1);
        assert!(limits.find(&entries(&[("generic_key", "none")])).is_none());
    }
}
