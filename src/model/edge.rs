//! The edge resources: the ambassador Module, Listeners and Hosts.

use std::collections::BTreeMap;

use http::HeaderName;

use crate::config::diagnostics::{Code, Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::{
    AddHeaderValue, HostBinding as HostBindingSpec, HostSpec, LabelSelector, ListenerSpec,
    ModuleConfig, ModuleDefaults, ModuleSpec, OrderedMap, StringOrList,
};
use crate::routing::headers::{AddHeader, HeaderEdits, HeaderTemplate};
use crate::routing::matchers::HostGlob;
use crate::routing::path::PathOptions;
use crate::routing::xfcc::{XfccFields, XfccMode, XfccPolicy};

use super::rate_labels::parse_default_labels;
use super::spec::{check_unknown_fields, parse_section, parse_value};
use super::{
    count, AccessLog, MappingDefaults, ModuleSettings, SecretStore, TlsContexts,
    MAX_REQUEST_HEADERS_KB,
};
use crate::filters::ip::{self, IpFilter};
use crate::filters::Filter;
use crate::tls::TlsContext;
use crate::upstream::cluster::ConnectionOptions;
use std::sync::Arc;

/// `cluster_idle_timeout_ms` and `cluster_max_connection_lifetime_ms`: 0
/// means no limit, as in Envoy.
pub(crate) fn unlimited_if_zero(ms: Option<u64>) -> Option<std::time::Duration> {
    ms.filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

const MODULE_SUPPORTED: &[&str] = &[
    "defaults",
    "cluster_request_timeout_ms",
    "server_name",
    "add_linkerd_headers",
    "xff_num_trusted_hops",
    "use_remote_address",
    "merge_slashes",
    "reject_requests_with_escaped_slashes",
    "headers_with_underscores_action",
    "strip_matching_host_port",
    "suppress_envoy_headers",
    "use_ambassador_namespace_for_service_resolution",
    "enable_ipv4",
    "enable_ipv6",
    "forward_client_cert_details",
    "set_current_client_cert_details",
    "envoy_log_type",
    "circuit_breakers",
    "retry_policy",
    "keepalive",
    "preserve_external_request_id",
    "cors",
    "ip_allow",
    "ip_deny",
    "default_label_domain",
    "default_labels",
    "resolver",
    "load_balancer",
    "cluster_idle_timeout_ms",
    "cluster_max_connection_lifetime_ms",
    "listener_idle_timeout_ms",
    "max_request_headers_kb",
    "diagnostics",
];
const MODULE_LATER: &[&str] = &[
    "readiness_probe",
    "liveness_probe",
    "enable_http10",
    "allow_chunked_length",
    "proper_case",
    "header_case_overrides",
    "buffer_limit_bytes",
    "buffer",
    "gzip",
    "lua_scripts",
    "enable_grpc_http11_bridge",
    "enable_grpc_web",
    "grpc_stats",
    "envoy_log_path",
    "envoy_log_format",
    "envoy_validation_timeout",
    "regex_max_size",
    "admin_port",
    "diag_port",
    "runtime_flags",
    "statsd",
    "debug_mode",
    "error_response_overrides",
    "service_port",
    "use_proxy_proto",
    "x_forwarded_proto_redirect",
    "prune_unreachable_routes",
    "regex_type",
];

/// The Module's `diagnostics`: whether the diag answers clients beyond
/// this host (`allow_non_local`). Emissary's `enabled` also exposes the
/// diag on the proxy listeners; pingress never does, so it is read and
/// warned about when true.
fn diagnostics(value: &serde_yaml::Value, report: &mut Reporter) -> bool {
    #[derive(Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Diagnostics {
        enabled: Option<bool>,
        allow_non_local: Option<bool>,
    }
    let field = "spec.config.diagnostics";
    let Some(spec) = parse_value::<Diagnostics>(Some(value), field, report) else {
        return false;
    };
    if spec.enabled == Some(true) {
        report
            .warning(
                &format!("{field}.enabled"),
                "pingress serves the diag only on the admin listener, never on the proxy listeners",
            )
            .with_hint(
                "admin.listen in the gateway file; allow_non_local opens it beyond loopback",
            );
    }
    spec.allow_non_local.unwrap_or(false)
}

pub fn validate_modules(
    raws: &[&RawResource],
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> ModuleSettings {
    let mut settings = ModuleSettings::default();
    let mut found = false;
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        if raw.id.name != "ambassador" {
            report
                .warning(
                    "metadata.name",
                    "only the Module named `ambassador` is read; ignored",
                )
                .with_code(Code::ResourceIgnored)
                .with_hint("the legacy `tls` Module is not supported: use TLSContext and Host");
            continue;
        }
        if found {
            report.error(
                "metadata.name",
                "a second ambassador Module; only the first is used",
            );
            continue;
        }
        let Some(spec) = parse_section::<ModuleSpec>(raw, "spec", &mut report) else {
            continue;
        };
        check_unknown_fields(
            &spec.other,
            "spec",
            &["config", "ambassador_id"],
            &[],
            &mut report,
        );
        check_unknown_fields(
            &spec.config.other,
            "spec.config",
            MODULE_SUPPORTED,
            MODULE_LATER,
            &mut report,
        );
        if let Some(module) = module_settings(&spec.config, &mut report) {
            if !report.has_errors() {
                found = true;
                settings = module;
                count(accepted, "Module");
            }
        }
    }
    settings
}

/// The Module's settings, each the built-in default where the Module sets
/// none. The steps run in the order their diagnostics are reported; a
/// step that returns `None` leaves nothing the later ones could check.
fn module_settings(config: &ModuleConfig, report: &mut Reporter) -> Option<ModuleSettings> {
    let base = ModuleSettings::default();
    let defaults = config
        .defaults
        .as_ref()
        .map(|defaults| mapping_defaults(defaults, report))
        .unwrap_or_default();
    let xfcc = xfcc(config, report);
    let access_log = access_log(config, report);
    let circuit_breakers = config
        .circuit_breakers
        .as_ref()
        .map(|list| super::breaker_thresholds(list, "spec.config.circuit_breakers", report))
        .unwrap_or_default();
    let retry_policy = config
        .retry_policy
        .as_ref()
        .and_then(|policy| super::retry_policy(policy, "spec.config.retry_policy", report));
    let cors = config
        .cors
        .as_ref()
        .and_then(|value| super::cors(value, "spec.config.cors", report));
    let ip_filter = ip_rules(config, report);
    let load_balancer = match &config.load_balancer {
        Some(spec) => Some(super::load_balancer(
            spec,
            "spec.config.load_balancer",
            report,
        )?),
        None => None,
    };
    let underscores = underscores(config, report);
    if config.use_remote_address == Some(false) {
        report
            .warning(
                "spec.config.use_remote_address",
                "pingress always trusts the socket peer address; ignored",
            )
            .with_code(Code::KeyIgnored);
    }
    let connections = connection_defaults(config, report)?;
    let default_label_domain = default_label_domain(config, base.default_label_domain, report);
    let default_labels = config
        .default_labels
        .as_ref()
        .map(|value| parse_default_labels(value, "spec.config.default_labels", report))
        .unwrap_or_default();
    let diagnostics_allow_non_local = config
        .diagnostics
        .as_ref()
        .map(|value| diagnostics(value, report))
        .unwrap_or(base.diagnostics_allow_non_local);
    let max_request_headers = max_request_headers(config, base.max_request_headers, report);
    Some(ModuleSettings {
        request_timeout_ms: config
            .cluster_request_timeout_ms
            .unwrap_or(base.request_timeout_ms),
        server_name: config.server_name.clone(),
        add_linkerd_headers: config.add_linkerd_headers.unwrap_or(false),
        xff_num_trusted_hops: config.xff_num_trusted_hops.unwrap_or(0),
        path: PathOptions {
            merge_slashes: config.merge_slashes.unwrap_or(false),
            reject_escaped_slashes: config.reject_requests_with_escaped_slashes.unwrap_or(false),
        },
        underscores,
        strip_matching_host_port: config.strip_matching_host_port.unwrap_or(false),
        suppress_envoy_headers: config.suppress_envoy_headers.unwrap_or(false),
        use_ambassador_namespace: config
            .use_ambassador_namespace_for_service_resolution
            .unwrap_or(false),
        enable_ipv4: config.enable_ipv4.unwrap_or(true),
        enable_ipv6: config.enable_ipv6.unwrap_or(false),
        xfcc,
        access_log,
        circuit_breakers,
        retry_policy,
        resolver: config.resolver.clone().unwrap_or(base.resolver),
        load_balancer,
        connections,
        defaults,
        preserve_external_request_id: config.preserve_external_request_id.unwrap_or(false),
        cors,
        ip_filter,
        default_label_domain,
        default_labels,
        listener_idle_timeout: match config.listener_idle_timeout_ms {
            None => base.listener_idle_timeout,
            Some(ms) => unlimited_if_zero(Some(ms)),
        },
        diagnostics_allow_non_local,
        max_request_headers,
    })
}

/// `defaults`: the header edits every Mapping starts from. Emissary reads
/// them under `defaults.httpmapping` and, for each key that has none
/// there, at the top of `defaults`.
fn mapping_defaults(defaults: &ModuleDefaults, report: &mut Reporter) -> MappingDefaults {
    let field = "spec.config.defaults";
    let class = defaults.httpmapping.as_ref();
    check_unknown_fields(
        &defaults.other,
        field,
        &[
            "httpmapping",
            "add_request_headers",
            "add_response_headers",
            "remove_request_headers",
            "remove_response_headers",
        ],
        &["stats_name", "tcpmapping"],
        report,
    );
    if let Some(class) = class {
        check_unknown_fields(
            &class.other,
            "spec.config.defaults.httpmapping",
            &[
                "add_request_headers",
                "add_response_headers",
                "remove_request_headers",
                "remove_response_headers",
            ],
            &["stats_name"],
            report,
        );
    }
    MappingDefaults {
        request: class_first(
            class.map(|c| &c.add_request_headers),
            &defaults.add_request_headers,
        )
        .map(|m| add_headers(&m, &format!("{field}.add_request_headers"), report)),
        response: class_first(
            class.map(|c| &c.add_response_headers),
            &defaults.add_response_headers,
        )
        .map(|m| add_headers(&m, &format!("{field}.add_response_headers"), report)),
        remove_request: class_first(
            class.map(|c| &c.remove_request_headers),
            &defaults.remove_request_headers,
        )
        .map(|l| header_names(&l, &format!("{field}.remove_request_headers"), report)),
        remove_response: class_first(
            class.map(|c| &c.remove_response_headers),
            &defaults.remove_response_headers,
        )
        .map(|l| header_names(&l, &format!("{field}.remove_response_headers"), report)),
    }
}

/// A `defaults` key: `defaults.httpmapping`'s (`from_class`) wins over the
/// top-level one.
fn class_first<T: Clone>(from_class: Option<&Option<T>>, top: &Option<T>) -> Option<T> {
    from_class.and_then(|v| v.clone()).or_else(|| top.clone())
}

/// `forward_client_cert_details` and `set_current_client_cert_details`:
/// what becomes of a client certificate's `x-forwarded-client-cert`.
fn xfcc(config: &ModuleConfig, report: &mut Reporter) -> XfccPolicy {
    let mut xfcc = XfccPolicy::default();
    if let Some(mode) = &config.forward_client_cert_details {
        match XfccMode::parse(mode) {
            Some(mode) => xfcc.mode = mode,
            None => {
                report
                    .error("spec.config.forward_client_cert_details", format!("unknown mode {mode:?}"))
                    .with_hint("SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET or ALWAYS_FORWARD_ONLY");
            }
        }
    }
    if let Some(details) = &config.set_current_client_cert_details {
        xfcc.fields = XfccFields {
            subject: details.subject.unwrap_or(false),
            cert: details.cert.unwrap_or(false),
            chain: details.chain.unwrap_or(false),
            dns: details.dns.unwrap_or(false),
            uri: details.uri.unwrap_or(false),
        };
        // The other modes never write the current certificate's fields.
        if !matches!(xfcc.mode, XfccMode::AppendForward | XfccMode::SanitizeSet) {
            report.warning(
                "spec.config.set_current_client_cert_details",
                "only used with forward_client_cert_details APPEND_FORWARD or SANITIZE_SET",
            );
        }
    }
    xfcc
}

/// `envoy_log_type`: the access log's format.
fn access_log(config: &ModuleConfig, report: &mut Reporter) -> AccessLog {
    match config.envoy_log_type.as_deref() {
        None | Some("text") => AccessLog::Text,
        Some("json") => AccessLog::Json,
        Some(other) => {
            report.error(
                "spec.config.envoy_log_type",
                format!("{other:?} is not text or json"),
            );
            AccessLog::Text
        }
    }
}

/// `headers_with_underscores_action`, see [`UnderscoreAction`].
fn underscores(config: &ModuleConfig, report: &mut Reporter) -> UnderscoreAction {
    match config.headers_with_underscores_action.as_deref() {
        None | Some("ALLOW") => UnderscoreAction::Allow,
        Some("DROP_HEADER") => UnderscoreAction::DropHeader,
        Some("REJECT_REQUEST") => UnderscoreAction::RejectRequest,
        Some(other) => {
            report
                .error(
                    "spec.config.headers_with_underscores_action",
                    format!("unknown action {other:?}"),
                )
                .with_hint("ALLOW, DROP_HEADER or REJECT_REQUEST");
            UnderscoreAction::Allow
        }
    }
}

/// The connection reuse every Mapping starts from:
/// `cluster_idle_timeout_ms`, `cluster_max_connection_lifetime_ms` and
/// `keepalive`. `None` when `keepalive` is invalid.
fn connection_defaults(config: &ModuleConfig, report: &mut Reporter) -> Option<ConnectionOptions> {
    Some(ConnectionOptions {
        idle_timeout: unlimited_if_zero(config.cluster_idle_timeout_ms),
        max_lifetime: unlimited_if_zero(config.cluster_max_connection_lifetime_ms),
        keepalive: match &config.keepalive {
            Some(spec) => Some(super::keepalive(spec, "spec.config.keepalive", report)?),
            None => None,
        },
    })
}

/// `default_label_domain`; an empty one is reported and `base` kept.
fn default_label_domain(config: &ModuleConfig, base: String, report: &mut Reporter) -> String {
    match config.default_label_domain.as_deref() {
        Some("") => {
            report.error(
                "spec.config.default_label_domain",
                "a label domain is not empty",
            );
            base
        }
        Some(domain) => domain.to_string(),
        None => base,
    }
}

/// `max_request_headers_kb`, in bytes, bounded by what Pingora can read;
/// one out of bounds keeps `base` and is reported.
fn max_request_headers(config: &ModuleConfig, base: usize, report: &mut Reporter) -> usize {
    match config.max_request_headers_kb {
        None => base,
        Some(kb @ 1..=MAX_REQUEST_HEADERS_KB) => kb as usize * 1024,
        Some(kb) => {
            report.error(
                "spec.config.max_request_headers_kb",
                format!("{kb} is not between 1 and {MAX_REQUEST_HEADERS_KB}: Pingora reads a request head of at most 1 MiB"),
            );
            base
        }
    }
}

/// `ip_allow` / `ip_deny`, built into the filter that enforces them.
fn ip_rules(config: &ModuleConfig, report: &mut Reporter) -> Option<IpFilter> {
    if config.ip_allow.is_none() && config.ip_deny.is_none() {
        return None;
    }
    let field = "spec.config";
    let settings = ip::Settings {
        ip_allow: parse_value(
            config.ip_allow.as_ref(),
            &format!("{field}.ip_allow"),
            report,
        )?,
        ip_deny: parse_value(config.ip_deny.as_ref(), &format!("{field}.ip_deny"), report)?,
    };
    IpFilter::build(settings)
        .map_err(|e| {
            report
                .error(field, e.to_string())
                .with_hint("a list of {peer: CIDR} or {remote: CIDR}; 403 for the others");
        })
        .ok()
}

/// Parses an `add_*_headers` map. Bad entries are reported and skipped.
pub fn add_headers(
    map: &OrderedMap<AddHeaderValue>,
    field: &str,
    report: &mut Reporter,
) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    for (name, value) in &map.0 {
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            report.error(&format!("{field}.{name}"), "not a valid header name");
            continue;
        };
        let (text, append) = match value {
            AddHeaderValue::Plain(text) => (text, true),
            AddHeaderValue::Detailed { value, append } => (value, append.unwrap_or(true)),
        };
        match HeaderTemplate::parse(text) {
            Ok(template) => edits.add.push(AddHeader {
                name: header,
                value: template,
                append,
            }),
            Err(e) => {
                report
                    .error(&format!("{field}.{name}"), e.to_string())
                    .with_hint(format!(
                        "supported: {}",
                        crate::routing::headers::SUPPORTED_VARIABLES
                    ));
            }
        }
    }
    edits
}

pub fn header_names(list: &StringOrList, field: &str, report: &mut Reporter) -> Vec<HeaderName> {
    list.to_vec()
        .iter()
        .filter_map(|name| {
            HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| report.error(field, format!("{name:?} is not a valid header name")))
                .ok()
        })
        .collect()
}

/// The Module's `headers_with_underscores_action`, Envoy's
/// `headers_with_underscores_action`: what becomes of a request header
/// whose name holds `_`. CGI, PHP, WSGI and nginx read `X_User` and
/// `X-User` as one variable, so an upstream may take either for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoreAction {
    /// Envoy's default: forwarded.
    #[default]
    Allow,
    /// Removed before any filter sees the request.
    DropHeader,
    /// The request is answered 400.
    RejectRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityModel {
    /// Secure when `X-Forwarded-Proto` says https.
    Xfp,
    Secure,
    Insecure,
}

#[derive(Debug, Clone, Default)]
pub struct HostBinding {
    /// `namespace.from: SELF` restricts to the Listener's own namespace.
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    /// `None` for the listener pingress adds when there is none.
    pub id: Option<ResourceRef>,
    pub name: String,
    pub port: u16,
    /// Terminates TLS (protocol HTTPS or TLS).
    pub tls: bool,
    /// Carries TCPMappings, not HTTP (protocol TCP or TLS).
    pub l4: bool,
    pub security: SecurityModel,
    pub l7_depth: u32,
    pub binding: HostBinding,
}

const LISTENER_SUPPORTED: &[&str] = &[
    "port",
    "protocol",
    "protocolStack",
    "securityModel",
    "l7Depth",
    "hostBinding",
    "ambassador_id",
];
const LISTENER_LATER: &[&str] = &["http2MaxConcurrentStreams", "statsPrefix"];

pub fn validate_listeners(
    raws: &[&RawResource],
    module: &ModuleSettings,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> Vec<Listener> {
    let mut listeners: Vec<Listener> = Vec::new();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(spec) = parse_section::<ListenerSpec>(raw, "spec", &mut report) else {
            continue;
        };
        check_unknown_fields(
            &spec.other,
            "spec",
            LISTENER_SUPPORTED,
            LISTENER_LATER,
            &mut report,
        );
        // Each key is checked even after another failed: every problem of
        // the Listener is reported at once.
        let port = listener_port(&spec, &mut report);
        let (tls, l4) = protocol(&spec, &mut report);
        let security = security_model(&spec, &mut report);
        let binding = spec
            .host_binding
            .as_ref()
            .map(|hb| host_binding(hb, &raw.id.namespace, &mut report))
            .unwrap_or_default();
        if let Some(port) = port {
            if let Some(other) = listeners.iter().find(|l| l.port == port) {
                report
                    .error(
                        "spec.port",
                        format!("port {port} is already taken by Listener {}", other.name),
                    )
                    .with_code(Code::Conflict);
            }
        }
        if report.has_errors() {
            continue;
        }
        let Some(port) = port else { continue };
        count(accepted, "Listener");
        listeners.push(Listener {
            id: Some(raw.id.clone()),
            name: format!("{}.{}", raw.id.name, raw.id.namespace),
            port,
            tls,
            l4,
            security,
            l7_depth: spec.l7_depth.unwrap_or(module.xff_num_trusted_hops),
            binding,
        });
    }
    listeners
}

/// The required `port`, which must be one a socket can bind.
fn listener_port(spec: &ListenerSpec, report: &mut Reporter) -> Option<u16> {
    match spec.port {
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        Some(p) => {
            report.error("spec.port", format!("{p} is not a port (1-65535)"));
            None
        }
        None => {
            report.error("spec.port", "port is required");
            None
        }
    }
}

/// `protocol`, or the `protocolStack` it stands for: whether the Listener
/// terminates TLS, and whether it carries TCPMappings rather than HTTP.
fn protocol(spec: &ListenerSpec, report: &mut Reporter) -> (bool, bool) {
    let stack: Option<Vec<&str>> = spec
        .protocol_stack
        .as_ref()
        .map(|s| s.iter().map(String::as_str).collect());
    match (spec.protocol.as_deref(), stack.as_deref()) {
        (Some(_), Some(_)) => {
            report.error(
                "spec.protocolStack",
                "set either protocol or protocolStack, not both",
            );
            (false, false)
        }
        (Some("HTTP"), None) | (None, Some(["HTTP", "TCP"])) => (false, false),
        // Emissary's HTTPS also answers cleartext on the same port by
        // inspecting the first bytes; pingress serves TLS only there.
        (Some("HTTPS"), None) | (None, Some(["TLS", "HTTP", "TCP"])) => (true, false),
        (Some("TCP"), None) | (None, Some(["TCP"])) => (false, true),
        (Some("TLS"), None) | (None, Some(["TLS", "TCP"])) => (true, true),
        (Some(p @ ("HTTPPROXY" | "HTTPSPROXY" | "UDP")), None) => {
            report
                .error(
                    "spec.protocol",
                    format!("protocol {p} is not supported by pingress yet"),
                )
                .with_hint("use protocol: HTTP, HTTPS, TCP or TLS");
            (false, false)
        }
        (Some(p), None) => {
            report.error("spec.protocol", format!("unknown protocol {p:?}"));
            (false, false)
        }
        (None, Some(stack)) => {
            report.error(
                "spec.protocolStack",
                format!("protocolStack {stack:?} is not supported by pingress yet; use [HTTP, TCP], [TLS, HTTP, TCP], [TCP] or [TLS, TCP]"),
            );
            (false, false)
        }
        (None, None) => {
            report.error("spec.protocol", "protocol is required");
            (false, false)
        }
    }
}

/// The required `securityModel`: when a request counts as secure.
fn security_model(spec: &ListenerSpec, report: &mut Reporter) -> SecurityModel {
    match spec.security_model.as_deref() {
        Some("XFP") => SecurityModel::Xfp,
        Some("SECURE") => SecurityModel::Secure,
        Some("INSECURE") => SecurityModel::Insecure,
        Some(other) => {
            report
                .error(
                    "spec.securityModel",
                    format!("unknown securityModel {other:?}"),
                )
                .with_hint("XFP, SECURE or INSECURE");
            SecurityModel::Xfp
        }
        None => {
            report.error(
                "spec.securityModel",
                "securityModel is required (XFP, SECURE or INSECURE)",
            );
            SecurityModel::Xfp
        }
    }
}

/// `hostBinding`: which Hosts the Listener serves, by namespace (`SELF`
/// is the Listener's own, `namespace`) and by labels.
fn host_binding(spec: &HostBindingSpec, namespace: &str, report: &mut Reporter) -> HostBinding {
    let mut binding = HostBinding::default();
    match spec.namespace.as_ref().and_then(|n| n.from.as_deref()) {
        Some("SELF") => binding.namespace = Some(namespace.to_string()),
        Some("ALL") | None => {}
        Some(other) => {
            report
                .error(
                    "spec.hostBinding.namespace.from",
                    format!("{other:?} is not supported"),
                )
                .with_hint("SELF or ALL");
        }
    }
    if let Some(selector) = &spec.selector {
        binding.labels = selector_labels(selector, "spec.hostBinding.selector", report);
    }
    binding
}

fn selector_labels(
    selector: &LabelSelector,
    field: &str,
    report: &mut Reporter,
) -> BTreeMap<String, String> {
    check_unknown_fields(
        &selector.other,
        field,
        &["matchLabels"],
        &["matchExpressions"],
        report,
    );
    selector.match_labels.clone()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsecureAction {
    Redirect,
    Route,
    Reject,
}

/// A Host: one virtual host of the gateway.
#[derive(Debug, Clone)]
pub struct VirtualHost {
    /// `None` for the Host pingress synthesizes when there is none.
    pub id: Option<ResourceRef>,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub hostname: HostGlob,
    pub selector: Option<BTreeMap<String, String>>,
    pub insecure: InsecureAction,
    /// Set when the Host terminates TLS.
    pub tls: Option<Arc<TlsContext>>,
    /// Set when the Host resource is invalid (its Secret not issued yet,
    /// say). It keeps its hostname and refuses there, so that no other
    /// Host's certificate or policy serves its names meanwhile.
    pub invalid: Option<InvalidHost>,
}

/// What an invalid Host still claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHost {
    /// It names TLS settings: handshakes for its names fail.
    pub meant_tls: bool,
}

impl VirtualHost {
    /// Emissary's `default-host` when no Host exists: everything, cleartext.
    pub fn synthesized_default() -> VirtualHost {
        VirtualHost {
            id: None,
            name: "default-host".into(),
            namespace: "default".into(),
            labels: BTreeMap::new(),
            hostname: HostGlob::Any,
            selector: None,
            insecure: InsecureAction::Route,
            tls: None,
            invalid: None,
        }
    }
}

const HOST_SUPPORTED: &[&str] = &[
    "hostname",
    "mappingSelector",
    "selector",
    "requestPolicy",
    "tlsSecret",
    "tlsContext",
    "tls",
    "ambassador_id",
];
const HOST_LATER: &[&str] = &["acmeProvider", "previewUrl"];

/// What an invalid Host does, said where it is reported.
const HOST_REFUSES: &str = "the invalid Host keeps its hostname and refuses there (TLS \
                            handshakes fail, cleartext requests get 503) until it is valid";

/// A Host whose spec cannot be read still claims the hostname it names,
/// invalid, so that no other Host serves that name meanwhile.
fn unreadable_host(raw: &RawResource, report: &mut Reporter) -> Option<VirtualHost> {
    let spec = raw.get("spec")?;
    let hostname = match spec.get("hostname") {
        None => "*",
        Some(value) => value.as_str()?,
    };
    let hostname = HostGlob::parse(hostname).ok()?;
    report.warning("spec.hostname", HOST_REFUSES);
    let meant_tls = ["tlsSecret", "tlsContext", "tls"]
        .iter()
        .any(|key| spec.get(*key).is_some());
    Some(VirtualHost {
        id: Some(raw.id.clone()),
        name: raw.id.name.clone(),
        namespace: raw.id.namespace.clone(),
        labels: raw.labels.clone(),
        hostname,
        selector: None,
        insecure: InsecureAction::Reject,
        tls: None,
        invalid: Some(InvalidHost { meant_tls }),
    })
}

pub fn validate_hosts(
    raws: &[&RawResource],
    contexts: &TlsContexts,
    secrets: &SecretStore,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> Vec<VirtualHost> {
    let mut hosts = Vec::new();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(spec) = parse_section::<HostSpec>(raw, "spec", &mut report) else {
            hosts.extend(unreadable_host(raw, &mut report));
            continue;
        };
        check_unknown_fields(&spec.other, "spec", HOST_SUPPORTED, HOST_LATER, &mut report);
        let hostname = match HostGlob::parse(spec.hostname.as_deref().unwrap_or("*")) {
            Ok(glob) => glob,
            Err(e) => {
                report.error("spec.hostname", e.to_string());
                continue;
            }
        };
        let selector = match (&spec.mapping_selector, &spec.selector) {
            (Some(s), _) => Some(selector_labels(s, "spec.mappingSelector", &mut report)),
            (None, Some(s)) => Some(selector_labels(s, "spec.selector", &mut report)),
            (None, None) => None,
        };
        let action = spec
            .request_policy
            .as_ref()
            .and_then(|p| p.insecure.as_ref())
            .and_then(|i| i.action.as_deref());
        let insecure = match action {
            None | Some("Redirect") => InsecureAction::Redirect,
            Some("Route") => InsecureAction::Route,
            Some("Reject") => InsecureAction::Reject,
            Some(other) => {
                report
                    .error(
                        "spec.requestPolicy.insecure.action",
                        format!("unknown action {other:?}"),
                    )
                    .with_hint("Redirect, Route or Reject (case-sensitive)");
                InsecureAction::Reject
            }
        };
        let tls = super::host_tls::resolve(raw, &spec, contexts, secrets, &mut report);
        let invalid = report.has_errors().then(|| {
            report.warning("spec.hostname", HOST_REFUSES);
            InvalidHost {
                meant_tls: spec.tls_secret.is_some()
                    || spec.tls_context.is_some()
                    || spec.tls.is_some(),
            }
        });
        if invalid.is_none() {
            count(accepted, "Host");
        }
        hosts.push(VirtualHost {
            id: Some(raw.id.clone()),
            name: raw.id.name.clone(),
            namespace: raw.id.namespace.clone(),
            labels: raw.labels.clone(),
            hostname,
            selector,
            insecure,
            tls: tls.filter(|_| invalid.is_none()),
            invalid,
        });
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_documents;
    use crate::model::key_coverage::{assert_fields_listed, document};
    use crate::model::spec::assert_used_or_named;
    use std::path::Path;

    /// The diagnostics and result of validating `kind` with `spec` (block
    /// YAML), with `validate` over the parsed resources.
    fn validated<T>(
        kind: &str,
        name: &str,
        spec: &str,
        validate: impl FnOnce(&[&RawResource], &mut Vec<Diagnostic>) -> T,
    ) -> (T, Vec<Diagnostic>) {
        let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        let yaml = format!(
            "apiVersion: getambassador.io/v3alpha1\nkind: {kind}\nmetadata:\n  name: {name}\n\
             spec:\n{spec}"
        );
        let (mut raws, mut diags) = (Vec::new(), Vec::new());
        parse_documents(Path::new("keys.yaml"), &yaml, &mut raws, &mut diags);
        let refs: Vec<&RawResource> = raws.iter().collect();
        let out = validate(&refs, &mut diags);
        (out, diags)
    }

    /// The Module `name` with `config` (block YAML): the settings it
    /// leaves and what it reported.
    fn module(name: &str, config: &str) -> (ModuleSettings, Vec<Diagnostic>) {
        let config: String = config.lines().map(|l| format!("  {l}\n")).collect();
        validated(
            "Module",
            name,
            &format!("config:\n{config}"),
            |raws, diags| validate_modules(raws, diags, &mut BTreeMap::new()),
        )
    }

    /// Each diagnostic as severity, field and message.
    fn reported(diags: &[Diagnostic]) -> Vec<(bool, String, String)> {
        diags
            .iter()
            .map(|d| {
                (
                    d.is_error(),
                    d.field.clone().unwrap_or_default(),
                    d.message.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn what_a_module_leaves_unset_takes_the_builtin_default() {
        let (settings, diags) = module("ambassador", "server_name: edge");
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(settings.server_name.as_deref(), Some("edge"));
        assert_eq!(settings.request_timeout_ms, 3000);
        assert!(settings.enable_ipv4 && !settings.enable_ipv6);
        assert_eq!(settings.underscores, UnderscoreAction::Allow);
        assert_eq!(settings.access_log, AccessLog::Text);
        assert_eq!(settings.max_request_headers, 60 * 1024);
        assert_eq!(
            settings.listener_idle_timeout,
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(settings.default_label_domain, "ambassador");
    }

    #[test]
    fn zero_timeouts_mean_no_limit() {
        let (settings, diags) = module(
            "ambassador",
            "listener_idle_timeout_ms: 0\ncluster_idle_timeout_ms: 0\ncluster_max_connection_lifetime_ms: 1500",
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(settings.listener_idle_timeout, None);
        assert_eq!(settings.connections.idle_timeout, None);
        assert_eq!(
            settings.connections.max_lifetime,
            Some(std::time::Duration::from_millis(1500))
        );
    }

    #[test]
    fn max_request_headers_kb_is_bounded_by_what_pingora_reads() {
        let (settings, diags) = module("ambassador", "max_request_headers_kb: 1023");
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(settings.max_request_headers, 1023 * 1024);
        for kb in [0, 1024] {
            let (settings, diags) = module(
                "ambassador",
                &format!("server_name: edge\nmax_request_headers_kb: {kb}"),
            );
            let field = "spec.config.max_request_headers_kb".to_string();
            assert!(
                matches!(&reported(&diags)[..], [(true, f, _)] if *f == field),
                "{kb}: {diags:?}"
            );
            // A Module with an error is not applied at all.
            assert_eq!(settings.server_name, None, "{kb}");
        }
    }

    #[test]
    fn module_keys_for_later_warn_and_unknown_ones_are_errors() {
        let (settings, diags) = module(
            "ambassador",
            "server_name: edge\ngzip:\n  min_content_length: 32",
        );
        assert_eq!(
            reported(&diags),
            [(
                false,
                "spec.config.gzip".to_string(),
                "not supported by pingress yet; ignored".to_string()
            )]
        );
        assert_eq!(settings.server_name.as_deref(), Some("edge"));

        let (settings, diags) = module("ambassador", "server_nme: edge");
        assert_eq!(
            reported(&diags),
            [(
                true,
                "spec.config.server_nme".to_string(),
                "unknown field".to_string()
            )]
        );
        assert_eq!(
            diags[0].hint.as_deref(),
            Some("did you mean `server_name`?")
        );
        assert_eq!(settings.server_name, None);
    }

    #[test]
    fn only_the_first_module_named_ambassador_is_read() {
        let (settings, diags) = module("tls", "server_name: edge");
        assert_eq!(settings.server_name, None);
        assert!(
            matches!(&reported(&diags)[..], [(false, f, _)] if f == "metadata.name"),
            "{diags:?}"
        );

        let yaml = [
            document("Module", "ambassador", "config:\n  server_name: first"),
            document("Module", "ambassador", "config:\n  server_name: second"),
        ]
        .concat();
        let (mut raws, mut diags) = (Vec::new(), Vec::new());
        parse_documents(Path::new("modules.yaml"), &yaml, &mut raws, &mut diags);
        let refs: Vec<&RawResource> = raws.iter().collect();
        let settings = validate_modules(&refs, &mut diags, &mut BTreeMap::new());
        assert_eq!(settings.server_name.as_deref(), Some("first"));
        assert!(
            matches!(&reported(&diags)[..], [(true, f, _)] if f == "metadata.name"),
            "{diags:?}"
        );
    }

    #[test]
    fn mapping_defaults_under_httpmapping_win_key_by_key() {
        let (settings, diags) = module(
            "ambassador",
            "defaults:\n  add_request_headers:\n    x-top: a\n  remove_response_headers: [x-gone]\n  \
             httpmapping:\n    add_request_headers:\n      x-class: b",
        );
        assert!(diags.is_empty(), "{diags:?}");
        let added: Vec<&str> = settings
            .defaults
            .request
            .as_ref()
            .unwrap()
            .add
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(added, ["x-class"]);
        let removed = settings.defaults.remove_response.unwrap();
        assert_eq!(removed, [HeaderName::from_static("x-gone")]);
    }

    /// A value for every Module key pingress reads; LATER keys take `1`.
    const MODULE_SAMPLES: &[(&str, &str)] = &[
        ("defaults", "defaults:\n  add_request_headers:\n    x-a: b"),
        (
            "cluster_request_timeout_ms",
            "cluster_request_timeout_ms: 5000",
        ),
        ("server_name", "server_name: edge"),
        ("add_linkerd_headers", "add_linkerd_headers: true"),
        ("xff_num_trusted_hops", "xff_num_trusted_hops: 1"),
        ("use_remote_address", "use_remote_address: false"),
        ("merge_slashes", "merge_slashes: true"),
        (
            "reject_requests_with_escaped_slashes",
            "reject_requests_with_escaped_slashes: true",
        ),
        (
            "headers_with_underscores_action",
            "headers_with_underscores_action: DROP_HEADER",
        ),
        ("strip_matching_host_port", "strip_matching_host_port: true"),
        ("suppress_envoy_headers", "suppress_envoy_headers: true"),
        (
            "use_ambassador_namespace_for_service_resolution",
            "use_ambassador_namespace_for_service_resolution: true",
        ),
        ("enable_ipv4", "enable_ipv4: false"),
        ("enable_ipv6", "enable_ipv6: true"),
        (
            "forward_client_cert_details",
            "forward_client_cert_details: SANITIZE_SET",
        ),
        (
            "set_current_client_cert_details",
            "set_current_client_cert_details:\n  subject: true",
        ),
        ("envoy_log_type", "envoy_log_type: json"),
        (
            "circuit_breakers",
            "circuit_breakers:\n- max_connections: 5",
        ),
        ("retry_policy", "retry_policy:\n  retry_on: 5xx"),
        (
            "keepalive",
            "keepalive:\n  idle_time: 100\n  interval: 10\n  probes: 3",
        ),
        (
            "preserve_external_request_id",
            "preserve_external_request_id: true",
        ),
        ("cors", "cors:\n  origins: [http://a.example]"),
        ("ip_allow", "ip_allow:\n- remote: 10.0.0.0/8"),
        ("ip_deny", "ip_deny:\n- remote: 10.0.0.0/8"),
        ("default_label_domain", "default_label_domain: other"),
        (
            "default_labels",
            "default_labels:\n  ambassador:\n    defaults:\n    - generic_key: {value: g}",
        ),
        ("resolver", "resolver: endpoint"),
        ("load_balancer", "load_balancer:\n  policy: least_request"),
        ("cluster_idle_timeout_ms", "cluster_idle_timeout_ms: 1000"),
        (
            "cluster_max_connection_lifetime_ms",
            "cluster_max_connection_lifetime_ms: 1000",
        ),
        ("listener_idle_timeout_ms", "listener_idle_timeout_ms: 1000"),
        ("max_request_headers_kb", "max_request_headers_kb: 8"),
        ("diagnostics", "diagnostics:\n  allow_non_local: true"),
    ];

    /// A key that is read and then does nothing is a silent defect: each
    /// key the Module accepts changes the settings or draws a warning that
    /// names it.
    #[test]
    fn every_module_key_is_used_or_warned() {
        let default = format!("{:?}", ModuleSettings::default());
        let keys = [MODULE_SUPPORTED, MODULE_LATER].concat();
        assert_fields_listed("", &ModuleConfig::default(), &keys);
        for key in MODULE_SUPPORTED.iter().chain(MODULE_LATER) {
            let later = format!("{key}: 1");
            let sample = match MODULE_SAMPLES.iter().find(|(k, _)| k == key) {
                Some((_, sample)) => *sample,
                None if MODULE_LATER.contains(key) => &later,
                None => panic!("MODULE_SAMPLES has no value for `{key}`"),
            };
            let config: String = sample.lines().map(|l| format!("  {l}\n")).collect();
            let (settings, diags) = validated(
                "Module",
                "ambassador",
                &format!("config:\n{config}"),
                |raws, diags| validate_modules(raws, diags, &mut BTreeMap::new()),
            );
            assert!(!diags.iter().any(Diagnostic::is_error), "{key}: {diags:?}");
            assert_used_or_named(key, format!("{settings:?}") != default, &diags);
        }
    }

    /// The same for a Host's keys, beside a TLS Secret and a TLSContext.
    #[test]
    fn every_host_key_is_used_or_warned() {
        let hosts = |spec: &str| {
            let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
            let yaml = format!(
                "apiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: ctx\n\
                 spec:\n  hosts: [h.example]\n  alpn_protocols: h2\n---\n\
                 apiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: h\n\
                 spec:\n{spec}"
            );
            let (mut raws, mut diags) = (Vec::new(), Vec::new());
            parse_documents(Path::new("keys.yaml"), &yaml, &mut raws, &mut diags);
            let registry = crate::filters::Registry::with_builtins();
            let (model, more) = crate::model::validate(&raws, "default", &registry);
            diags.extend(more);
            (format!("{:?}", model.hosts), diags)
        };
        let base = "hostname: h.example";
        let (plain, diags) = hosts(base);
        assert!(!diags.iter().any(Diagnostic::is_error), "{diags:?}");
        assert_eq!(plain, hosts(base).0);
        let samples: &[(&str, &str)] = &[
            ("hostname", "hostname: other.example"),
            (
                "mappingSelector",
                "hostname: h.example\nmappingSelector:\n  matchLabels:\n    a: b",
            ),
            (
                "selector",
                "hostname: h.example\nselector:\n  matchLabels:\n    a: b",
            ),
            (
                "requestPolicy",
                "hostname: h.example\nrequestPolicy:\n  insecure:\n    action: Reject",
            ),
            (
                "tlsSecret",
                "hostname: h.example\ntlsSecret:\n  name: missing",
            ),
            (
                "tlsContext",
                "hostname: h.example\ntlsContext:\n  name: ctx",
            ),
            ("tls", "hostname: h.example\ntls:\n  alpn_protocols: h2"),
        ];
        let keys = [HOST_SUPPORTED, HOST_LATER].concat();
        assert_fields_listed("", &HostSpec::default(), &keys);
        // ambassador_id is read where resources are sorted by kind.
        for key in HOST_SUPPORTED
            .iter()
            .chain(HOST_LATER)
            .filter(|k| **k != "ambassador_id")
        {
            let later = format!("{base}\n{key}: 1");
            let spec = match samples.iter().find(|(k, _)| k == key) {
                Some((_, sample)) => sample.to_string(),
                None if HOST_LATER.contains(key) => later,
                None => panic!("no sample for the Host's `{key}`"),
            };
            let (result, diags) = hosts(&spec);
            assert_used_or_named(key, result != plain, &diags);
        }
    }

    /// The same for a Listener's keys.
    #[test]
    fn every_listener_key_is_used_or_warned() {
        let base = "port: 8080\nprotocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL";
        let listeners = |spec: &str| {
            validated("Listener", "l", spec, |raws, diags| {
                let listeners = validate_listeners(
                    raws,
                    &ModuleSettings::default(),
                    diags,
                    &mut BTreeMap::new(),
                );
                format!("{listeners:?}")
            })
        };
        let (plain, diags) = listeners(base);
        assert!(diags.is_empty(), "{diags:?}");
        let samples: &[(&str, &str)] = &[
            ("port", "port: 8081\nprotocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL"),
            ("protocol", "port: 8080\nprotocol: HTTPS\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL"),
            ("protocolStack", "port: 8080\nprotocolStack: [TLS, HTTP, TCP]\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL"),
            ("securityModel", "port: 8080\nprotocol: HTTP\nsecurityModel: SECURE\nhostBinding:\n  namespace:\n    from: ALL"),
            ("l7Depth", &format!("{base}\nl7Depth: 1")),
            ("hostBinding", "port: 8080\nprotocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: SELF"),
        ];
        let keys = [LISTENER_SUPPORTED, LISTENER_LATER].concat();
        assert_fields_listed("", &ListenerSpec::default(), &keys);
        // ambassador_id is read where resources are sorted by kind: a
        // Listener of another instance never reaches this function.
        for key in LISTENER_SUPPORTED
            .iter()
            .chain(LISTENER_LATER)
            .filter(|k| **k != "ambassador_id")
        {
            let later = format!("{base}\n{key}: 1");
            let spec = match samples.iter().find(|(k, _)| k == key) {
                Some((_, sample)) => sample.to_string(),
                None if LISTENER_LATER.contains(key) => later,
                None => panic!("no sample for the Listener's `{key}`"),
            };
            let (result, diags) = listeners(&spec);
            assert_used_or_named(key, result != plain, &diags);
        }
    }
}
