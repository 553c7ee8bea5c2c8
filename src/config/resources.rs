//! Wire types: the Emissary resources exactly as users write them in YAML.
//!
//! These types only describe shape. Defaults, cross-references and semantic
//! checks live in [`crate::model`]; nothing here reaches the request path.
//! Each spec keeps the keys it does not know in `other`, so validation can
//! tell a known-but-unsupported Emissary field (a warning) from a typo (an
//! error with a suggestion).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_yaml::Value;

/// A YAML map whose entries keep their written order (header lists are
/// applied in the order the user wrote them).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<T>(pub Vec<(String, T)>);

impl<T> Default for OrderedMap<T> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for OrderedVisitor<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, T>()? {
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
        }
        deserializer.deserialize_any(OrderedVisitor(PhantomData))
    }
}

/// Emissary accepts several list fields either as a YAML list or as a single
/// (sometimes comma-separated) string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        }
    }
}

/// A header or query match value. Emissary v2 allowed `true` to mean "present".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MatchValue {
    Exact(String),
    Present(bool),
}

/// `add_request_headers` values: a plain string or `{value, append}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum AddHeaderValue {
    Plain(String),
    Detailed {
        value: String,
        #[serde(default)]
        append: Option<bool>,
    },
}

/// `tls:` on a Mapping names a TLSContext; v2 also allowed `tls: true`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MappingTls {
    Context(String),
    Enabled(bool),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RegexRewrite {
    pub pattern: String,
    pub substitution: String,
}

/// `retry_policy` of a Mapping or the Module.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicySpec {
    pub retry_on: Option<String>,
    pub num_retries: Option<u32>,
    pub per_try_timeout: Option<String>,
}

/// One entry of `circuit_breakers`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    pub priority: Option<String>,
    #[serde(default, deserialize_with = "super::bounds::breaker_threshold")]
    pub max_connections: Option<usize>,
    #[serde(default, deserialize_with = "super::bounds::breaker_threshold")]
    pub max_pending_requests: Option<usize>,
    #[serde(default, deserialize_with = "super::bounds::breaker_threshold")]
    pub max_requests: Option<usize>,
    #[serde(default, deserialize_with = "super::bounds::breaker_threshold")]
    pub max_retries: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MappingSpec {
    pub prefix: Option<String>,
    pub prefix_regex: Option<bool>,
    pub prefix_exact: Option<bool>,
    pub case_sensitive: Option<bool>,
    pub hostname: Option<String>,
    pub host: Option<String>,
    pub host_regex: Option<bool>,
    pub method: Option<String>,
    pub method_regex: Option<bool>,
    pub headers: Option<OrderedMap<MatchValue>>,
    pub regex_headers: Option<OrderedMap<String>>,
    pub query_parameters: Option<OrderedMap<MatchValue>>,
    pub regex_query_parameters: Option<OrderedMap<String>>,
    pub precedence: Option<i64>,
    pub rewrite: Option<String>,
    pub regex_rewrite: Option<RegexRewrite>,
    pub host_rewrite: Option<String>,
    pub auto_host_rewrite: Option<bool>,
    pub service: Option<String>,
    pub tls: Option<MappingTls>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub idle_timeout_ms: Option<u64>,
    pub add_request_headers: Option<OrderedMap<AddHeaderValue>>,
    pub add_response_headers: Option<OrderedMap<AddHeaderValue>>,
    pub remove_request_headers: Option<StringOrList>,
    pub remove_response_headers: Option<StringOrList>,
    pub grpc: Option<bool>,
    pub circuit_breakers: Option<Vec<CircuitBreakerSpec>>,
    pub retry_policy: Option<RetryPolicySpec>,
    pub host_redirect: Option<bool>,
    pub path_redirect: Option<String>,
    pub prefix_redirect: Option<String>,
    pub regex_redirect: Option<RegexRewrite>,
    pub redirect_response_code: Option<u16>,
    pub add_linkerd_headers: Option<bool>,
    pub weight: Option<u32>,
    pub labels: Option<Value>,
    pub resolver: Option<String>,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub health_checks: Option<Vec<HealthCheckSpec>>,
    pub dns_type: Option<String>,
    pub respect_dns_ttl: Option<bool>,
    pub enable_ipv4: Option<bool>,
    pub enable_ipv6: Option<bool>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub cluster_idle_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub cluster_max_connection_lifetime_ms: Option<u64>,
    pub keepalive: Option<KeepaliveSpec>,
    pub cors: Option<Value>,
    pub bypass_auth: Option<bool>,
    pub allow_upgrade: Option<Vec<String>>,
    pub use_websocket: Option<bool>,
    pub shadow: Option<bool>,
    pub ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A duration in milliseconds that Emissary's CRDs type as a string for
/// some fields (TCPMapping `idle_timeout_ms`): both forms are read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Milliseconds {
    Number(u64),
    Text(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TcpMappingSpec {
    pub port: Option<i64>,
    pub address: Option<String>,
    pub service: Option<String>,
    pub tls: Option<MappingTls>,
    pub host: Option<String>,
    pub weight: Option<u32>,
    pub idle_timeout_ms: Option<Milliseconds>,
    pub enable_ipv4: Option<bool>,
    pub enable_ipv6: Option<bool>,
    pub circuit_breakers: Option<Vec<CircuitBreakerSpec>>,
    pub ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Upstream TCP keepalive (`keepalive`), in seconds. Emissary documents
/// `idle_time` but reads `time`; both are accepted.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveSpec {
    pub probes: Option<u32>,
    #[serde(alias = "time")]
    pub idle_time: Option<u64>,
    pub interval: Option<u64>,
}

/// `load_balancer` of a Mapping or the Module. Unknown keys are kept so
/// validation can name them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LoadBalancerSpec {
    pub policy: Option<String>,
    pub cookie: Option<CookieSpec>,
    pub header: Option<String>,
    pub source_ip: Option<bool>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieSpec {
    pub name: Option<String>,
    pub path: Option<String>,
    pub ttl: Option<String>,
}

/// One entry of a Mapping's `health_checks` (Emissary v3).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    pub unhealthy_threshold: Option<u32>,
    pub healthy_threshold: Option<u32>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub health_check: Option<HealthCheckKind>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckKind {
    pub http: Option<HttpHealthCheckSpec>,
    pub grpc: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheckSpec {
    pub path: Option<String>,
    pub hostname: Option<String>,
    pub expected_statuses: Option<Vec<StatusRange>>,
    pub add_request_headers: Option<OrderedMap<AddHeaderValue>>,
    pub remove_request_headers: Option<StringOrList>,
}

/// Inclusive, as Emissary writes it (Envoy's ranges are half-open).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRange {
    pub min: u16,
    pub max: u16,
}

/// A core/v1 Service: only its ports matter here (`port` → `targetPort`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KubeServiceSpec {
    #[serde(default)]
    pub ports: Vec<KubeServicePort>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KubeServicePort {
    pub name: Option<String>,
    pub port: u16,
    #[serde(rename = "targetPort")]
    pub target_port: Option<IntOrString>,
    pub protocol: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Kubernetes' IntOrString (`targetPort: 8080` or `targetPort: http`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    Str(String),
}

/// One subset of a core/v1 Endpoints object.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointSubset {
    #[serde(default)]
    pub addresses: Vec<EndpointAddress>,
    #[serde(rename = "notReadyAddresses", default)]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointAddress {
    pub ip: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A port of an Endpoints subset or an EndpointSlice.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Option<String>,
    #[serde(rename = "appProtocol")]
    pub app_protocol: Option<String>,
}

/// One endpoint of a discovery.k8s.io/v1 EndpointSlice.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<SliceConditions>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SliceConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
/// Also the shape of a Host's inline `tls:`, which accepts camelCase names.
pub struct TlsContextSpec {
    pub hosts: Option<Vec<String>>,
    pub secret: Option<String>,
    #[serde(alias = "certChainFile")]
    pub cert_chain_file: Option<String>,
    #[serde(alias = "privateKeyFile")]
    pub private_key_file: Option<String>,
    #[serde(alias = "caSecret")]
    pub ca_secret: Option<String>,
    #[serde(alias = "cacertChainFile")]
    pub cacert_chain_file: Option<String>,
    #[serde(alias = "crlSecret")]
    pub crl_secret: Option<String>,
    #[serde(alias = "certRequired")]
    pub cert_required: Option<bool>,
    #[serde(alias = "alpnProtocols")]
    pub alpn_protocols: Option<String>,
    #[serde(alias = "minTlsVersion")]
    pub min_tls_version: Option<String>,
    #[serde(alias = "maxTlsVersion")]
    pub max_tls_version: Option<String>,
    #[serde(alias = "cipherSuites")]
    pub cipher_suites: Option<Vec<String>>,
    #[serde(alias = "ecdhCurves")]
    pub ecdh_curves: Option<Vec<String>>,
    pub sni: Option<String>,
    #[serde(alias = "secretNamespacing")]
    pub secret_namespacing: Option<bool>,
    pub ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct LabelSelector {
    #[serde(rename = "matchLabels", default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretRef {
    pub name: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct InsecurePolicy {
    pub action: Option<String>,
    #[serde(rename = "additionalPort")]
    pub additional_port: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RequestPolicy {
    pub insecure: Option<InsecurePolicy>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostSpec {
    pub hostname: Option<String>,
    #[serde(rename = "mappingSelector")]
    pub mapping_selector: Option<LabelSelector>,
    pub selector: Option<LabelSelector>,
    #[serde(rename = "tlsSecret")]
    pub tls_secret: Option<SecretRef>,
    #[serde(rename = "tlsContext")]
    pub tls_context: Option<SecretRef>,
    pub tls: Option<Value>,
    #[serde(rename = "requestPolicy")]
    pub request_policy: Option<RequestPolicy>,
    pub ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NamespaceBinding {
    pub from: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostBinding {
    pub namespace: Option<NamespaceBinding>,
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListenerSpec {
    pub port: Option<i64>,
    pub protocol: Option<String>,
    #[serde(rename = "protocolStack")]
    pub protocol_stack: Option<Vec<String>>,
    #[serde(rename = "securityModel")]
    pub security_model: Option<String>,
    #[serde(rename = "l7Depth")]
    pub l7_depth: Option<u32>,
    #[serde(rename = "hostBinding")]
    pub host_binding: Option<HostBinding>,
    pub ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpMappingDefaults {
    pub add_request_headers: Option<OrderedMap<AddHeaderValue>>,
    pub add_response_headers: Option<OrderedMap<AddHeaderValue>>,
    pub remove_request_headers: Option<StringOrList>,
    pub remove_response_headers: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `defaults:` in the ambassador Module: class-specific values (`httpmapping`)
/// override the top-level ones.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModuleDefaults {
    pub httpmapping: Option<HttpMappingDefaults>,
    pub add_request_headers: Option<OrderedMap<AddHeaderValue>>,
    pub add_response_headers: Option<OrderedMap<AddHeaderValue>>,
    pub remove_request_headers: Option<StringOrList>,
    pub remove_response_headers: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModuleConfig {
    pub defaults: Option<ModuleDefaults>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub cluster_request_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub cluster_idle_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub cluster_max_connection_lifetime_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    pub listener_idle_timeout_ms: Option<u64>,
    pub max_request_headers_kb: Option<u32>,
    pub keepalive: Option<KeepaliveSpec>,
    pub resolver: Option<String>,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub server_name: Option<String>,
    pub add_linkerd_headers: Option<bool>,
    pub xff_num_trusted_hops: Option<u32>,
    pub use_remote_address: Option<bool>,
    pub merge_slashes: Option<bool>,
    pub reject_requests_with_escaped_slashes: Option<bool>,
    pub headers_with_underscores_action: Option<String>,
    pub strip_matching_host_port: Option<bool>,
    pub suppress_envoy_headers: Option<bool>,
    pub use_ambassador_namespace_for_service_resolution: Option<bool>,
    pub enable_ipv4: Option<bool>,
    pub enable_ipv6: Option<bool>,
    pub diagnostics: Option<Value>,
    pub forward_client_cert_details: Option<String>,
    pub circuit_breakers: Option<Vec<CircuitBreakerSpec>>,
    pub retry_policy: Option<RetryPolicySpec>,
    pub envoy_log_type: Option<String>,
    pub set_current_client_cert_details: Option<ClientCertDetails>,
    pub preserve_external_request_id: Option<bool>,
    pub cors: Option<Value>,
    pub ip_allow: Option<Value>,
    pub ip_deny: Option<Value>,
    pub default_label_domain: Option<String>,
    pub default_labels: Option<Value>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The Module's `set_current_client_cert_details`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertDetails {
    pub subject: Option<bool>,
    pub cert: Option<bool>,
    pub chain: Option<bool>,
    pub dns: Option<bool>,
    pub uri: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModuleSpec {
    #[serde(default)]
    pub config: ModuleConfig,
    pub ambassador_id: Option<StringOrList>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A core/v1 Secret: `data` is base64, `stringData` is plain text and wins on
/// conflicts, as the Kubernetes API server merges them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretBody {
    #[serde(rename = "type")]
    pub secret_type: Option<String>,
    #[serde(default)]
    pub data: BTreeMap<String, Option<String>>,
    #[serde(rename = "stringData", default)]
    pub string_data: BTreeMap<String, Option<String>>,
}
