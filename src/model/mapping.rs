//! Mapping validation: matchers compiled, service parsed, TLSContext
//! resolved, Module defaults applied.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use regex::Regex;
use serde_yaml::Value;

use crate::config::diagnostics::{Code, Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::{
    AddHeaderValue, CircuitBreakerSpec, CookieSpec, HealthCheckSpec, KeepaliveSpec,
    LoadBalancerSpec, MappingSpec, MappingTls, MatchValue, OrderedMap, RetryPolicySpec,
    StringOrList,
};
use crate::filters::cors::{items, CorsPolicy, CorsSpec};
use crate::filters::rate_limit::labels::Labels;
use crate::routing::headers::HeaderEdits;
use crate::routing::matchers::{
    full_match_regex, full_match_value_regex, search_regex, AuthorityMatch, HostGlob, PathMatch,
    ValueMatch,
};
use crate::routing::redirect::{Redirect, RedirectPath, REDIRECT_CODES};
use crate::tls::TlsContext;
use crate::upstream::balancer::{Cookie, HashOn, Policy};
use crate::upstream::breaker::Thresholds;
use crate::upstream::cluster::{ConnectionOptions, Keepalive};
use crate::upstream::dns::DnsOptions;
use crate::upstream::health::HealthCheck;
use crate::upstream::retry::{conditions, parse_duration, RetryPolicy};
use crate::upstream::service::{redacted, ServiceAddr};

use super::edge::{add_headers, header_names, unlimited_if_zero};
use super::health::health_check;
use super::rate_labels::{parse_labels, with_defaults};
use super::spec::{check_unknown_fields, parse_section, parse_value};
use super::{count, MappingDefaults, ModuleSettings, ResolverKind, Resolvers, TlsContexts};

const SUPPORTED: &[&str] = &[
    "prefix",
    "prefix_regex",
    "prefix_exact",
    "case_sensitive",
    "hostname",
    "host",
    "host_regex",
    "method",
    "method_regex",
    "headers",
    "regex_headers",
    "query_parameters",
    "regex_query_parameters",
    "precedence",
    "rewrite",
    "regex_rewrite",
    "host_rewrite",
    "auto_host_rewrite",
    "service",
    "tls",
    "timeout_ms",
    "connect_timeout_ms",
    "idle_timeout_ms",
    "add_request_headers",
    "add_response_headers",
    "remove_request_headers",
    "remove_response_headers",
    "add_linkerd_headers",
    "grpc",
    "circuit_breakers",
    "retry_policy",
    "cors",
    "bypass_auth",
    "host_redirect",
    "path_redirect",
    "prefix_redirect",
    "regex_redirect",
    "redirect_response_code",
    "weight",
    "labels",
    "resolver",
    "load_balancer",
    "health_checks",
    "dns_type",
    "respect_dns_ttl",
    "enable_ipv4",
    "enable_ipv6",
    "cluster_idle_timeout_ms",
    "cluster_max_connection_lifetime_ms",
    "allow_upgrade",
    "use_websocket",
    "shadow",
    "keepalive",
    "ambassador_id",
];

/// Emissary Mapping fields that later pingress work implements.
const LATER: &[&str] = &[
    "auth_context_extensions",
    "priority",
    "cluster_tag",
    "stats_name",
    "error_response_overrides",
    "bypass_error_response_overrides",
    "outlier_detection",
    "docs",
    "envoy_override",
    "modules",
    "v2ExplicitTLS",
    "v2BoolHeaders",
    "v2BoolQueryParameters",
];

#[derive(Debug, Clone)]
pub enum Rewrite {
    /// `rewrite: ""`, or a regex_rewrite that did not match.
    Keep,
    /// Replace the matched prefix.
    Prefix(String),
    Regex {
        regex: Regex,
        substitution: String,
    },
}

/// Which Hosts a Mapping may join (§2.2).
#[derive(Debug, Clone)]
pub enum Association {
    Hostname(HostGlob),
    /// `host_regex` Mappings join every Host.
    Everywhere,
    /// Only Hosts whose mappingSelector matches the Mapping's labels.
    SelectorOnly,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub id: ResourceRef,
    /// `name.namespace`, as logs and errors name a Mapping.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub association: Association,
    pub path: PathMatch,
    pub prefix: String,
    pub authority: Option<(AuthorityMatch, String)>,
    pub method: Option<ValueMatch>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub precedence: i64,
    pub weight: Option<u32>,
    pub rewrite: Rewrite,
    pub host_rewrite: Option<HeaderValue>,
    pub auto_host_rewrite: bool,
    pub service: ServiceAddr,
    pub resolver: ResolverKind,
    pub load_balancer: Policy,
    pub health_check: Option<HealthCheck>,
    /// How the service resolver looks the service up.
    pub dns: DnsOptions,
    pub connections: ConnectionOptions,
    pub originate_tls: bool,
    pub tls: Option<Arc<TlsContext>>,
    /// 0 disables.
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// `grpc: true`: HTTP/2 to the upstream (h2c in cleartext).
    pub grpc: bool,
    pub breaker: Thresholds,
    pub retry: Option<RetryPolicy>,
    pub idle_timeout_ms: Option<u64>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub add_linkerd_headers: bool,
    /// Keys that every Mapping of a canary group must agree on (§2.6).
    pub group_invariants: Vec<(&'static str, String)>,
    /// `host_redirect`: answer with this redirect instead of proxying.
    pub redirect: Option<Redirect>,
    /// The Mapping's `cors`, else the Module's.
    pub cors: Option<Arc<CorsPolicy>>,
    /// Skip the AuthService and FilterPolicy filters.
    pub bypass_auth: bool,
    /// Rate-limit label groups by domain, the Module's defaults included.
    pub(crate) rate_labels: Labels,
    /// Protocols a request may upgrade to (`allow_upgrade`, `use_websocket`),
    /// lower-cased.
    pub allow_upgrade: Vec<String>,
    /// Mirrors its group's requests instead of taking a share (§2.7).
    pub shadow: bool,
}

pub fn validate_all(
    raws: &[&RawResource],
    module: &ModuleSettings,
    contexts: &TlsContexts,
    resolvers: &Resolvers,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> Vec<Mapping> {
    let mut mappings = Vec::new();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(spec) = parse_section::<MappingSpec>(raw, "spec", &mut report) else {
            continue;
        };
        let suggested = check_unknown_fields(&spec.other, "spec", SUPPORTED, LATER, &mut report);
        let mapping = validate(
            raw,
            &spec,
            module,
            contexts,
            resolvers,
            &suggested,
            &mut report,
        );
        if let (Some(mapping), false) = (mapping, report.has_errors()) {
            count(accepted, "Mapping");
            mappings.push(mapping);
        }
    }
    mappings
}

/// One Mapping, assembled once every part of it is known. The steps run in
/// the order their diagnostics are reported; a step that returns `None`
/// leaves nothing the later ones could check.
fn validate(
    raw: &RawResource,
    spec: &MappingSpec,
    module: &ModuleSettings,
    contexts: &TlsContexts,
    resolvers: &Resolvers,
    suggested: &[&str],
    report: &mut Reporter,
) -> Option<Mapping> {
    let matched = request_match(raw, spec, suggested, report)?;
    let rewrite = rewrite(spec, report)?;
    let to = destination(raw, spec, module, contexts, suggested, report)?;
    let host_rewrite = host_rewrite(spec, report)?;
    let weight = weight(spec, report)?;
    let policies = policies(spec, module, matched.case_sensitive, &to, report);
    let upstream = match to.redirect {
        Some(_) => Upstream::for_redirect(),
        None => upstream_choice(spec, module, resolvers, report)?,
    };
    Some(Mapping {
        id: raw.id.clone(),
        name: format!("{}.{}", raw.id.name, raw.id.namespace),
        labels: raw.labels.clone(),
        association: matched.association,
        path: matched.path,
        prefix: matched.prefix,
        authority: matched.authority,
        method: matched.method,
        headers: matched.headers,
        query: matched.query,
        precedence: spec.precedence.unwrap_or(0),
        weight,
        rewrite,
        host_rewrite,
        auto_host_rewrite: spec.auto_host_rewrite.unwrap_or(false),
        service: to.service,
        resolver: upstream.resolver,
        load_balancer: upstream.load_balancer,
        health_check: upstream.health_check,
        dns: upstream.dns,
        connections: upstream.connections,
        originate_tls: to.originate_tls,
        tls: to.context,
        timeout_ms: spec.timeout_ms.unwrap_or(module.request_timeout_ms),
        connect_timeout_ms: policies.connect_timeout_ms,
        grpc: spec.grpc.unwrap_or(false),
        breaker: policies.breaker,
        retry: policies.retry,
        idle_timeout_ms: spec.idle_timeout_ms,
        request_headers: policies.request_headers,
        response_headers: policies.response_headers,
        add_linkerd_headers: spec
            .add_linkerd_headers
            .unwrap_or(module.add_linkerd_headers),
        group_invariants: policies.group_invariants,
        redirect: to.redirect,
        cors: policies.cors,
        bypass_auth: spec.bypass_auth.unwrap_or(false),
        rate_labels: policies.rate_labels,
        allow_upgrade: policies.allow_upgrade,
        shadow: spec.shadow.unwrap_or(false),
    })
}

/// Which requests a Mapping matches.
struct RequestMatch {
    case_sensitive: bool,
    prefix: String,
    path: PathMatch,
    authority: Option<(AuthorityMatch, String)>,
    association: Association,
    method: Option<ValueMatch>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

fn request_match(
    raw: &RawResource,
    spec: &MappingSpec,
    suggested: &[&str],
    report: &mut Reporter,
) -> Option<RequestMatch> {
    let case_sensitive = spec.case_sensitive.unwrap_or(true);
    let prefix = prefix(spec, suggested, report)?;
    let path = path_match(&prefix, spec, case_sensitive, report)?;
    let v2 = raw.api_version == "getambassador.io/v2";
    let (authority, association) = authority(spec, v2, report)?;
    let method = method(spec, report)?;
    let headers = header_matchers(spec, report);
    let query = value_matchers(
        &spec.query_parameters,
        &spec.regex_query_parameters,
        "query_parameters",
        report,
    );
    Some(RequestMatch {
        case_sensitive,
        prefix,
        path,
        authority,
        association,
        method,
        headers,
        query,
    })
}

/// Where a Mapping sends what it matches: its service, with the TLS it is
/// reached with, or the target of its `host_redirect`.
struct Destination {
    context: Option<Arc<TlsContext>>,
    redirect: Option<Redirect>,
    service: ServiceAddr,
    originate_tls: bool,
}

fn destination(
    raw: &RawResource,
    spec: &MappingSpec,
    module: &ModuleSettings,
    contexts: &TlsContexts,
    suggested: &[&str],
    report: &mut Reporter,
) -> Option<Destination> {
    let (context, tls_set) = origination(spec.tls.as_ref(), "Mapping", contexts, report)?;
    let redirect = redirect(spec, report)?;
    // A redirect's service is a target authority, not a Kubernetes name.
    let namespace = (!module.use_ambassador_namespace && redirect.is_none())
        .then_some(raw.id.namespace.as_str());
    let (service, originate_tls) = upstream_service(
        spec,
        namespace,
        context.as_deref(),
        tls_set,
        suggested,
        report,
    )?;
    Some(Destination {
        context,
        redirect,
        service,
        originate_tls,
    })
}

/// How a Mapping proxies: header edits, connections, limits, CORS,
/// upgrades and retries, each the Mapping's or else the Module's.
struct Policies {
    request_headers: HeaderEdits,
    response_headers: HeaderEdits,
    connect_timeout_ms: u64,
    breaker: Thresholds,
    group_invariants: Vec<(&'static str, String)>,
    rate_labels: Labels,
    cors: Option<Arc<CorsPolicy>>,
    allow_upgrade: Vec<String>,
    retry: Option<RetryPolicy>,
}

fn policies(
    spec: &MappingSpec,
    module: &ModuleSettings,
    case_sensitive: bool,
    to: &Destination,
    report: &mut Reporter,
) -> Policies {
    let (request_headers, response_headers) = header_edits(spec, &module.defaults, report);
    let connect_timeout_ms = spec.connect_timeout_ms.unwrap_or(3000);
    let breaker = match &spec.circuit_breakers {
        Some(list) => breaker_thresholds(list, "spec.circuit_breakers", report),
        None => module.circuit_breakers,
    };
    let group_invariants = group_invariants(
        spec,
        case_sensitive,
        to.redirect.is_some(),
        &breaker,
        connect_timeout_ms,
    );
    let rate_labels = rate_labels(spec, module, report);
    let cors = match &spec.cors {
        Some(value) => cors(value, "spec.cors", report),
        None => module.cors.clone(),
    };
    let allow_upgrade = upgrades(spec, report);
    let retry = match &spec.retry_policy {
        Some(policy) => retry_policy(policy, "spec.retry_policy", report),
        None => module.retry_policy,
    };
    Policies {
        request_headers,
        response_headers,
        connect_timeout_ms,
        breaker,
        group_invariants,
        rate_labels,
        cors,
        allow_upgrade,
        retry,
    }
}

/// The required `prefix`. A missing one is not reported again when an
/// unknown field was already suggested as it (a misspelt `prefx`).
fn prefix(spec: &MappingSpec, suggested: &[&str], report: &mut Reporter) -> Option<String> {
    match spec.prefix.as_deref() {
        Some(p) if !p.is_empty() => Some(p.to_string()),
        _ => {
            if !suggested.contains(&"prefix") {
                report.error("spec.prefix", "prefix is required");
            }
            None
        }
    }
}

/// How `prefix` meets the request path: `prefix_regex` makes it a regex
/// over the whole path, `prefix_exact` the whole path itself, and neither
/// a prefix of it.
fn path_match(
    prefix: &str,
    spec: &MappingSpec,
    case_sensitive: bool,
    report: &mut Reporter,
) -> Option<PathMatch> {
    match (
        spec.prefix_regex.unwrap_or(false),
        spec.prefix_exact.unwrap_or(false),
    ) {
        (true, true) => {
            report.error(
                "spec.prefix_exact",
                "prefix_regex and prefix_exact exclude each other",
            );
            None
        }
        (true, false) => match full_match_regex(prefix, !case_sensitive) {
            Ok(regex) => Some(PathMatch::Regex(regex)),
            Err(e) => {
                report.error("spec.prefix", e.to_string()).with_hint(
                    "with prefix_regex: true the prefix is a regular expression (RE2 syntax) \
                     that must match the whole path",
                );
                None
            }
        },
        (false, true) => Some(PathMatch::Exact {
            path: prefix.to_string(),
            case_sensitive,
        }),
        (false, false) => {
            if !prefix.starts_with('/') {
                report.warning(
                    "spec.prefix",
                    "a prefix without a leading / matches no request path",
                );
            }
            Some(PathMatch::Prefix {
                prefix: prefix.to_string(),
                case_sensitive,
            })
        }
    }
}

/// `method`, compared upper-cased, or with `method_regex` a regex over it.
/// `Some(None)`: any method.
fn method(spec: &MappingSpec, report: &mut Reporter) -> Option<Option<ValueMatch>> {
    match (&spec.method, spec.method_regex.unwrap_or(false)) {
        (None, _) => Some(None),
        (Some(m), false) => Some(Some(ValueMatch::Exact(m.to_ascii_uppercase()))),
        (Some(m), true) => match full_match_regex(m, false) {
            Ok(r) => Some(Some(ValueMatch::Regex(r))),
            Err(e) => {
                report.error("spec.method", e.to_string());
                None
            }
        },
    }
}

/// `headers` and `regex_headers`; a name that cannot be a header name is
/// reported and its matcher left out.
fn header_matchers(spec: &MappingSpec, report: &mut Reporter) -> Vec<(HeaderName, ValueMatch)> {
    let mut headers = Vec::new();
    for (name, matcher) in value_matchers(&spec.headers, &spec.regex_headers, "headers", report) {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => headers.push((header, matcher)),
            Err(_) => {
                report.error(&format!("spec.headers.{name}"), "not a valid header name");
            }
        }
    }
    headers
}

/// The upstream path: `regex_rewrite` wins over `rewrite`, and a Mapping
/// with neither rewrites its prefix to `/`, as Emissary does.
fn rewrite(spec: &MappingSpec, report: &mut Reporter) -> Option<Rewrite> {
    Some(match (&spec.regex_rewrite, &spec.rewrite) {
        (Some(rr), rewrite) => {
            if rewrite.as_deref().is_some_and(|r| !r.is_empty()) {
                report
                    .warning(
                        "spec.rewrite",
                        "regex_rewrite is set, so rewrite is ignored",
                    )
                    .with_code(Code::KeyIgnored);
            }
            match search_regex(&rr.pattern) {
                Ok(regex) => Rewrite::Regex {
                    regex,
                    substitution: envoy_substitution(&rr.substitution),
                },
                Err(e) => {
                    report.error("spec.regex_rewrite.pattern", e.to_string());
                    return None;
                }
            }
        }
        (None, Some(r)) if r.is_empty() => Rewrite::Keep,
        (None, Some(r)) => {
            if !r.starts_with('/') {
                report.warning(
                    "spec.rewrite",
                    "a rewrite without a leading / produces an invalid upstream path",
                );
            }
            Rewrite::Prefix(r.clone())
        }
        (None, None) => Rewrite::Prefix("/".into()),
    })
}

/// The service, and whether TLS is originated to it: `tls:` (`tls_set`)
/// or an https:// service originates it. The context that originates it
/// must be able to verify the service's certificate.
fn upstream_service(
    spec: &MappingSpec,
    namespace: Option<&str>,
    context: Option<&TlsContext>,
    tls_set: bool,
    suggested: &[&str],
    report: &mut Reporter,
) -> Option<(ServiceAddr, bool)> {
    let text = spec.service.as_deref();
    let service = service(text, tls_set, namespace, suggested, report)?;
    if tls_set && !service.https && text.is_some_and(|s| s.starts_with("http://")) {
        report.warning(
            "spec.service",
            "service says http:// but tls is set: TLS is originated anyway, as Emissary does",
        );
    }
    if !verifiable(context, &service, report) {
        return None;
    }
    let originate_tls = tls_set || service.https;
    Some((service, originate_tls))
}

/// `host_rewrite`, which must be sendable as a Host header. `Some(None)`:
/// the Host is not rewritten.
fn host_rewrite(spec: &MappingSpec, report: &mut Reporter) -> Option<Option<HeaderValue>> {
    match spec.host_rewrite.as_deref() {
        None | Some("") => Some(None),
        Some(h) => match HeaderValue::from_str(h) {
            Ok(v) => Some(Some(v)),
            Err(_) => {
                report.error("spec.host_rewrite", "not a valid Host header value");
                None
            }
        },
    }
}

/// `weight`, a percentage of its canary group's requests.
fn weight(spec: &MappingSpec, report: &mut Reporter) -> Option<Option<u32>> {
    match spec.weight {
        Some(weight) if weight > 100 => {
            report.error("spec.weight", format!("weight {weight} is above 100"));
            None
        }
        weight => Some(weight),
    }
}

/// The request and the response header edits.
fn header_edits(
    spec: &MappingSpec,
    defaults: &MappingDefaults,
    report: &mut Reporter,
) -> (HeaderEdits, HeaderEdits) {
    let request = direction_edits(
        spec.add_request_headers.as_ref(),
        spec.remove_request_headers.as_ref(),
        (&defaults.request, &defaults.remove_request),
        "request",
        report,
    );
    let response = direction_edits(
        spec.add_response_headers.as_ref(),
        spec.remove_response_headers.as_ref(),
        (&defaults.response, &defaults.remove_response),
        "response",
        report,
    );
    (request, response)
}

/// `add_{direction}_headers` and `remove_{direction}_headers`. Each the
/// Mapping leaves out is the Module's default, which a Mapping's own
/// setting replaces rather than extends.
fn direction_edits(
    add: Option<&OrderedMap<AddHeaderValue>>,
    remove: Option<&StringOrList>,
    (default_add, default_remove): (&Option<HeaderEdits>, &Option<Vec<HeaderName>>),
    direction: &str,
    report: &mut Reporter,
) -> HeaderEdits {
    let mut edits = match add {
        Some(map) => add_headers(map, &format!("spec.add_{direction}_headers"), report),
        None => default_add.clone().unwrap_or_default(),
    };
    edits.remove = match remove {
        Some(list) => header_names(list, &format!("spec.remove_{direction}_headers"), report),
        None => default_remove.clone().unwrap_or_default(),
    };
    edits
}

/// The keys, with their values as text, that every Mapping of a canary
/// group must agree on: they shape the route or its cluster, which
/// the group shares.
fn group_invariants(
    spec: &MappingSpec,
    case_sensitive: bool,
    redirects: bool,
    breaker: &Thresholds,
    connect_timeout_ms: u64,
) -> Vec<(&'static str, String)> {
    vec![
        (
            "prefix_regex",
            format!("{:?}", spec.prefix_regex.unwrap_or(false)),
        ),
        (
            "prefix_exact",
            format!("{:?}", spec.prefix_exact.unwrap_or(false)),
        ),
        ("case_sensitive", format!("{case_sensitive}")),
        ("host_redirect", format!("{redirects}")),
        ("circuit_breakers", format!("{breaker:?}")),
        ("connect_timeout_ms", format!("{connect_timeout_ms}")),
        ("keepalive", format!("{:?}", spec.keepalive)),
        (
            "labels",
            serde_yaml::to_string(&spec.labels).unwrap_or_default(),
        ),
        (
            "bypass_auth",
            format!("{}", spec.bypass_auth.unwrap_or(false)),
        ),
    ]
}

/// `allow_upgrade`, with the legacy `use_websocket: true` adding `websocket`.
fn upgrades(spec: &MappingSpec, report: &mut Reporter) -> Vec<String> {
    let mut protocols = Vec::new();
    for (index, protocol) in spec.allow_upgrade.iter().flatten().enumerate() {
        let protocol = protocol.trim().to_ascii_lowercase();
        // The name is compared with the whole `Upgrade` header value.
        if protocol.is_empty() || !protocol.bytes().all(|b| b.is_ascii_graphic()) {
            report
                .error(
                    &format!("spec.allow_upgrade[{index}]"),
                    format!("{protocol:?} is not a protocol name"),
                )
                .with_hint("e.g. websocket or spdy/3.1");
        } else if !protocols.contains(&protocol) {
            protocols.push(protocol);
        }
    }
    if spec.use_websocket == Some(true) && !protocols.iter().any(|p| p == "websocket") {
        protocols.push("websocket".into());
    }
    protocols
}

/// The required `service` of a Mapping or TCPMapping. A missing one is not
/// reported again when an unknown field was already suggested as it.
pub(crate) fn service(
    text: Option<&str>,
    originate_tls: bool,
    namespace: Option<&str>,
    suggested: &[&str],
    report: &mut Reporter,
) -> Option<ServiceAddr> {
    let Some(text) = text else {
        if !suggested.contains(&"service") {
            report.error("spec.service", "service is required");
        }
        return None;
    };
    ServiceAddr::parse(text, originate_tls, namespace)
        .map_err(|e| {
            report
                .error("spec.service", e.to_string())
                .with_hint("the form is [scheme://]host[.namespace][:port]");
        })
        .ok()
}

/// The `tls:` of a Mapping or TCPMapping: the origination context, and
/// whether TLS is originated at all. `None` when the reference is an error.
pub(crate) fn origination(
    tls: Option<&MappingTls>,
    kind: &str,
    contexts: &TlsContexts,
    report: &mut Reporter,
) -> Option<(Option<Arc<TlsContext>>, bool)> {
    Some(match tls {
        None | Some(MappingTls::Enabled(false)) => (None, false),
        Some(MappingTls::Context(name)) if name.is_empty() => (None, false),
        Some(MappingTls::Enabled(true)) => (None, true),
        Some(MappingTls::Context(name)) => (
            Some(contexts.lookup(name, "spec.tls", &format!("this {kind}"), report)?),
            true,
        ),
    })
}

/// A context that verifies upstreams needs a name to verify the
/// certificate against; an IP address service gives none unless `sni` does.
pub(crate) fn verifiable(
    context: Option<&TlsContext>,
    service: &ServiceAddr,
    report: &mut Reporter,
) -> bool {
    let Some(ctx) = context else { return true };
    if ctx.ca.is_some() && ctx.sni.is_none() && service.is_ip() {
        report
            .error(
                "spec.tls",
                format!(
                    "TLSContext {} verifies upstreams, but {} is an IP address",
                    ctx.name, service.host
                ),
            )
            .with_hint("set `sni` on the TLSContext to the name in the upstream's certificate");
        return false;
    }
    true
}

/// The rate-limit label groups: the Mapping's own `labels`, each led by
/// the Module's `default_labels` of its domain.
fn rate_labels(spec: &MappingSpec, module: &ModuleSettings, report: &mut Reporter) -> Labels {
    let own = spec
        .labels
        .as_ref()
        .map(|value| parse_labels(value, "spec.labels", report))
        .unwrap_or_default();
    with_defaults(own, &module.default_labels)
}

/// How a Mapping reaches its service: the Mapping fields that only a
/// proxying Mapping has a say in.
struct Upstream {
    resolver: ResolverKind,
    load_balancer: Policy,
    health_check: Option<HealthCheck>,
    dns: DnsOptions,
    connections: ConnectionOptions,
}

impl Upstream {
    /// A redirect answers the client itself and never connects upstream,
    /// so none of its upstream keys is read.
    fn for_redirect() -> Upstream {
        Upstream {
            resolver: ResolverKind::Service,
            load_balancer: Policy::RoundRobin,
            health_check: None,
            dns: DnsOptions::default(),
            connections: ConnectionOptions::default(),
        }
    }
}

/// The resolver, the load balancer, DNS, connection reuse and health
/// checks of a Mapping that proxies, each the Module's default where the
/// Mapping sets none.
fn upstream_choice(
    spec: &MappingSpec,
    module: &ModuleSettings,
    resolvers: &Resolvers,
    report: &mut Reporter,
) -> Option<Upstream> {
    let (name, resolver) = resolver(spec, module, resolvers, report)?;
    let load_balancer = mapping_load_balancer(spec, module, (name, resolver), report)?;
    let dns = dns_options(spec, module, report)?;
    let connections = connection_options(spec, module, report)?;
    let health_check = match &spec.health_checks {
        Some(list) => endpoint_health_check(list, (name, resolver), report)?,
        None => None,
    };
    Some(Upstream {
        resolver,
        load_balancer,
        health_check,
        dns,
        connections,
    })
}

/// The resolver the Mapping names, else the Module's default, with its
/// name for the diagnostics of the keys that depend on it. A Consul
/// resolver is refused: nothing here could ask Consul.
fn resolver<'a>(
    spec: &'a MappingSpec,
    module: &'a ModuleSettings,
    resolvers: &Resolvers,
    report: &mut Reporter,
) -> Option<(&'a str, ResolverKind)> {
    let name = spec.resolver.as_deref().unwrap_or(&module.resolver);
    let whose = match spec.resolver {
        Some(_) => "",
        None => "the Module's default ",
    };
    match resolvers.0.get(name) {
        Some(ResolverKind::Consul) => {
            report
                .error(
                    "spec.resolver",
                    format!(
                        "{whose}resolver {name} is a ConsulResolver: pingress has no Consul client"
                    ),
                )
                .with_hint(
                    "list the service's addresses as Kubernetes Endpoints and use a \
                     KubernetesEndpointResolver",
                );
            None
        }
        Some(kind) => Some((name, *kind)),
        None => {
            report
                .error(
                    "spec.resolver",
                    format!("{whose}resolver {name:?} is not defined"),
                )
                .with_hint(format!(
                    "defined resolvers: {}",
                    resolvers.names().join(", ")
                ));
            None
        }
    }
}

/// A policy picks among endpoints, so only an endpoint resolver has one;
/// a resolver of service names connects to the one name it has.
fn mapping_load_balancer(
    spec: &MappingSpec,
    module: &ModuleSettings,
    (name, resolver): (&str, ResolverKind),
    report: &mut Reporter,
) -> Option<Policy> {
    match (&spec.load_balancer, resolver) {
        (None, ResolverKind::Endpoint) => Some(module.load_balancer.clone().unwrap_or_default()),
        // The Module's default applies where it can: a Mapping that did not
        // ask for a policy is not made invalid by it.
        (None, _) => Some(Policy::RoundRobin),
        (Some(_), ResolverKind::Service | ResolverKind::Consul) => {
            report
                .error(
                    "spec.load_balancer",
                    format!("load_balancer needs an endpoint resolver; resolver {name} resolves the service name"),
                )
                .with_hint("set resolver to a KubernetesEndpointResolver, e.g. kubernetes-endpoint");
            None
        }
        (Some(lb), ResolverKind::Endpoint) => load_balancer(lb, "spec.load_balancer", report),
    }
}

/// `dns_type`, `respect_dns_ttl`, `enable_ipv4` and `enable_ipv6`; at least
/// one address family must stay usable.
fn dns_options(
    spec: &MappingSpec,
    module: &ModuleSettings,
    report: &mut Reporter,
) -> Option<DnsOptions> {
    let logical = match spec.dns_type.as_deref() {
        None | Some("strict_dns") => false,
        Some("logical_dns") => true,
        Some(other) => {
            report
                .error("spec.dns_type", format!("unknown dns_type {other:?}"))
                .with_hint("strict_dns (every address) or logical_dns (the first address)");
            return None;
        }
    };
    let dns = DnsOptions {
        ipv4: spec.enable_ipv4.unwrap_or(module.enable_ipv4),
        ipv6: spec.enable_ipv6.unwrap_or(module.enable_ipv6),
        respect_ttl: spec.respect_dns_ttl.unwrap_or(false),
        logical,
    };
    if !dns.ipv4 && !dns.ipv6 {
        report.error(
            "spec.enable_ipv4",
            "enable_ipv4 and enable_ipv6 are both false: no address could be used",
        );
        return None;
    }
    Some(dns)
}

/// `cluster_idle_timeout_ms`, `cluster_max_connection_lifetime_ms` and
/// `keepalive`, each replacing the Module's.
fn connection_options(
    spec: &MappingSpec,
    module: &ModuleSettings,
    report: &mut Reporter,
) -> Option<ConnectionOptions> {
    let defaults = &module.connections;
    Some(ConnectionOptions {
        idle_timeout: match spec.cluster_idle_timeout_ms {
            Some(ms) => unlimited_if_zero(Some(ms)),
            None => defaults.idle_timeout,
        },
        max_lifetime: match spec.cluster_max_connection_lifetime_ms {
            Some(ms) => unlimited_if_zero(Some(ms)),
            None => defaults.max_lifetime,
        },
        keepalive: match &spec.keepalive {
            Some(spec) => Some(keepalive(spec, "spec.keepalive", report)?),
            None => defaults.keepalive,
        },
    })
}

/// `health_checks` probe endpoints, so as in Emissary they are ignored,
/// with a warning, behind a resolver of service names.
fn endpoint_health_check(
    list: &[HealthCheckSpec],
    (name, resolver): (&str, ResolverKind),
    report: &mut Reporter,
) -> Option<Option<HealthCheck>> {
    let check = health_check(list, "spec.health_checks", report)?;
    if check.is_some() && resolver != ResolverKind::Endpoint {
        report
            .warning(
                "spec.health_checks",
                format!("health checks need an endpoint resolver, as in Emissary; resolver {name} resolves the service name, so they are ignored"),
            )
            .with_code(Code::KeyIgnored)
            .with_hint("set resolver to a KubernetesEndpointResolver, e.g. kubernetes-endpoint");
        return Some(None);
    }
    Some(check)
}

/// Parses a `cors` block at `field`; problems are reported there.
pub(crate) fn cors(value: &Value, field: &str, report: &mut Reporter) -> Option<Arc<CorsPolicy>> {
    let spec = parse_value::<CorsSpec>(Some(value), field, report)?;
    if spec.credentials && items(&spec.origins).iter().any(|o| o == "*") {
        report
            .warning(
                field,
                "origins \"*\" with credentials: true lets any site send requests with the \
                 user's cookies and read the answers",
            )
            .with_hint("list the origins that may");
    }
    CorsPolicy::from_spec(&spec)
        .map_err(|e| report.error(field, e.to_string()))
        .ok()
        .map(Arc::new)
}

/// A `load_balancer`, checked exactly as Emissary checks it: round_robin
/// and least_request alone; ring_hash and maglev with exactly one of
/// `cookie` (with a name), `header` or `source_ip: true`.
pub(crate) fn load_balancer(
    spec: &LoadBalancerSpec,
    field: &str,
    report: &mut Reporter,
) -> Option<Policy> {
    for key in spec.other.keys() {
        report
            .error(&format!("{field}.{key}"), "unknown field")
            .with_hint("load_balancer has policy, and for ring_hash or maglev one of cookie, header, source_ip");
    }
    let keys: Vec<&str> = [
        ("cookie", spec.cookie.is_some()),
        ("header", spec.header.is_some()),
        ("source_ip", spec.source_ip.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    let Some(policy) = spec.policy.as_deref() else {
        report
            .error(&format!("{field}.policy"), "policy is required")
            .with_hint("round_robin, least_request, ring_hash or maglev");
        return None;
    };
    let policy = match policy {
        "round_robin" | "least_request" => {
            if let Some(key) = keys.first() {
                report.error(
                    &format!("{field}.{key}"),
                    format!("{policy} does not hash; only ring_hash and maglev take {key}"),
                );
                return None;
            }
            match policy {
                "round_robin" => Policy::RoundRobin,
                _ => Policy::LeastRequest,
            }
        }
        "ring_hash" | "maglev" => {
            let on = hash_on(spec, &keys, policy, field, report)?;
            match policy {
                "ring_hash" => Policy::RingHash(on),
                _ => Policy::Maglev(on),
            }
        }
        other => {
            report
                .error(
                    &format!("{field}.policy"),
                    format!("unknown policy {other:?}"),
                )
                .with_hint("round_robin, least_request, ring_hash or maglev");
            return None;
        }
    };
    // An error so far, an unknown field above among them, leaves no policy,
    // though the policy's own keys were still checked.
    (!report.has_errors()).then_some(policy)
}

/// What a ring_hash or maglev `policy` hashes on: exactly one of the set
/// `keys`, so that no request is hashed on something it was not meant to.
fn hash_on(
    spec: &LoadBalancerSpec,
    keys: &[&str],
    policy: &str,
    field: &str,
    report: &mut Reporter,
) -> Option<HashOn> {
    match keys {
        [] => {
            report.error(
                field,
                format!("{policy} needs exactly one of cookie, header or source_ip to hash on"),
            );
            None
        }
        [first, second, ..] => {
            report.error(
                &format!("{field}.{second}"),
                format!("{first} is also set; {policy} hashes on exactly one of cookie, header or source_ip"),
            );
            None
        }
        ["header"] => {
            let text = spec.header.as_deref().unwrap_or_default();
            match HeaderName::from_bytes(text.trim().as_bytes()) {
                Ok(name) => Some(HashOn::Header(name)),
                Err(_) => {
                    report.error(
                        &format!("{field}.header"),
                        format!("{text:?} is not a valid header name"),
                    );
                    None
                }
            }
        }
        ["source_ip"] => {
            if spec.source_ip != Some(true) {
                report.error(
                    &format!("{field}.source_ip"),
                    "source_ip: false hashes on nothing; write source_ip: true",
                );
                return None;
            }
            Some(HashOn::SourceIp)
        }
        _ => {
            hash_cookie(spec.cookie.clone().unwrap_or_default(), field, report).map(HashOn::Cookie)
        }
    }
}

/// The cookie a hashing policy reads, and sets when the client has none:
/// its name, path and ttl go into a `Set-Cookie` header, so each must be
/// one that a client would send back.
fn hash_cookie(cookie: CookieSpec, field: &str, report: &mut Reporter) -> Option<Cookie> {
    let Some(name) = cookie.name.filter(|n| !n.is_empty()) else {
        report.error(&format!("{field}.cookie.name"), "a cookie needs a name");
        return None;
    };
    if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    {
        report.error(
            &format!("{field}.cookie.name"),
            format!("{name:?} is not a cookie name"),
        );
        return None;
    }
    let ttl = match cookie.ttl.as_deref().map(str::trim) {
        None => None,
        // Envoy: a zero ttl makes a session cookie.
        Some("0" | "0s") => Some(std::time::Duration::ZERO),
        Some(text) => match parse_duration(text) {
            Ok(ttl) => Some(ttl),
            Err(e) => {
                report
                    .error(&format!("{field}.cookie.ttl"), e.to_string())
                    .with_hint("e.g. 60s, 10m or 1h");
                return None;
            }
        },
    };
    if let Some(path) = &cookie.path {
        if !path.starts_with('/') || path.contains([';', ' ', '\r', '\n']) {
            report.error(
                &format!("{field}.cookie.path"),
                format!("{path:?} is not a cookie path"),
            );
            return None;
        }
    }
    Some(Cookie {
        name,
        path: cookie.path,
        ttl,
    })
}

/// `keepalive`; what it leaves out keeps Linux's defaults.
pub(crate) fn keepalive(
    spec: &KeepaliveSpec,
    field: &str,
    report: &mut Reporter,
) -> Option<Keepalive> {
    let mut valid = true;
    // The kernel's bounds: TCP_KEEPIDLE and TCP_KEEPINTVL take 1 to 32767
    // seconds, TCP_KEEPCNT 1 to 127 probes.
    let mut bounded =
        |value: Option<u64>, key: &str, max: u64, unit: &str, default: u64| match value {
            Some(n) if (1..=max).contains(&n) => n,
            Some(n) => {
                report.error(
                    &format!("{field}.{key}"),
                    format!("{n} {unit} is outside 1 to {max}"),
                );
                valid = false;
                default
            }
            None => default,
        };
    let idle = bounded(spec.idle_time, "idle_time", 32767, "seconds", 7200);
    let interval = bounded(spec.interval, "interval", 32767, "seconds", 75);
    let probes = bounded(spec.probes.map(u64::from), "probes", 127, "probes", 9);
    valid.then(|| Keepalive {
        idle: std::time::Duration::from_secs(idle),
        interval: std::time::Duration::from_secs(interval),
        probes: probes as usize,
    })
}

/// A `retry_policy`; `None` when it retries nothing.
pub(crate) fn retry_policy(
    spec: &RetryPolicySpec,
    field: &str,
    report: &mut Reporter,
) -> Option<RetryPolicy> {
    let (on, unsupported) = match conditions(spec.retry_on.as_deref().unwrap_or("")) {
        Ok(found) => found,
        Err(e) => {
            report.error(&format!("{field}.retry_on"), e.to_string());
            return None;
        }
    };
    if !unsupported.is_empty() {
        report.warning(
            &format!("{field}.retry_on"),
            format!(
                "{} needs a list of status codes that retry_policy has no field for; it \
                 retries nothing",
                unsupported.join(", ")
            ),
        );
    }
    let per_try_timeout = match &spec.per_try_timeout {
        None => None,
        Some(text) => match parse_duration(text) {
            Ok(duration) => Some(duration),
            Err(e) => {
                report
                    .error(&format!("{field}.per_try_timeout"), e.to_string())
                    .with_hint("e.g. 250ms, 1s or 1.5s");
                return None;
            }
        },
    };
    on.map(|on| RetryPolicy {
        on,
        // Envoy retries once unless told otherwise.
        num_retries: spec.num_retries.unwrap_or(1),
        per_try_timeout,
    })
}

/// The `default`-priority thresholds of a `circuit_breakers` list; Envoy's
/// defaults fill what it leaves out.
pub(crate) fn breaker_thresholds(
    list: &[CircuitBreakerSpec],
    field: &str,
    report: &mut Reporter,
) -> Thresholds {
    let mut thresholds = Thresholds::default();
    for (index, entry) in list.iter().enumerate() {
        let entry_field = format!("{field}[{index}]");
        match entry.priority.as_deref() {
            None | Some("default") => {}
            Some("high") => {
                report
                    .warning(
                        &entry_field,
                        "priority high is not supported by pingress yet; ignored",
                    )
                    .with_code(Code::KeyIgnored);
                continue;
            }
            Some(other) => {
                report.error(
                    &format!("{entry_field}.priority"),
                    format!("unknown priority {other:?} (default or high)"),
                );
                continue;
            }
        }
        if let Some(max) = entry.max_retries {
            thresholds.max_retries = max;
        }
        if let Some(max) = entry.max_connections {
            thresholds.max_connections = max;
        }
        if let Some(max) = entry.max_pending_requests {
            thresholds.max_pending_requests = max;
        }
        // On HTTP/1 a connection carries one request at a time, so the
        // request limit bounds the same concurrency.
        if let Some(max) = entry.max_requests {
            thresholds.max_connections = thresholds.max_connections.min(max);
        }
        if thresholds.max_connections == 0 {
            report.error(
                &format!("{entry_field}.max_connections"),
                "0 would refuse every request",
            );
        }
    }
    thresholds
}

/// The redirect of a `host_redirect` Mapping. `Some(None)`: it proxies.
/// With `shadow` too, Emissary drops the redirect and keeps the shadow.
fn redirect(spec: &MappingSpec, report: &mut Reporter) -> Option<Option<Redirect>> {
    if spec.shadow == Some(true) && spec.host_redirect == Some(true) {
        report
            .warning(
                "spec.host_redirect",
                "shadow and host_redirect exclude each other; the shadow wins and the redirect \
                 settings are ignored",
            )
            .with_code(Code::KeyIgnored);
        return Some(None);
    }
    if !spec.host_redirect.unwrap_or(false) {
        for (field, set) in redirect_path_fields(spec).iter().chain(&[(
            "spec.redirect_response_code",
            spec.redirect_response_code.is_some(),
        )]) {
            if *set {
                report.error(field, "only meaningful with host_redirect: true");
            }
        }
        return if report.has_errors() {
            None
        } else {
            Some(None)
        };
    }
    let path = redirect_path(spec, report)?;
    let status = redirect_status(spec, report);
    let (scheme, authority) = redirect_target(spec, report)?;
    Some(Some(Redirect {
        scheme,
        authority,
        path,
        status,
    }))
}

/// The keys that set a redirect's path, each with whether it is set, in
/// the order of their precedence.
fn redirect_path_fields(spec: &MappingSpec) -> [(&'static str, bool); 3] {
    [
        ("spec.path_redirect", spec.path_redirect.is_some()),
        ("spec.prefix_redirect", spec.prefix_redirect.is_some()),
        ("spec.regex_redirect", spec.regex_redirect.is_some()),
    ]
}

/// The redirect's path. Precedence when several path settings are given:
/// path, prefix, regex.
fn redirect_path(spec: &MappingSpec, report: &mut Reporter) -> Option<RedirectPath> {
    let set: Vec<&str> = redirect_path_fields(spec)
        .iter()
        .filter(|(_, s)| *s)
        .map(|(f, _)| *f)
        .collect();
    if set.len() > 1 {
        report
            .warning(set[1], format!("{} is also set and wins", set[0]))
            .with_hint("path_redirect wins over prefix_redirect, which wins over regex_redirect");
    }
    // The new path follows the host name in the Location: without a
    // leading `/` it would continue the host name.
    for (field, value) in [
        ("spec.path_redirect", &spec.path_redirect),
        ("spec.prefix_redirect", &spec.prefix_redirect),
    ] {
        if value.as_deref().is_some_and(|v| !v.starts_with('/')) {
            report.error(field, "must start with /").with_hint(
                "a path that does not would be read as part of the redirect's host name",
            );
            return None;
        }
    }
    Some(if let Some(path) = &spec.path_redirect {
        RedirectPath::Replace(path.clone())
    } else if let Some(prefix) = &spec.prefix_redirect {
        RedirectPath::Prefix(prefix.clone())
    } else if let Some(rr) = &spec.regex_redirect {
        match search_regex(&rr.pattern) {
            Ok(regex) => RedirectPath::Regex {
                regex,
                substitution: envoy_substitution(&rr.substitution),
            },
            Err(e) => {
                report.error("spec.regex_redirect.pattern", e.to_string());
                return None;
            }
        }
    } else {
        RedirectPath::Keep
    })
}

/// `redirect_response_code`; a code that does not redirect falls back to
/// 301 with a warning rather than dropping the Mapping.
fn redirect_status(spec: &MappingSpec, report: &mut Reporter) -> u16 {
    match spec.redirect_response_code {
        None => 301,
        Some(code) if REDIRECT_CODES.contains(&code) => code,
        Some(code) => {
            report
                .warning(
                    "spec.redirect_response_code",
                    format!("{code} is not a redirect code; 301 is used"),
                )
                .with_hint("301, 302, 303, 307 or 308");
            301
        }
    }
}

/// A redirect's `service`: an optional http or https scheme, and the
/// authority that goes into the `Location` every redirected client is
/// shown.
fn redirect_target(spec: &MappingSpec, report: &mut Reporter) -> Option<(Option<String>, String)> {
    let target = spec.service.as_deref().unwrap_or_default().trim();
    let (scheme, authority) = match target.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (Some(scheme.to_string()), rest),
        _ => (None, target),
    };
    if authority.contains('@') {
        // Every client redirected would be shown the credentials.
        report
            .error(
                "spec.service",
                format!(
                    "{:?} carries credentials: a redirect target must not",
                    redacted(target)
                ),
            )
            .with_hint("with host_redirect, service is the host[:port] to redirect to");
        return None;
    }
    if authority.is_empty() || authority.contains(['/', '?', '#', ' ']) {
        report
            .error(
                "spec.service",
                format!("{:?} is not a redirect target", redacted(target)),
            )
            .with_hint("with host_redirect, service is the host[:port] to redirect to");
        return None;
    }
    Some((scheme, authority.to_string()))
}

type AuthorityParts = (Option<(AuthorityMatch, String)>, Association);

/// `hostname` (a glob) wins over the deprecated `host` (exact or regex).
fn authority(spec: &MappingSpec, v2: bool, report: &mut Reporter) -> Option<AuthorityParts> {
    if let Some(hostname) = &spec.hostname {
        if spec.host.is_some() {
            report
                .warning("spec.host", "hostname is set, so host is ignored")
                .with_code(Code::KeyIgnored);
        }
        return match HostGlob::parse(hostname) {
            Ok(HostGlob::Any) => Some((None, Association::Hostname(HostGlob::Any))),
            Ok(glob) => Some((
                Some((AuthorityMatch::Glob(glob.clone()), glob.text())),
                Association::Hostname(glob),
            )),
            Err(e) => {
                report.error("spec.hostname", e.to_string());
                None
            }
        };
    }
    match (&spec.host, spec.host_regex.unwrap_or(false)) {
        (Some(host), true) => match full_match_regex(host, false) {
            Ok(regex) => Some((
                Some((AuthorityMatch::Regex(regex), host.clone())),
                Association::Everywhere,
            )),
            Err(e) => {
                report.error("spec.host", e.to_string());
                None
            }
        },
        (Some(host), false) if host.contains('*') => {
            report
                .error(
                    "spec.host",
                    format!("host exact-match {host} contains *, which cannot match anything"),
                )
                .with_hint("use hostname for globs");
            None
        }
        (Some(host), false) => {
            let glob = HostGlob::Exact(host.to_ascii_lowercase());
            Some((
                Some((AuthorityMatch::Glob(glob.clone()), host.clone())),
                Association::Hostname(glob),
            ))
        }
        // Emissary converts hostless v2 Mappings to `hostname: "*"`.
        (None, _) if v2 => Some((None, Association::Hostname(HostGlob::Any))),
        (None, _) => Some((None, Association::SelectorOnly)),
    }
}

/// Exact and regex matchers of headers or query parameters, exact first.
fn value_matchers(
    exact: &Option<OrderedMap<MatchValue>>,
    regex: &Option<OrderedMap<String>>,
    field: &str,
    report: &mut Reporter,
) -> Vec<(String, ValueMatch)> {
    let mut out = Vec::new();
    for (name, value) in exact.iter().flat_map(|m| m.0.iter()) {
        match value {
            MatchValue::Exact(v) => {
                out.push((name.to_ascii_lowercase(), ValueMatch::Exact(v.clone())))
            }
            // v2's `name: true` means "present".
            MatchValue::Present(true) => match full_match_regex(".*", false) {
                Ok(r) => out.push((name.to_ascii_lowercase(), ValueMatch::Regex(r))),
                Err(e) => {
                    report.error(&format!("spec.{field}.{name}"), e.to_string());
                }
            },
            MatchValue::Present(false) => {
                report.error(
                    &format!("spec.{field}.{name}"),
                    "false is not a match value",
                );
            }
        }
    }
    for (name, pattern) in regex.iter().flat_map(|m| m.0.iter()) {
        // Not quoted back: a value pattern may spell out a credential.
        match full_match_value_regex(pattern) {
            Ok(r) => out.push((name.to_ascii_lowercase(), ValueMatch::Regex(r))),
            Err(e) => {
                report.error(&format!("spec.regex_{field}.{name}"), e.to_string());
            }
        }
    }
    out
}

/// Envoy writes back-references as `\1`; the regex crate as `${1}`.
fn envoy_substitution(substitution: &str) -> String {
    let mut out = String::with_capacity(substitution.len());
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    out.push(*d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_syntax() {
        assert_eq!(envoy_substitution(r"/bar/\1"), "/bar/${1}");
        assert_eq!(envoy_substitution(r"/$x/\12"), "/$$x/${12}");
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use crate::config::load::parse_documents;
    use crate::filters::Registry;
    use crate::model::key_coverage::assert_fields_listed;
    use crate::model::spec::assert_used_or_named;
    use std::path::Path;

    /// What every sample Mapping starts from, as `key: value` lines.
    const BASE: &str = "hostname: \"*\"\nprefix: /a/\nservice: 127.0.0.1:8080";

    /// A value for every Mapping key pingress reads, with what it needs to
    /// mean anything (a redirect code needs a redirect); LATER keys take
    /// `1`.
    const SAMPLES: &[(&str, &str, &str)] = &[
        ("prefix", "", "prefix: /b/"),
        ("prefix_regex", "", "prefix_regex: true"),
        ("prefix_exact", "", "prefix_exact: true"),
        ("case_sensitive", "", "case_sensitive: false"),
        ("hostname", "", "hostname: a.example"),
        ("host", "", "host: a.example"),
        (
            "host_regex",
            "hostname: ~\nhost: \"a.*\"",
            "host_regex: true",
        ),
        ("method", "", "method: POST"),
        ("method_regex", "method: \"P.*\"", "method_regex: true"),
        ("headers", "", "headers:\n  x-a: b"),
        ("regex_headers", "", "regex_headers:\n  x-a: \"b.*\""),
        ("query_parameters", "", "query_parameters:\n  q: v"),
        (
            "regex_query_parameters",
            "",
            "regex_query_parameters:\n  q: \"v.*\"",
        ),
        ("precedence", "", "precedence: 5"),
        ("rewrite", "", "rewrite: /x/"),
        (
            "regex_rewrite",
            "",
            "regex_rewrite:\n  pattern: \"^/a/(.*)\"\n  substitution: /\\1",
        ),
        ("host_rewrite", "", "host_rewrite: b.example"),
        ("auto_host_rewrite", "", "auto_host_rewrite: true"),
        ("service", "", "service: 127.0.0.1:9090"),
        ("tls", "", "tls: upstream"),
        ("timeout_ms", "", "timeout_ms: 9000"),
        ("connect_timeout_ms", "", "connect_timeout_ms: 9000"),
        ("idle_timeout_ms", "", "idle_timeout_ms: 9000"),
        ("add_request_headers", "", "add_request_headers:\n  x-a: b"),
        (
            "add_response_headers",
            "",
            "add_response_headers:\n  x-a: b",
        ),
        (
            "remove_request_headers",
            "",
            "remove_request_headers: [x-a]",
        ),
        (
            "remove_response_headers",
            "",
            "remove_response_headers: [x-a]",
        ),
        ("add_linkerd_headers", "", "add_linkerd_headers: true"),
        ("grpc", "", "grpc: true"),
        (
            "circuit_breakers",
            "",
            "circuit_breakers:\n- max_connections: 5",
        ),
        ("retry_policy", "", "retry_policy:\n  retry_on: 5xx"),
        ("cors", "", "cors:\n  origins: [http://a.example]"),
        ("bypass_auth", "", "bypass_auth: true"),
        ("host_redirect", "", "host_redirect: true"),
        ("path_redirect", "host_redirect: true", "path_redirect: /x/"),
        (
            "prefix_redirect",
            "host_redirect: true",
            "prefix_redirect: /x/",
        ),
        (
            "regex_redirect",
            "host_redirect: true",
            "regex_redirect:\n  pattern: \"^/a/\"\n  substitution: /b/",
        ),
        (
            "redirect_response_code",
            "host_redirect: true",
            "redirect_response_code: 302",
        ),
        ("weight", "", "weight: 50"),
        (
            "labels",
            "",
            "labels:\n  ambassador:\n  - g:\n    - generic_key: {value: x}",
        ),
        ("resolver", "", "resolver: kubernetes-endpoint"),
        (
            "load_balancer",
            "resolver: kubernetes-endpoint",
            "load_balancer:\n  policy: least_request",
        ),
        (
            "health_checks",
            "",
            "health_checks:\n- health_check:\n    http:\n      path: /health",
        ),
        ("dns_type", "", "dns_type: logical_dns"),
        ("respect_dns_ttl", "", "respect_dns_ttl: true"),
        ("enable_ipv4", "enable_ipv6: true", "enable_ipv4: false"),
        ("enable_ipv6", "", "enable_ipv6: true"),
        (
            "cluster_idle_timeout_ms",
            "",
            "cluster_idle_timeout_ms: 1000",
        ),
        (
            "cluster_max_connection_lifetime_ms",
            "",
            "cluster_max_connection_lifetime_ms: 1000",
        ),
        ("allow_upgrade", "", "allow_upgrade: [websocket]"),
        ("use_websocket", "", "use_websocket: true"),
        ("shadow", "", "shadow: true"),
        ("keepalive", "", "keepalive:\n  idle_time: 100"),
    ];

    /// `BASE` with `lines` (block YAML) replacing its keys of the same name.
    fn spec(lines: &[&str]) -> String {
        let extra: Vec<&str> = lines.iter().flat_map(|l| l.lines()).collect();
        let given = |line: &str| {
            extra
                .iter()
                .any(|e| !e.starts_with(' ') && e.split(':').next() == line.split(':').next())
        };
        let mut out: String = BASE
            .lines()
            .filter(|l| !given(l))
            .map(|l| format!("  {l}\n"))
            .collect();
        for line in extra {
            out.push_str(&format!("  {line}\n"));
        }
        out
    }

    /// The validated Mappings (as text) and the diagnostics of a Mapping
    /// with `spec`, beside an origination TLSContext `upstream`.
    fn mappings(spec: &str) -> (String, Vec<Diagnostic>) {
        let yaml = format!(
            "apiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: upstream\n\
             spec:\n  sni: upstream.example\n---\n\
             apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n{spec}"
        );
        let (mut raws, mut diags) = (Vec::new(), Vec::new());
        parse_documents(Path::new("keys.yaml"), &yaml, &mut raws, &mut diags);
        let (model, more) = crate::model::validate(&raws, "default", &Registry::with_builtins());
        diags.extend(more);
        (format!("{:?}", model.mappings), diags)
    }

    /// A key that is read and then does nothing is a silent defect: each
    /// key a Mapping accepts changes the validated Mapping or draws a
    /// warning that names it.
    #[test]
    fn every_mapping_key_is_used_or_warned() {
        let (plain, diags) = mappings(&spec(&[]));
        assert!(!diags.iter().any(Diagnostic::is_error), "{diags:?}");
        // The comparison below means something only if equal input gives
        // equal text.
        assert_eq!(plain, mappings(&spec(&[])).0);
        assert_fields_listed("", &MappingSpec::default(), &[SUPPORTED, LATER].concat());
        // ambassador_id is read where resources are sorted by kind.
        for key in SUPPORTED
            .iter()
            .chain(LATER)
            .filter(|k| **k != "ambassador_id")
        {
            let later = format!("{key}: 1");
            let (needs, sample) = match SAMPLES.iter().find(|(k, _, _)| k == key) {
                Some((_, needs, sample)) => (*needs, *sample),
                None if LATER.contains(key) => ("", later.as_str()),
                None => panic!("SAMPLES has no value for the Mapping's `{key}`"),
            };
            let (before, _) = mappings(&spec(&[needs]));
            let (after, diags) = mappings(&spec(&[needs, sample]));
            assert!(
                !diags.iter().any(Diagnostic::is_error),
                "{key}: {:?}",
                diags.iter().filter(|d| d.is_error()).collect::<Vec<_>>()
            );
            assert_used_or_named(key, after != before, &diags);
        }
    }
}
