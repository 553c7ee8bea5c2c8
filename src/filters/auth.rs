//! External authorization (`kind: AuthService`, HTTP protocol): before a
//! request is proxied, the gateway asks the authorizer with the request's
//! method, path and chosen headers. A 2xx lets it through, with the
//! authorizer's chosen headers added (and the route matched again, so they
//! can choose the Mapping); any other answer goes back to the client. An
//! unreachable, slow or failing (5xx) authorizer gets `status_on_error`,
//! unless `failure_mode_allow` lets the request through.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::Result;
use serde::Deserialize;
use serde_yaml::Value;

use super::{Cx, Filter, Flow, Hooks, Reply, Session};
use crate::config::diagnostics::{Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::StringOrList;
use crate::model::spec::{check_unknown_fields, parse_section};
use crate::model::{count, header_names as edge_header_names, TlsContexts};
use crate::throttle::throttled;
use crate::tls::TlsContext;
use crate::upstream::cluster::Cluster;
use crate::upstream::service::ServiceAddr;
use crate::upstream::side;

/// Request headers the authorizer always sees (Emissary's list).
const ALWAYS_TO_AUTHORIZER: &[&str] = &[
    "authorization",
    "cookie",
    "from",
    "proxy-authorization",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Authorizer response headers that always travel on (upstream on allow,
/// to the client on deny).
const ALWAYS_FROM_AUTHORIZER: &[&str] = &[
    "authorization",
    "location",
    "proxy-authenticate",
    "set-cookie",
    "www-authenticate",
];

/// Pingora keeps at most this much of a request body for sending it again;
/// a body shown to the authorizer must fit, or it could not be proxied.
pub(crate) const MAX_INCLUDED_BODY: u64 = 64 * 1024;

/// The most of an authorizer's denial body passed to the client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// One connection pool to authorizers for the process, so pooled
/// connections outlive configuration reloads.
static CONNECTOR: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IncludeBody {
    max_bytes: u64,
    allow_partial: bool,
}

/// What every AuthService of a configuration must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthPolicy {
    path_prefix: String,
    timeout: Duration,
    to_authorizer: Vec<HeaderName>,
    from_authorizer: Vec<HeaderName>,
    add_auth_headers: Vec<(HeaderName, HeaderValue)>,
    include_body: Option<IncludeBody>,
    status_on_error: u16,
    failure_mode_allow: bool,
}

/// A validated AuthService.
#[derive(Debug)]
pub struct AuthService {
    pub id: ResourceRef,
    /// `name.namespace`.
    pub name: String,
    pub service: ServiceAddr,
    pub originate_tls: bool,
    pub tls: Option<Arc<TlsContext>>,
    pub(crate) policy: AuthPolicy,
}

/// The configuration's AuthServices. An invalid one makes the gateway
/// refuse every request (as Emissary fails closed) rather than let them
/// through unchecked.
#[derive(Debug, Default)]
pub struct AuthServices {
    pub services: Vec<AuthService>,
    pub misconfigured: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthServiceSpec {
    auth_service: Option<String>,
    proto: Option<String>,
    path_prefix: Option<String>,
    #[serde(default, deserialize_with = "crate::config::bounds::milliseconds")]
    timeout_ms: Option<u64>,
    allowed_request_headers: Option<StringOrList>,
    allowed_authorization_headers: Option<StringOrList>,
    add_auth_headers: Option<BTreeMap<String, String>>,
    include_body: Option<IncludeBodySpec>,
    allow_request_body: Option<bool>,
    status_on_error: Option<StatusOnError>,
    failure_mode_allow: Option<bool>,
    tls: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncludeBodySpec {
    max_bytes: u64,
    #[serde(default)]
    allow_partial: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusOnError {
    code: u16,
}

const SUPPORTED: &[&str] = &[
    "auth_service",
    "proto",
    "path_prefix",
    "timeout_ms",
    "allowed_request_headers",
    "allowed_authorization_headers",
    "add_auth_headers",
    "include_body",
    "allow_request_body",
    "status_on_error",
    "failure_mode_allow",
    "tls",
    "ambassador_id",
];
const LATER: &[&str] = &[
    "protocol_version",
    "add_linkerd_headers",
    "circuit_breakers",
    "stats_name",
    "v3StatsName",
    "auth_context_extensions",
];

/// Emissary's fixed names, then the configured ones not already there.
fn header_names(
    always: &[&'static str],
    extra: &Option<StringOrList>,
    field: &str,
    report: &mut Reporter,
) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = always.iter().map(|n| HeaderName::from_static(n)).collect();
    let configured = extra
        .as_ref()
        .map(|list| edge_header_names(list, field, report));
    for name in configured.into_iter().flatten() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Validates the AuthServices; they must agree on how they are asked.
pub(crate) fn validate_all(
    raws: &[&RawResource],
    contexts: &TlsContexts,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> AuthServices {
    let mut result = AuthServices::default();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let service = parse_section::<AuthServiceSpec>(raw, "spec", &mut report)
            .and_then(|spec| validate(raw, &spec, contexts, &mut report));
        let name = format!("{}.{}", raw.id.name, raw.id.namespace);
        let Some(service) = service.filter(|_| !report.has_errors()) else {
            result.misconfigured.get_or_insert(name);
            continue;
        };
        if let Some(first) = result.services.first() {
            if first.policy != service.policy {
                report
                    .error(
                        "spec",
                        format!("AuthService {} is configured differently", first.name),
                    )
                    .with_hint(
                        "several AuthServices take turns and must agree on everything but \
                         auth_service and tls",
                    );
                result.misconfigured.get_or_insert(name);
                continue;
            }
        }
        count(accepted, "AuthService");
        result.services.push(service);
    }
    result
}

fn validate(
    raw: &RawResource,
    spec: &AuthServiceSpec,
    contexts: &TlsContexts,
    report: &mut Reporter,
) -> Option<AuthService> {
    check_unknown_fields(&spec.other, "spec", SUPPORTED, LATER, report);
    match spec.proto.as_deref() {
        None | Some("http") => {}
        Some("grpc") => {
            report
                .error(
                    "spec.proto",
                    "pingress speaks the HTTP protocol to authorizers, not gRPC",
                )
                .with_hint("use proto: http with an authorizer that answers HTTP");
        }
        Some(other) => {
            report.error("spec.proto", format!("{other:?} is neither http nor grpc"));
        }
    }
    let tls = match spec.tls.as_deref() {
        None | Some("") => None,
        Some(name) => Some(contexts.lookup(name, "spec.tls", "this AuthService", report)?),
    };
    let Some(address) = spec.auth_service.as_deref() else {
        report.error("spec.auth_service", "auth_service is required");
        return None;
    };
    let service = ServiceAddr::parse(address, tls.is_some(), Some(&raw.id.namespace))
        .map_err(|e| {
            report
                .error("spec.auth_service", e.to_string())
                .with_hint("the form is [scheme://]host[.namespace][:port]");
        })
        .ok()?;
    // As for Mappings: Pingora sends no SNI to an IP address, and without
    // one it verifies nothing, so a CA there would be a false promise.
    if let Some(context) = tls.as_ref().filter(|t| t.ca.is_some() && t.sni.is_none()) {
        if service.is_ip() {
            report
                .error(
                    "spec.tls",
                    format!(
                        "TLSContext {} verifies upstreams, but {} is an IP address",
                        context.name, service.host
                    ),
                )
                .with_hint(
                    "set `sni` on the TLSContext to the name in the authorizer's certificate",
                );
        }
    }
    let include_body = match (&spec.include_body, spec.allow_request_body) {
        (Some(body), _) => Some(IncludeBody {
            max_bytes: body.max_bytes,
            allow_partial: body.allow_partial,
        }),
        // The legacy switch: the first 4 KiB, partial allowed.
        (None, Some(true)) => Some(IncludeBody {
            max_bytes: 4096,
            allow_partial: true,
        }),
        (None, _) => None,
    };
    if include_body
        .as_ref()
        .is_some_and(|b| b.max_bytes > MAX_INCLUDED_BODY)
    {
        report
            .error(
                "spec.include_body.max_bytes",
                format!("pingress shows the authorizer at most {MAX_INCLUDED_BODY} bytes"),
            )
            .with_hint("the body shown must also be kept to send upstream afterwards");
    }
    let status_on_error = spec.status_on_error.as_ref().map_or(403, |s| s.code);
    if !(200..=599).contains(&status_on_error) {
        report.error(
            "spec.status_on_error.code",
            format!("{status_on_error} is not an HTTP status"),
        );
    }
    let mut add_auth_headers = Vec::new();
    for (name, value) in spec.add_auth_headers.iter().flatten() {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => add_auth_headers.push((name, value)),
            _ => {
                report.error(
                    &format!("spec.add_auth_headers.{name}"),
                    "not a valid header name and value",
                );
            }
        }
    }
    let policy = AuthPolicy {
        path_prefix: spec.path_prefix.clone().unwrap_or_default(),
        timeout: Duration::from_millis(spec.timeout_ms.unwrap_or(5000)),
        to_authorizer: header_names(
            ALWAYS_TO_AUTHORIZER,
            &spec.allowed_request_headers,
            "spec.allowed_request_headers",
            report,
        ),
        from_authorizer: header_names(
            ALWAYS_FROM_AUTHORIZER,
            &spec.allowed_authorization_headers,
            "spec.allowed_authorization_headers",
            report,
        ),
        add_auth_headers,
        include_body,
        status_on_error,
        failure_mode_allow: spec.failure_mode_allow.unwrap_or(false),
    };
    if !policy.path_prefix.is_empty() && !policy.path_prefix.starts_with('/') {
        report.error("spec.path_prefix", "a path prefix starts with /");
    }
    Some(AuthService {
        id: raw.id.clone(),
        name: format!("{}.{}", raw.id.name, raw.id.namespace),
        originate_tls: tls.is_some() || service.https,
        service,
        tls,
        policy,
    })
}

/// The filter: one policy, the authorizers taking turns.
pub(crate) enum ExtAuth {
    Authorizers {
        policy: AuthPolicy,
        clusters: Vec<Arc<Cluster>>,
        next: AtomicUsize,
    },
    /// Every request gets a 500 naming the broken AuthService.
    Misconfigured(String),
}

impl ExtAuth {
    pub fn new(policy: AuthPolicy, clusters: Vec<Arc<Cluster>>) -> ExtAuth {
        ExtAuth::Authorizers {
            policy,
            clusters,
            next: AtomicUsize::new(0),
        }
    }
}

/// The request to the authorizer: the client's method, the prefixed path,
/// the chosen headers, and the body shown (if any).
fn auth_request(
    session: &Session,
    policy: &AuthPolicy,
    body: Option<&Bytes>,
) -> Result<RequestHeader> {
    let original = session.req_header();
    let target = original.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = format!("{}{target}", policy.path_prefix);
    let mut request = RequestHeader::build(original.method.clone(), path.as_bytes(), None)?;
    let authority = original
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            original
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    if let Some(authority) = authority {
        request.insert_header(HOST, authority)?;
    }
    for name in &policy.to_authorizer {
        for value in original.headers.get_all(name) {
            request.append_header(name.clone(), value.clone())?;
        }
    }
    for (name, value) in &policy.add_auth_headers {
        request.insert_header(name.clone(), value.clone())?;
    }
    request.insert_header(CONTENT_LENGTH, body.map_or(0, Bytes::len).to_string())?;
    Ok(request)
}

/// Reads up to `limit` of the request body into Pingora's retry buffer,
/// from which the proxy sends it upstream later. `Err` is the reply when
/// the body cannot be shown or kept.
async fn read_body(
    session: &mut Session,
    limit: &IncludeBody,
) -> Result<std::result::Result<Bytes, Reply>> {
    session.enable_retry_buffering();
    let mut shown = BytesMut::new();
    while (shown.len() as u64) <= limit.max_bytes {
        match session.read_request_body().await? {
            Some(chunk) => shown.extend_from_slice(&chunk),
            None => break,
        }
    }
    let too_large = shown.len() as u64 > limit.max_bytes;
    if too_large && !limit.allow_partial {
        return Ok(Err(Reply::text(
            413,
            format!(
                "the request body is larger than the {} bytes the authorizer may see",
                limit.max_bytes
            ),
        )
        .reason("auth_body_too_large")));
    }
    if session.as_ref().retry_buffer_truncated() {
        return Ok(Err(Reply::text(
            413,
            "the request body arrived in a piece too large to keep while it is authorized",
        )
        .reason("auth_body_too_large")));
    }
    shown.truncate(limit.max_bytes as usize);
    Ok(Ok(shown.freeze()))
}

#[async_trait]
impl Filter for ExtAuth {
    const TYPE: &'static str = "AuthService";
    const HOOKS: Hooks = Hooks::REQUEST_ONLY;
    type Settings = serde::de::IgnoredAny;
    type Arguments = ();
    type State = ();

    /// AuthServices are built from their own kind, with their clusters;
    /// this type is never registered for `kind: Filter`.
    fn build(_: serde::de::IgnoredAny) -> std::result::Result<Self, String> {
        Err("an AuthService is its own kind, not a Filter type".into())
    }

    async fn request(&self, session: &mut Session, cx: &mut Cx<'_, Self>) -> Result<Flow> {
        let (policy, clusters, next) = match self {
            ExtAuth::Misconfigured(name) => {
                let body = format!(
                    "{{\"error\": \"AuthService {name} is misconfigured: see the gateway's diagnostics\"}}\n"
                );
                return Ok(Flow::Respond(
                    Reply::new(500)
                        .body("application/json", body)
                        .reason("auth_misconfigured"),
                ));
            }
            ExtAuth::Authorizers {
                policy,
                clusters,
                next,
            } => (policy, clusters, next),
        };
        let body = match &policy.include_body {
            None => None,
            Some(limit) => match read_body(session, limit).await? {
                Ok(body) => Some(body),
                Err(reply) => return Ok(Flow::Respond(reply)),
            },
        };
        let request = auth_request(session, policy, body.as_ref())?;
        let cluster = &clusters[next.fetch_add(1, Ordering::Relaxed) % clusters.len()];
        let keep = side::Body::Keep {
            at_most: MAX_DENIAL_BODY,
        };
        let ask = side::exchange(&CONNECTOR, cluster, request, body, keep);
        let answer = match tokio::time::timeout(policy.timeout, ask).await {
            Ok(Ok(verdict)) if verdict.status < 500 => Ok(verdict),
            Ok(Ok(verdict)) => Err(format!("{} answered {}", cluster.name, verdict.status)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "{} did not answer within {:?}",
                cluster.name, policy.timeout
            )),
        };
        let verdict = match answer {
            Ok(verdict) => verdict,
            Err(problem) if policy.failure_mode_allow => {
                throttled!(
                    warn,
                    "authorization skipped (failure_mode_allow): {problem}"
                );
                return Ok(Flow::Continue);
            }
            Err(problem) => {
                throttled!(warn, "authorization failed: {problem}");
                return Ok(Flow::Respond(
                    Reply::text(
                        policy.status_on_error,
                        "the authorization service is unavailable",
                    )
                    .reason("auth_error"),
                ));
            }
        };
        let content_type = verdict
            .headers
            .iter()
            .find(|(name, _)| name == CONTENT_TYPE)
            .map(|(_, value)| value.clone());
        let passed = verdict
            .headers
            .into_iter()
            .filter(|(name, _)| policy.from_authorizer.contains(name));
        if (200..300).contains(&verdict.status) {
            let request = session.req_header_mut();
            let mut added = false;
            for (name, value) in passed {
                request.insert_header(name, value)?;
                added = true;
            }
            if added {
                cx.reroute();
            }
            return Ok(Flow::Continue);
        }
        let content_type = content_type.unwrap_or_else(|| HeaderValue::from_static("text/plain"));
        let mut reply = Reply::new(verdict.status).reason("auth_denied");
        for (name, value) in passed {
            reply = reply.header(name, value);
        }
        Ok(Flow::Respond(reply.typed_body(content_type, verdict.body)))
    }
}
