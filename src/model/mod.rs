//! Stage 2: validate raw resources into the model.
//!
//! The model is the configuration with defaults applied, references resolved
//! (Mapping → TLSContext → Secret) and PEM parsed. Each resource is checked on
//! its own: a bad one is reported and left out, its siblings stay.

mod auth_service;
mod edge;
mod filter_policy;
mod health;
mod host_tls;
#[cfg(test)]
pub(crate) mod key_coverage;
mod kubernetes;
mod mapping;
mod rate_labels;
pub(crate) mod rate_limit;
pub(crate) mod spec;
mod tcp_mapping;
mod tls_context;
pub mod upstream_trust;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::upstream::cluster::ResolverKind;
pub(crate) use edge::header_names;
pub use edge::{
    HostBinding, InsecureAction, InvalidHost, Listener, SecurityModel, UnderscoreAction,
    VirtualHost,
};
pub use kubernetes::Resolvers;
pub use mapping::{Association, Mapping, Rewrite};
pub use tcp_mapping::TcpMapping;
pub use tls_context::TlsContexts;

use crate::config::diagnostics::{closest, Code, Diagnostic, Reporter, Source};
use crate::config::load::RawResource;
use crate::filters::auth::AuthServices;
use crate::filters::cors::CorsPolicy;
use crate::filters::ip::IpFilter;
use crate::filters::policy::FilterPolicies;
use crate::filters::rate_limit::labels::DefaultLabels;
use crate::filters::rate_limit::RateLimits;
use crate::filters::Registry;
use crate::routing::headers::HeaderEdits;
use crate::routing::path::PathOptions;
use crate::routing::xfcc::XfccPolicy;
use crate::upstream::balancer::Policy;
use crate::upstream::breaker::Thresholds;
use crate::upstream::cluster::ConnectionOptions;
use crate::upstream::endpoints::EndpointIndex;
use crate::upstream::retry::RetryPolicy;
pub(crate) use mapping::{breaker_thresholds, cors, keepalive, load_balancer, retry_policy};

/// The Module-wide settings that shape Mappings and requests.
#[derive(Debug, Clone)]
pub struct ModuleSettings {
    pub request_timeout_ms: u64,
    pub server_name: Option<String>,
    pub add_linkerd_headers: bool,
    pub xff_num_trusted_hops: u32,
    /// `merge_slashes` and `reject_requests_with_escaped_slashes`.
    pub path: PathOptions,
    /// `headers_with_underscores_action`.
    pub underscores: UnderscoreAction,
    pub strip_matching_host_port: bool,
    pub suppress_envoy_headers: bool,
    pub use_ambassador_namespace: bool,
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    /// `x-forwarded-client-cert` handling.
    pub xfcc: XfccPolicy,
    /// `envoy_log_type`.
    pub access_log: AccessLog,
    /// The default `circuit_breakers` of every Mapping.
    pub circuit_breakers: Thresholds,
    /// The default `retry_policy` of every Mapping.
    pub retry_policy: Option<RetryPolicy>,
    /// The default `resolver` of every Mapping.
    pub resolver: String,
    /// The default `load_balancer` of Mappings that use an endpoint resolver.
    pub load_balancer: Option<Policy>,
    /// The default `cluster_idle_timeout_ms`, `cluster_max_connection_lifetime_ms`
    /// and `keepalive`.
    pub connections: ConnectionOptions,
    pub defaults: MappingDefaults,
    pub preserve_external_request_id: bool,
    /// The default `cors` of every Mapping.
    pub cors: Option<Arc<CorsPolicy>>,
    /// `ip_allow` / `ip_deny`.
    pub(crate) ip_filter: Option<IpFilter>,
    /// The label domain evaluated when no RateLimitService names one.
    pub default_label_domain: String,
    /// Label specifiers put in front of every Mapping's groups.
    pub(crate) default_labels: DefaultLabels,
    /// `listener_idle_timeout_ms`: how long a client connection may wait
    /// between requests; `None` (0) waits as long as the client does.
    pub listener_idle_timeout: Option<Duration>,
    /// `max_request_headers_kb`, in bytes: the largest request head.
    pub max_request_headers: usize,
    /// `diagnostics.allow_non_local`: the admin's diag answers clients
    /// beyond this host too.
    pub diagnostics_allow_non_local: bool,
}

/// Envoy's `idle_timeout` of a connection manager, which an Emissary user
/// without `listener_idle_timeout_ms` gets: longer than the idle timeouts
/// of the cloud load balancers in front (60 s to 350 s), which must close
/// first or race a closing gateway into 502s.
pub const DEFAULT_LISTENER_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Envoy's default `max_request_headers_kb`.
pub const DEFAULT_MAX_REQUEST_HEADERS_KB: u32 = 60;

/// Pingora reads a head of at most 1 MiB.
pub const MAX_REQUEST_HEADERS_KB: u32 = 1023;

impl Default for ModuleSettings {
    fn default() -> Self {
        ModuleSettings {
            request_timeout_ms: 3000,
            server_name: None,
            add_linkerd_headers: false,
            xff_num_trusted_hops: 0,
            path: PathOptions::default(),
            underscores: UnderscoreAction::default(),
            strip_matching_host_port: false,
            suppress_envoy_headers: false,
            use_ambassador_namespace: false,
            enable_ipv4: true,
            enable_ipv6: false,
            xfcc: XfccPolicy::default(),
            access_log: AccessLog::Text,
            circuit_breakers: Thresholds::default(),
            retry_policy: None,
            resolver: "kubernetes-service".into(),
            load_balancer: None,
            connections: ConnectionOptions::default(),
            defaults: MappingDefaults::default(),
            preserve_external_request_id: false,
            cors: None,
            ip_filter: None,
            default_label_domain: "ambassador".into(),
            default_labels: DefaultLabels::new(),
            listener_idle_timeout: Some(DEFAULT_LISTENER_IDLE_TIMEOUT),
            max_request_headers: DEFAULT_MAX_REQUEST_HEADERS_KB as usize * 1024,
            diagnostics_allow_non_local: false,
        }
    }
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Text,
    Json,
}

/// `defaults.httpmapping` of the Module. Each is replaced, never merged, by
/// a Mapping that sets the same key.
#[derive(Debug, Clone, Default)]
pub struct MappingDefaults {
    pub request: Option<HeaderEdits>,
    pub response: Option<HeaderEdits>,
    pub remove_request: Option<Vec<http::HeaderName>>,
    pub remove_response: Option<Vec<http::HeaderName>>,
}

/// The validated configuration.
#[derive(Debug, Default)]
pub struct Model {
    pub module: ModuleSettings,
    pub listeners: Vec<Listener>,
    /// Valid and invalid Hosts (see [`VirtualHost::invalid`]).
    pub hosts: Vec<VirtualHost>,
    /// Whether any Host resource is this gateway's, valid or not: only
    /// without one does the gateway synthesize its cleartext `*` Host.
    pub host_resources: bool,
    pub mappings: Vec<Mapping>,
    pub tcp_mappings: Vec<TcpMapping>,
    pub tls_contexts: TlsContexts,
    pub filter_policies: FilterPolicies,
    pub auth_services: AuthServices,
    /// RateLimits of the evaluated label domain, and where counters live.
    pub rate_limits: Arc<RateLimits>,
    pub resolvers: Resolvers,
    /// Kubernetes Services, Endpoints and EndpointSlices.
    pub endpoints: EndpointIndex,
    /// Accepted resources per kind, for `pingress -t`.
    pub accepted: BTreeMap<String, usize>,
    /// Certificate files the resources name, valid or not: a reload must
    /// notice when one appears or changes.
    pub referenced_files: Vec<PathBuf>,
    /// How upstreams without a CA are verified: the gateway file's
    /// `upstream_tls`, set by `upstream_trust::apply`.
    pub upstream_trust: crate::upstream::trust::Trust,
}

/// Secrets by `(namespace, name)`.
pub(crate) type SecretStore = HashMap<(String, String), RawResource>;

const SUPPORTED_API_VERSIONS: &[&str] = &["getambassador.io/v3alpha1", "getambassador.io/v2"];

/// The Emissary kinds pingress implements (besides the core Secret).
const KINDS: &[&str] = &[
    "Mapping",
    "TCPMapping",
    "TLSContext",
    "Host",
    "Listener",
    "Module",
    "Filter",
    "FilterPolicy",
    "AuthService",
    "RateLimit",
    "RateLimitService",
    "KubernetesServiceResolver",
    "KubernetesEndpointResolver",
    "ConsulResolver",
];

const RESOLVER_KINDS: &[&str] = &[
    "KubernetesServiceResolver",
    "KubernetesEndpointResolver",
    "ConsulResolver",
];

/// Emissary kinds that pingress recognises but does not implement yet.
const LATER_KINDS: &[&str] = &["LogService", "TracingService", "DevPortal"];

/// Kubernetes kinds that often share a manifest file with Emissary resources.
const IGNORED_KUBERNETES_KINDS: &[&str] = &[
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Pod",
    "Namespace",
    "ConfigMap",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "Ingress",
    "IngressClass",
    "CustomResourceDefinition",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
];

/// Validates every resource; `ambassador_id` selects this instance's share.
pub fn validate<R: std::borrow::Borrow<RawResource>>(
    resources: &[R],
    ambassador_id: &str,
    registry: &Registry,
) -> (Model, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut by_kind: BTreeMap<&str, Vec<&RawResource>> = BTreeMap::new();
    let mut seen = HashMap::new();
    let mut secrets = SecretStore::new();

    for raw in resources {
        let raw: &RawResource = raw.borrow();
        let kind = raw.id.kind.as_str();
        if kind == "Secret" {
            if raw.api_version != "v1" {
                Reporter::new(raw.location(), &mut diags).error(
                    "apiVersion",
                    format!("a Secret has apiVersion v1, not {:?}", raw.api_version),
                );
                continue;
            }
            let key = (raw.id.namespace.clone(), raw.id.name.clone());
            match secrets.entry(key) {
                Entry::Occupied(first) => duplicate(raw, &first.get().id.source, &mut diags),
                Entry::Vacant(slot) => {
                    slot.insert(raw.clone());
                }
            }
            continue;
        }
        let Some(group) = group(raw, ambassador_id, &mut diags) else {
            continue;
        };
        let identity = (kind, raw.id.namespace.as_str(), raw.id.name.as_str());
        if let Some(&first) = seen.get(&identity) {
            duplicate(raw, first, &mut diags);
            continue;
        }
        seen.insert(identity, &raw.id.source);
        by_kind.entry(group).or_default().push(raw);
    }

    let mut model = Model::default();
    let kinds = |k: &str| by_kind.get(k).cloned().unwrap_or_default();

    model.module = edge::validate_modules(&kinds("Module"), &mut diags, &mut model.accepted);
    model.rate_limits = Arc::new(rate_limit::validate(
        &kinds("RateLimit"),
        &kinds("RateLimitService"),
        &model.module,
        &mut diags,
        &mut model.accepted,
    ));
    model.tls_contexts = tls_context::validate_all(
        &kinds("TLSContext"),
        &secrets,
        &mut diags,
        &mut model.accepted,
    );
    model.listeners = edge::validate_listeners(
        &kinds("Listener"),
        &model.module,
        &mut diags,
        &mut model.accepted,
    );
    model.host_resources = !kinds("Host").is_empty();
    model.hosts = edge::validate_hosts(
        &kinds("Host"),
        &model.tls_contexts,
        &secrets,
        &mut diags,
        &mut model.accepted,
    );
    model.resolvers =
        kubernetes::validate_resolvers(&kinds("resolver"), &mut diags, &mut model.accepted);
    model.endpoints =
        kubernetes::validate_endpoints(&kinds("kubernetes"), &mut diags, &mut model.accepted);
    model.mappings = mapping::validate_all(
        &kinds("Mapping"),
        &model.module,
        &model.tls_contexts,
        &model.resolvers,
        &mut diags,
        &mut model.accepted,
    );
    model.auth_services = auth_service::validate_all(
        &kinds("AuthService"),
        &model.tls_contexts,
        &mut diags,
        &mut model.accepted,
    );
    model.filter_policies = filter_policy::validate(
        &kinds("Filter"),
        &kinds("FilterPolicy"),
        registry,
        &mut diags,
        &mut model.accepted,
    );
    model.tcp_mappings = tcp_mapping::validate_all(
        &kinds("TCPMapping"),
        &model.module,
        &model.tls_contexts,
        &model.hosts,
        &mut diags,
        &mut model.accepted,
    );
    model.referenced_files = referenced_files(kinds("TLSContext").iter().chain(&kinds("Host")));
    let secret_count = secrets.len();
    if secret_count > 0 {
        model.accepted.insert("Secret".into(), secret_count);
    }
    (model, diags)
}

/// The certificate files of TLSContexts and of Hosts' inline `tls`.
fn referenced_files<'r>(raws: impl Iterator<Item = &'r &'r RawResource>) -> Vec<PathBuf> {
    const KEYS: [&str; 6] = [
        "cert_chain_file",
        "private_key_file",
        "cacert_chain_file",
        "certChainFile",
        "privateKeyFile",
        "cacertChainFile",
    ];
    let mut files = Vec::new();
    for raw in raws {
        let Some(spec) = raw.get("spec") else {
            continue;
        };
        let settings = match raw.id.kind.as_str() {
            "Host" => spec.get("tls"),
            _ => Some(spec),
        };
        for key in KEYS {
            if let Some(path) = settings.and_then(|s| s.get(key)).and_then(|v| v.as_str()) {
                files.push(PathBuf::from(path));
            }
        }
    }
    files
}

/// Which validator takes a resource other than a Secret; `None` when it is
/// not this gateway's to read (reported in `diags` where that is a mistake).
fn group<'a>(
    raw: &'a RawResource,
    ambassador_id: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<&'a str> {
    let kind = raw.id.kind.as_str();
    if let Some((_, version)) = kubernetes::API_VERSIONS.iter().find(|(k, _)| *k == kind) {
        if raw.api_version != *version {
            Reporter::new(raw.location(), diags).error(
                "apiVersion",
                format!(
                    "pingress reads {kind} in apiVersion {version}, not {:?}",
                    raw.api_version
                ),
            );
            return None;
        }
        return Some("kubernetes");
    }
    if !raw.api_version.starts_with("getambassador.io/") {
        if !IGNORED_KUBERNETES_KINDS.contains(&kind) {
            // An Emissary kind under another group is a misspelt apiVersion,
            // whose place keeps its last good resource; another
            // controller's kind (cert-manager's Certificate) is no mistake.
            let code = if KINDS.contains(&kind) || LATER_KINDS.contains(&kind) {
                Code::ResourceIgnored
            } else {
                Code::Unsupported
            };
            diags.push(
                Diagnostic::warning(
                    raw.location(),
                    format!("pingress does not use {} {kind}; ignored", raw.api_version),
                )
                .code(code),
            );
        }
        return None;
    }
    if !SUPPORTED_API_VERSIONS.contains(&raw.api_version.as_str()) {
        Reporter::new(raw.location(), diags)
            .error(
                "apiVersion",
                format!("unsupported apiVersion {:?}", raw.api_version),
            )
            .with_hint("use getambassador.io/v3alpha1 (v2 is read too)");
        return None;
    }
    if !spec::belongs_to(spec::ambassador_ids(raw).as_ref(), ambassador_id) {
        return None;
    }
    if LATER_KINDS.contains(&kind) {
        diags.push(
            Diagnostic::warning(
                raw.location(),
                format!("{kind} is not supported by pingress yet; ignored"),
            )
            .code(Code::Unsupported),
        );
        return None;
    }
    if !KINDS.contains(&kind) {
        let mut known: Vec<&str> = KINDS.to_vec();
        known.extend_from_slice(LATER_KINDS);
        let hint = match closest(kind, &known) {
            Some(kind) => format!("did you mean {kind}? "),
            None => String::new(),
        };
        Reporter::new(raw.location(), diags)
            .error("kind", format!("unknown kind {kind:?}"))
            .with_hint(format!(
                "{hint}pingress reads {}, Secret, Service, Endpoints and EndpointSlice",
                KINDS.join(", ")
            ));
        return None;
    }
    Some(if RESOLVER_KINDS.contains(&kind) {
        "resolver"
    } else {
        kind
    })
}

fn duplicate(raw: &RawResource, first: &Source, diags: &mut Vec<Diagnostic>) {
    diags.push(
        Diagnostic::error(
            raw.location(),
            format!(
                "{first} already defines {} {}/{}; this one is ignored",
                raw.id.kind, raw.id.namespace, raw.id.name
            ),
        )
        .code(Code::ResourceIgnored)
        .field("metadata.name")
        .hint("give each resource of a kind a unique name within its namespace"),
    );
}

pub(crate) fn count(accepted: &mut BTreeMap<String, usize>, kind: &str) {
    *accepted.entry(kind.to_string()).or_default() += 1;
}
