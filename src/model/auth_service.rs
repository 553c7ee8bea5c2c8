//! `kind: AuthService` validated into the [`AuthServices`] that the
//! external-authorization filter (`filters::auth`) asks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde::Deserialize;
use serde_yaml::Value;

use super::spec::{check_unknown_fields, parse_section};
use super::{count, header_names as edge_header_names, TlsContexts};
use crate::config::diagnostics::{Diagnostic, Reporter};
use crate::config::load::RawResource;
use crate::config::resources::StringOrList;
use crate::filters::auth::{AuthPolicy, AuthService, AuthServices, IncludeBody, MAX_INCLUDED_BODY};
use crate::tls::TlsContext;
use crate::upstream::service::ServiceAddr;

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

#[derive(Debug, Deserialize, Default)]
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
    /// Read by the instance selection before validation.
    #[serde(rename = "ambassador_id")]
    _ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncludeBodySpec {
    max_bytes: u64,
    #[serde(default)]
    allow_partial: bool,
}

#[derive(Debug, Deserialize)]
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
    check_proto(spec, report);
    let (service, tls) = authorizer(raw, spec, contexts, report)?;
    let policy = policy(spec, report);
    Some(AuthService {
        id: raw.id.clone(),
        name: format!("{}.{}", raw.id.name, raw.id.namespace),
        originate_tls: tls.is_some() || service.https,
        service,
        tls,
        policy,
    })
}

/// `proto`: only HTTP authorizers are asked.
fn check_proto(spec: &AuthServiceSpec, report: &mut Reporter) {
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
}

/// Where the authorizer is, `auth_service`, and the TLSContext it is
/// reached with, `tls`.
fn authorizer(
    raw: &RawResource,
    spec: &AuthServiceSpec,
    contexts: &TlsContexts,
    report: &mut Reporter,
) -> Option<(ServiceAddr, Option<Arc<TlsContext>>)> {
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
    Some((service, tls))
}

/// What the filter asks the authorizer and does with its answer.
fn policy(spec: &AuthServiceSpec, report: &mut Reporter) -> AuthPolicy {
    let include_body = include_body(spec, report);
    let status_on_error = status_on_error(spec, report);
    let add_auth_headers = add_auth_headers(spec, report);
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
    policy
}

/// `include_body`, or the legacy `allow_request_body`: how much of the
/// request body the authorizer sees.
fn include_body(spec: &AuthServiceSpec, report: &mut Reporter) -> Option<IncludeBody> {
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
    include_body
}

/// `status_on_error`: the answer when the authorizer cannot be asked;
/// 403 unless set.
fn status_on_error(spec: &AuthServiceSpec, report: &mut Reporter) -> StatusCode {
    let code = spec.status_on_error.as_ref().map_or(403, |s| s.code);
    match StatusCode::from_u16(code) {
        Ok(status) if (200..=599).contains(&code) => status,
        _ => {
            report.error(
                "spec.status_on_error.code",
                format!("{code} is not an HTTP status"),
            );
            StatusCode::FORBIDDEN
        }
    }
}

/// `add_auth_headers`: the headers added to every authorization request.
fn add_auth_headers(
    spec: &AuthServiceSpec,
    report: &mut Reporter,
) -> Vec<(HeaderName, HeaderValue)> {
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
    add_auth_headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key_coverage::{document, validate_yaml, Coverage};

    /// Each AuthService key changes the validated AuthService or is
    /// warned about, beside an origination TLSContext `upstream`.
    #[test]
    fn every_auth_service_key_is_used_or_warned() {
        const BODY: &str = "include_body: {max_bytes: 100}";
        Coverage {
            base: "auth_service: 127.0.0.1:9000\nambassador_id: [default]",
            listed: SUPPORTED,
            later: LATER,
            samples: &[
                ("auth_service", "", "auth_service: 127.0.0.1:9001"),
                ("path_prefix", "", "path_prefix: /check"),
                ("timeout_ms", "", "timeout_ms: 100"),
                (
                    "allowed_request_headers",
                    "",
                    "allowed_request_headers: [x-a]",
                ),
                (
                    "allowed_authorization_headers",
                    "",
                    "allowed_authorization_headers: [x-b]",
                ),
                ("add_auth_headers", "", "add_auth_headers: {x-c: d}"),
                ("include_body", "", BODY),
                (
                    "include_body.max_bytes",
                    BODY,
                    "include_body: {max_bytes: 200}",
                ),
                (
                    "include_body.allow_partial",
                    BODY,
                    "include_body: {allow_partial: true}",
                ),
                ("allow_request_body", "", "allow_request_body: true"),
                ("status_on_error", "", "status_on_error: {code: 503}"),
                (
                    "status_on_error.code",
                    "status_on_error: {code: 503}",
                    "status_on_error: {code: 401}",
                ),
                ("failure_mode_allow", "", "failure_mode_allow: true"),
                ("tls", "", "tls: upstream"),
                ("ambassador_id", "", "ambassador_id: [other]"),
            ],
            // http is the default; gRPC authorizers are not spoken.
            refused: &[("proto", "proto: grpc")],
            specs: &[
                ("", &AuthServiceSpec::default()),
                (
                    "include_body.",
                    &IncludeBodySpec {
                        max_bytes: 0,
                        allow_partial: false,
                    },
                ),
                ("status_on_error.", &StatusOnError { code: 0 }),
            ],
        }
        .check(|spec| {
            let yaml = format!(
                "{}{}",
                document("TLSContext", "upstream", "sni: upstream.example"),
                document("AuthService", "auth", spec)
            );
            let (model, diags) = validate_yaml(&yaml, &crate::filters::Registry::default());
            (format!("{:?}", model.auth_services), diags)
        });
    }
}
