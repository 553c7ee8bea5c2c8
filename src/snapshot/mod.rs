//! Stage 3: compile the model into the immutable runtime [`Snapshot`] that
//! requests read. Publication (stage 4) is an `ArcSwap` in [`crate::reload`].

pub mod routes;
pub mod tcp;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::diagnostics::{Code, Diagnostic, Location};
use crate::filters::auth::{AuthServices, ExtAuth};
use crate::filters::chain::{Entry, Stage};
use crate::filters::cors::{CorsFilter, CorsPolicy};
use crate::filters::rate_limit::labels::LabelGroup;
use crate::filters::rate_limit::{RateLimitFilter, RateLimitStates};
use crate::filters::request_id::RequestId;
use crate::filters::{FilterChains, RouteFacts};
use crate::metrics::{metrics, RouteMetrics};
use crate::model::{
    HostBinding, Listener, Model, ModuleSettings, ResolverKind, Rewrite, SecurityModel, VirtualHost,
};
use crate::routing::headers::HeaderEdits;
use crate::routing::matchers::PathMatch;
use crate::routing::redirect::Redirect;
use crate::routing::table::RouteGroup;
use crate::tls::edge::EdgeTls;
use crate::tls::TlsContext;
use crate::upstream::cluster::{Cluster, ClusterBuilder, ClusterKey, ClusterStates};
use crate::upstream::dns::DnsOptions;
use crate::upstream::retry::RetryPolicy;
use crate::upstream::shadow::Shadow;
use pingora::tls::ssl::SslVersion;
use routes::{
    associates, describe, group_mappings, route_match, HostRoutes, HostTable, MappingGroup,
};
use tcp::{TcpPort, TcpPortKind};

/// Emissary's `connect_timeout_ms` default, for authorizers too.
const AUTH_CONNECT_TIMEOUT_MS: u64 = 3000;

/// How long a copy for a shadow with `timeout_ms: 0` may take.
const DEFAULT_SHADOW_TIMEOUT_MS: u64 = 3000;

/// The port Emissary users expect when they define no Listener.
pub const DEFAULT_PORT: u16 = 8080;

/// Where a matched Mapping sends a request.
#[derive(Debug)]
pub enum Target {
    Upstream(Arc<Cluster>),
    /// `host_redirect`: the gateway answers with a redirect.
    Redirect(Redirect),
}

impl Route {
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        match &self.target {
            Target::Upstream(cluster) => Some(cluster),
            Target::Redirect(_) => None,
        }
    }

    /// For logs: the upstream cluster, or where the redirect goes.
    pub fn target_name(&self) -> &str {
        match &self.target {
            Target::Upstream(cluster) => &cluster.name,
            Target::Redirect(redirect) => &redirect.authority,
        }
    }

    /// Whether an HTTP/1.1 `Upgrade` to `protocol` may pass, as Envoy
    /// compares upgrade types: the whole header value, any case.
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        self.allow_upgrade
            .iter()
            .any(|p| p.eq_ignore_ascii_case(protocol.trim()))
    }
}

/// What a matched Mapping does with a request.
#[derive(Debug)]
pub struct Route {
    /// `name.namespace` of the Mapping.
    pub mapping: String,
    pub path: PathMatch,
    pub rewrite: Rewrite,
    pub host_rewrite: Option<HeaderValue>,
    pub target: Target,
    /// Route timeout (`timeout_ms`), `None` when 0.
    pub timeout: Option<Duration>,
    /// Stream idle timeout (`idle_timeout_ms`).
    pub idle_timeout: Option<Duration>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// `l5d-dst-override` value when Linkerd headers are on.
    pub linkerd_header: Option<HeaderValue>,
    /// `x-envoy-expected-rq-timeout-ms`.
    pub expected_timeout: Option<HeaderValue>,
    pub metrics: RouteMetrics,
    pub retry: Option<RetryPolicy>,
    /// The Mapping's `metadata.labels`, for filters.
    pub labels: BTreeMap<String, String>,
    pub cors: Option<Arc<CorsPolicy>>,
    pub bypass_auth: bool,
    /// The label groups of the evaluated rate-limit domain.
    pub(crate) rate_labels: Arc<[LabelGroup]>,
    /// Protocols a request may upgrade to, lower-cased.
    pub allow_upgrade: Vec<String>,
    /// The group's shadow, which gets copies of a share of its requests.
    pub shadow: Option<Arc<Shadow>>,
}

impl RouteFacts for Route {
    fn mapping(&self) -> &str {
        &self.mapping
    }

    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    fn destination(&self) -> Option<&str> {
        self.cluster().map(|c| c.name.as_str())
    }

    fn cors(&self) -> Option<&Arc<CorsPolicy>> {
        self.cors.as_ref()
    }

    fn rate_labels(&self) -> &[LabelGroup] {
        &self.rate_labels
    }
}

#[derive(Debug)]
pub struct ListenerRoutes {
    pub listener: Listener,
    pub hosts: HostTable<Route>,
    /// Each Host's prepared TLS, by position in `hosts`; empty when the
    /// listener is cleartext.
    edge: Vec<Option<Arc<EdgeTls>>>,
    /// Protocol bounds and curves for the whole listener.
    pub tls_bounds: TlsBounds,
}

/// OpenSSL settles the protocol version and key-exchange group before it
/// knows the SNI, so these apply to a listener as a whole: the loosest
/// bounds any of its TLS Hosts asks for (each Host then refuses a version
/// outside its own, `EdgeTls::install`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsBounds {
    pub min: Option<SslVersion>,
    pub max: Option<SslVersion>,
    pub curves: Option<String>,
}

impl TlsBounds {
    fn of<'e>(contexts: impl Iterator<Item = &'e TlsContext>) -> (TlsBounds, bool) {
        let contexts: Vec<&TlsContext> = contexts.collect();
        let rank = crate::tls::version_rank;
        let min = contexts
            .iter()
            .map(|c| c.min_version.unwrap_or(SslVersion::TLS1_2))
            .min_by_key(|v| rank(*v));
        let max = contexts
            .iter()
            .map(|c| c.max_version.unwrap_or(SslVersion::TLS1_3))
            .max_by_key(|v| rank(*v));
        let mut curves: Vec<&Option<String>> = contexts.iter().map(|c| &c.curves).collect();
        curves.dedup();
        let agree = curves.len() <= 1
            && contexts.windows(2).all(|w| {
                w[0].min_version == w[1].min_version && w[0].max_version == w[1].max_version
            });
        let bounds = TlsBounds {
            min: min.filter(|v| *v != SslVersion::TLS1_2),
            max: max.filter(|v| *v != SslVersion::TLS1_3),
            curves: curves.first().and_then(|c| (*c).clone()),
        };
        (bounds, agree)
    }
}

impl ListenerRoutes {
    /// The TLS Host a ClientHello's SNI selects, with its position.
    pub fn tls_host(&self, sni: Option<&str>) -> Option<(usize, &Arc<EdgeTls>)> {
        let (index, _) = self.hosts.select_tls(sni)?;
        Some((index, self.edge.get(index)?.as_ref()?))
    }
}

#[derive(Debug)]
pub struct Snapshot {
    /// The HTTP and HTTPS listeners.
    pub listeners: Vec<ListenerRoutes>,
    /// The ports that carry TCPMappings (an HTTPS port may be in both).
    pub tcp: Vec<TcpPort>,
    pub module: ModuleSettings,
    pub filters: FilterChains,
    /// The files and directories this snapshot was built from.
    pub sources: Vec<std::path::PathBuf>,
    /// Every upstream cluster, for the background work on them.
    pub clusters: Vec<Arc<Cluster>>,
}

/// How the process serves a port. Only a new process can change these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Binding {
    Http,
    Https,
    Tcp,
    Tls,
    /// HTTPS whose SNIs of TCPMappings tunnel.
    HttpsAndTcp,
}

impl Binding {
    pub fn tls(self) -> bool {
        !matches!(self, Binding::Http | Binding::Tcp)
    }

    /// Served by the TCP service rather than the HTTP proxy.
    pub fn tcp(self) -> bool {
        matches!(self, Binding::Tcp | Binding::Tls | Binding::HttpsAndTcp)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bound {
    pub port: u16,
    /// Every address when `None`.
    pub address: Option<IpAddr>,
    pub binding: Binding,
}

impl Snapshot {
    pub fn listener(&self, port: u16) -> Option<&ListenerRoutes> {
        self.listeners.iter().find(|l| l.listener.port == port)
    }

    pub fn tcp_port(&self, port: u16) -> Option<&TcpPort> {
        self.tcp.iter().find(|p| p.port == port)
    }

    /// The TLS a handshake on `port` for `sni` gets: a TCPMapping's host
    /// wins over an HTTPS Host with the same name, as in Emissary.
    pub fn edge_tls(&self, port: u16, sni: Option<&str>) -> Option<&EdgeTls> {
        let tunnel = self
            .tcp_port(port)
            .and_then(|p| p.group(sni))
            .and_then(|g| g.edge.as_deref());
        tunnel.or_else(|| {
            self.listener(port)
                .and_then(|l| l.tls_host(sni))
                .map(|(_, edge)| &**edge)
        })
    }

    pub fn ports(&self) -> Vec<u16> {
        self.bindings().iter().map(|b| b.port).collect()
    }

    /// Every port to listen on and how, in port order.
    pub fn bindings(&self) -> Vec<Bound> {
        let mut out: Vec<Bound> = self
            .listeners
            .iter()
            .filter(|l| self.tcp_port(l.listener.port).is_none())
            .map(|l| Bound {
                port: l.listener.port,
                address: None,
                binding: if l.listener.tls {
                    Binding::Https
                } else {
                    Binding::Http
                },
            })
            .collect();
        out.extend(self.tcp.iter().map(|p| Bound {
            port: p.port,
            address: p.address,
            binding: match p.kind {
                TcpPortKind::Tcp => Binding::Tcp,
                TcpPortKind::Tls => Binding::Tls,
                TcpPortKind::SharedWithHttps => Binding::HttpsAndTcp,
            },
        }));
        out.sort_unstable();
        out
    }
}

/// Whether compiling resolves service names. `pingress -t` checks the
/// configuration, not the network it happens to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Resolve,
    Skip,
}

/// What a build takes over from the snapshots still live, by identity:
/// upstream state (endpoints with their health, balancer position,
/// breakers, background tasks) and rate-limit counters. One value per line
/// of snapshots (a process's reloads); a snapshot built alone starts from
/// an empty one.
#[derive(Debug, Default)]
pub struct Inherited {
    pub clusters: Arc<ClusterStates>,
    pub rate_limits: RateLimitStates,
}

/// Compiles the model. Problems found here (canary conflicts, unresolvable
/// services, unreachable Mappings) are returned beside the snapshot. All
/// it takes from earlier snapshots is in `inherited`.
pub fn compile(
    model: &Model,
    resolution: Resolution,
    inherited: &Inherited,
) -> (Snapshot, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut clusters = ClusterBuilder::new(
        resolution == Resolution::Resolve,
        &model.endpoints,
        &inherited.clusters,
    )
    .trusting(model.upstream_trust);
    clusters.prefetch(
        model
            .mappings
            .iter()
            .filter(|m| m.redirect.is_none())
            .map(cluster_key),
    );

    let groups = group_mappings(&model.mappings, &mut diags);
    let compiled: Vec<Arc<RouteGroup<Route>>> = groups
        .iter()
        .map(|group| route_group(group, model, &mut clusters, &mut diags))
        .collect();

    let hosts: Vec<VirtualHost> = if !model.host_resources {
        vec![VirtualHost::synthesized_default()]
    } else {
        model.hosts.clone()
    };
    let http_default = model.listeners.is_empty().then_some(DEFAULT_PORT);
    let tcp = tcp::compile(
        &model.tcp_mappings,
        &model.listeners,
        http_default,
        &mut clusters,
        &mut diags,
    );
    warn_unused_l4_listeners(model, &tcp, &mut diags);
    let edges = edge_tls(&hosts, &mut diags);
    let mut reachable = vec![false; compiled.len()];
    let listeners = http_listeners(model)
        .into_iter()
        .map(|listener| {
            let attach = Attach {
                hosts: &hosts,
                edges: &edges,
                groups: &groups,
                compiled: &compiled,
                tcp: &tcp,
            };
            attach.listener(listener, &mut reachable, &mut diags)
        })
        .collect();
    warn_unreachable(&groups, &reachable, &mut diags);

    // Authorizers get their clusters here too, before the set is closed.
    let filters = FilterChains::new(
        builtin_filters(model, &mut clusters, &inherited.rate_limits, &mut diags),
        &model.filter_policies,
    );
    (
        Snapshot {
            listeners,
            tcp,
            module: model.module.clone(),
            filters,
            sources: model.referenced_files.clone(),
            clusters: clusters.finish(),
        },
        diags,
    )
}

/// One canary group's routes, with the shadow they share.
fn route_group(
    group: &MappingGroup,
    model: &Model,
    clusters: &mut ClusterBuilder,
    diags: &mut Vec<Diagnostic>,
) -> Arc<RouteGroup<Route>> {
    let shadow = group.shadow.map(|mapping| {
        let timeout = match mapping.timeout_ms {
            // A copy nobody waits for still ends.
            0 => Duration::from_millis(DEFAULT_SHADOW_TIMEOUT_MS),
            ms => Duration::from_millis(ms),
        };
        Arc::new(Shadow::new(
            mapping.name.clone(),
            upstream(mapping, clusters, diags),
            mapping.weight.unwrap_or(100),
            timeout,
        ))
    });
    let members = group
        .members
        .iter()
        .zip(&group.thresholds)
        .map(|(mapping, threshold)| {
            let target = match &mapping.redirect {
                Some(redirect) => Target::Redirect(redirect.clone()),
                None => Target::Upstream(upstream(mapping, clusters, diags)),
            };
            let route = route(mapping, target, shadow.clone(), model);
            (*threshold, Arc::new(route))
        })
        .collect();
    Arc::new(RouteGroup {
        matcher: route_match(group.members[0]),
        summary: describe(group.members[0]),
        members,
    })
}

/// An L4 Listener serves only TCPMappings: without one, nothing listens.
fn warn_unused_l4_listeners(model: &Model, tcp: &[TcpPort], diags: &mut Vec<Diagnostic>) {
    for listener in model.listeners.iter().filter(|l| l.l4) {
        if !tcp.iter().any(|p| p.port == listener.port) {
            diags.push(
                Diagnostic::warning(
                    location(&listener.id),
                    format!(
                        "no TCPMapping uses the listener on port {}; nothing listens there",
                        listener.port
                    ),
                )
                .code(Code::Unreachable)
                .hint("a TCPMapping with this port puts the listener to use"),
            );
        }
    }
}

/// The HTTP listeners: the Listener resources that are not L4, or
/// Emissary's default cleartext listener when there are none.
fn http_listeners(model: &Model) -> Vec<Listener> {
    if model.listeners.is_empty() {
        vec![Listener {
            name: "default".into(),
            id: None,
            port: DEFAULT_PORT,
            tls: false,
            l4: false,
            security: SecurityModel::Xfp,
            l7_depth: model.module.xff_num_trusted_hops,
            binding: HostBinding::default(),
        }]
    } else {
        model.listeners.iter().filter(|l| !l.l4).cloned().collect()
    }
}

/// Each TLS Host's handshake material, built once for all listeners.
fn edge_tls(hosts: &[VirtualHost], diags: &mut Vec<Diagnostic>) -> Vec<Option<Arc<EdgeTls>>> {
    hosts
        .iter()
        .map(|host| {
            let context = host.tls.clone()?;
            EdgeTls::new(context)
                .map(Arc::new)
                .map_err(|e| {
                    diags.push(Diagnostic::error(
                        location(&host.id),
                        format!("cannot prepare TLS: {e}"),
                    ))
                })
                .ok()
        })
        .collect()
}

/// What a listener's routes are made from: the Hosts with their TLS, and
/// the route groups (`compiled`, parallel to `groups`).
struct Attach<'a> {
    hosts: &'a [VirtualHost],
    edges: &'a [Option<Arc<EdgeTls>>],
    groups: &'a [MappingGroup<'a>],
    compiled: &'a [Arc<RouteGroup<Route>>],
    tcp: &'a [TcpPort],
}

impl Attach<'_> {
    /// The listener with the Hosts bound to it, each with the groups it
    /// associates; marks the groups it reaches in `reachable`.
    fn listener(
        &self,
        listener: Listener,
        reachable: &mut [bool],
        diags: &mut Vec<Diagnostic>,
    ) -> ListenerRoutes {
        let bound_hosts: Vec<usize> = (0..self.hosts.len())
            .filter(|i| binds(&listener.binding, &self.hosts[*i]))
            .collect();
        let edge: Vec<Option<Arc<EdgeTls>>> = if listener.tls {
            bound_hosts.iter().map(|i| self.edges[*i].clone()).collect()
        } else {
            Vec::new()
        };
        let tunnels = self.tcp.iter().any(|p| p.port == listener.port);
        if listener.tls && !tunnels && !bound_hosts.iter().any(|i| self.edges[*i].is_some()) {
            diags.push(
                Diagnostic::warning(
                    location(&listener.id),
                    format!(
                        "HTTPS listener on port {} has no TLS Host: every handshake fails",
                        listener.port
                    ),
                )
                .hint("give a Host bound to this listener a tlsSecret"),
            );
        }
        let bound = bound_hosts
            .iter()
            .map(|i| &self.hosts[*i])
            .map(|host| {
                let groups = self
                    .groups
                    .iter()
                    .zip(self.compiled)
                    .enumerate()
                    .filter(|(_, (mappings, _))| {
                        mappings.members.iter().any(|m| associates(host, m))
                    })
                    .map(|(index, (_, group))| {
                        reachable[index] = true;
                        group.clone()
                    })
                    .collect();
                HostRoutes::new(host.clone(), groups)
            })
            .collect();
        let (tls_bounds, agree) = TlsBounds::of(edge.iter().flatten().map(|e| e.context.as_ref()));
        if !agree {
            diags.push(
                Diagnostic::warning(
                    location(&listener.id),
                    format!(
                        "the TLS Hosts of the listener on port {} ask for different \
                         min/max_tls_version or ecdh_curves; a client that settles on a version \
                         another Host allows is refused by a Host that does not, and the first \
                         Host's curves apply to all",
                        listener.port
                    ),
                )
                .hint("OpenSSL fixes these before the SNI is known: give each listener one policy"),
            );
        }
        ListenerRoutes {
            listener,
            hosts: HostTable::new(bound),
            edge,
            tls_bounds,
        }
    }
}

/// A group no Host carries can never be matched: said, with why.
fn warn_unreachable(groups: &[MappingGroup], reachable: &[bool], diags: &mut Vec<Diagnostic>) {
    for (group, reached) in groups.iter().zip(reachable) {
        let first = group.members[0];
        if !reached {
            let hint = if matches!(first.association, crate::model::Association::SelectorOnly) {
                "a Mapping without hostname joins only Hosts whose mappingSelector matches its \
                 labels; set hostname: \"*\" to serve it on every Host"
            } else {
                "no Host's hostname is compatible with this Mapping's hostname (or its Host \
                 is bound to no Listener)"
            };
            diags.push(
                Diagnostic::warning(
                    Location::Resource(first.id.clone()),
                    "no Host serves this Mapping; it is not reachable",
                )
                .code(Code::Unreachable)
                .hint(hint),
            );
        }
    }
}

/// The gateway's own filters, as the Module and the Mappings ask for them,
/// in Emissary's order.
fn builtin_filters(
    model: &Model,
    clusters: &mut ClusterBuilder,
    rate_limits: &RateLimitStates,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Entry> {
    let module = &model.module;
    let mut entries = vec![Entry::builtin(
        RequestId::new(module.preserve_external_request_id),
        "Module/ambassador (request IDs)",
        Stage::Early,
    )];
    if let Some(ip) = &module.ip_filter {
        entries.push(Entry::builtin(
            ip.clone(),
            "Module/ambassador (ip_allow/ip_deny)",
            Stage::Early,
        ));
    }
    if model.mappings.iter().any(|m| m.cors.is_some()) {
        entries.push(Entry::builtin(
            CorsFilter::per_route(),
            "cors",
            Stage::Early,
        ));
    }
    if let Some(auth) = auth_filter(&model.auth_services, clusters, diags) {
        entries.push(Entry::builtin(auth, "AuthService", Stage::Auth));
    }
    let domain = &model.rate_limits.domain;
    let labelled = model
        .mappings
        .iter()
        .any(|m| m.rate_labels.contains_key(domain));
    if !model.rate_limits.is_empty() && labelled {
        match RateLimitFilter::new(model.rate_limits.clone(), rate_limits) {
            Ok(filter) => entries.push(Entry::builtin(filter, "RateLimit", Stage::Late)),
            Err(e) => diags.push(
                Diagnostic::error(
                    Location::File("(rate limits)".into()),
                    format!("rate limits are off: {e}"),
                )
                .hint("check the RateLimitService's service address"),
            ),
        }
    }
    entries
}

fn auth_filter(
    auth: &AuthServices,
    clusters: &mut ClusterBuilder,
    diags: &mut Vec<Diagnostic>,
) -> Option<ExtAuth> {
    if let Some(name) = &auth.misconfigured {
        return Some(ExtAuth::Misconfigured(name.clone()));
    }
    let policy = auth.services.first()?.policy.clone();
    let authorizers = auth
        .services
        .iter()
        .map(|service| {
            let (cluster, problem) = clusters.cluster(
                ClusterKey {
                    service: service.service.clone(),
                    originate_tls: service.originate_tls,
                    tls_identity: service.tls.as_ref().map(|t| t.identity),
                    connect_timeout_ms: AUTH_CONNECT_TIMEOUT_MS,
                    ..ClusterKey::of_service(service.service.clone())
                },
                service.tls.clone(),
            );
            if let Some(problem) = problem.map(|p| p.to_string()) {
                diags.push(
                    Diagnostic::warning(Location::Resource(service.id.clone()), problem)
                        .field("spec.auth_service")
                        .hint("requests get status_on_error until the name resolves"),
                );
            }
            cluster
        })
        .collect();
    Some(ExtAuth::new(policy, authorizers))
}

/// What makes a Mapping's cluster: settings that only one resolver reads
/// are left at their defaults for the other, so they split no clusters.
fn cluster_key(mapping: &crate::model::Mapping) -> ClusterKey {
    let endpoints = mapping.resolver == ResolverKind::Endpoint;
    ClusterKey {
        service: mapping.service.clone(),
        resolver: mapping.resolver,
        // Only the Kubernetes lookup of an unqualified name reads it.
        namespace: match endpoints && !mapping.service.host.contains('.') {
            true => mapping.id.namespace.clone(),
            false => String::new(),
        },
        originate_tls: mapping.originate_tls,
        tls_identity: mapping.tls.as_ref().map(|t| t.identity),
        system_trust: false,
        connect_timeout_ms: mapping.connect_timeout_ms,
        h2_only: mapping.grpc,
        breaker: mapping.breaker,
        policy: mapping.load_balancer.clone(),
        health_check: mapping.health_check.clone(),
        dns: match endpoints {
            true => DnsOptions::default(),
            false => mapping.dns,
        },
        connections: mapping.connections,
        tcp: false,
    }
}

/// The cluster a Mapping proxies (or mirrors) to.
fn upstream(
    mapping: &crate::model::Mapping,
    clusters: &mut ClusterBuilder,
    diags: &mut Vec<Diagnostic>,
) -> Arc<Cluster> {
    let (cluster, problem) = clusters.cluster(cluster_key(mapping), mapping.tls.clone());
    if let Some(problem) = problem.map(|p| p.to_string()) {
        let hint = match mapping.resolver == ResolverKind::Endpoint {
            true => "requests for this Mapping get 503 until endpoints appear",
            false => "requests for this Mapping get 503 until the name resolves",
        };
        diags.push(
            Diagnostic::warning(Location::Resource(mapping.id.clone()), problem)
                .field("spec.service")
                .hint(hint),
        );
    }
    cluster
}

/// Where a synthesized Listener or Host comes from: the gateway itself.
fn location(id: &Option<crate::config::diagnostics::ResourceRef>) -> Location {
    match id {
        Some(id) => Location::Resource(id.clone()),
        None => Location::File("(built-in default)".into()),
    }
}

fn binds(binding: &HostBinding, host: &VirtualHost) -> bool {
    binding
        .namespace
        .as_ref()
        .is_none_or(|ns| *ns == host.namespace)
        && binding
            .labels
            .iter()
            .all(|(k, v)| host.labels.get(k) == Some(v))
}

fn route(
    mapping: &crate::model::Mapping,
    target: Target,
    shadow: Option<Arc<Shadow>>,
    model: &Model,
) -> Route {
    let module = &model.module;
    let host_rewrite = mapping.host_rewrite.clone().or_else(|| {
        mapping
            .auto_host_rewrite
            .then(|| HeaderValue::from_str(&mapping.service.host).ok())
            .flatten()
    });
    let timeout = (mapping.timeout_ms > 0).then_some(mapping.timeout_ms);
    let idle_timeout = mapping
        .idle_timeout_ms
        .filter(|t| *t > 0)
        .map(Duration::from_millis);
    let linkerd_header = mapping.add_linkerd_headers.then(|| {
        HeaderValue::from_str(&format!(
            "{}:{}",
            mapping.service.host, mapping.service.port
        ))
        .ok()
    });
    let expected_timeout = (!module.suppress_envoy_headers)
        .then(|| timeout.map(HeaderValue::from))
        .flatten();
    Route {
        mapping: mapping.name.clone(),
        path: mapping.path.clone(),
        rewrite: mapping.rewrite.clone(),
        host_rewrite,
        target,
        timeout: timeout.map(Duration::from_millis),
        idle_timeout,
        request_headers: mapping.request_headers.clone(),
        response_headers: mapping.response_headers.clone(),
        linkerd_header: linkerd_header.flatten(),
        expected_timeout,
        metrics: metrics().route(&mapping.name),
        retry: mapping.retry,
        labels: mapping.labels.clone(),
        cors: mapping.cors.clone(),
        bypass_auth: mapping.bypass_auth,
        rate_labels: mapping
            .rate_labels
            .get(&model.rate_limits.domain)
            .cloned()
            .unwrap_or_default()
            .into(),
        allow_upgrade: mapping.allow_upgrade.clone(),
        shadow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_documents;
    use crate::routing::table::RequestView;

    fn model_of(text: &str) -> Model {
        let (mut raw, mut diags) = (Vec::new(), Vec::new());
        parse_documents(std::path::Path::new("t.yaml"), text, &mut raw, &mut diags);
        let (model, problems) =
            crate::model::validate(&raw, "default", &crate::filters::Registry::default());
        assert!(problems.iter().all(|d| !d.is_error()), "{problems:?}");
        model
    }

    fn only_cluster(snapshot: &Snapshot) -> Arc<Cluster> {
        let (_, host) = snapshot.listeners[0].hosts.select("h").unwrap();
        let (_, route) = &host.groups[0].members[0];
        route.cluster().unwrap().clone()
    }

    /// What a build shares with earlier ones comes only from `inherited`:
    /// the same input shares a cluster's state (its breaker, endpoints and
    /// tasks), a fresh one starts anew, whatever was compiled before.
    #[test]
    fn compile_shares_only_what_it_is_given() {
        let model = model_of(
            "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m\n\
             spec:\n  hostname: \"*\"\n  prefix: /\n  service: s\n",
        );
        let inherited = Inherited::default();
        let first = only_cluster(&compile(&model, Resolution::Skip, &inherited).0);
        let again = only_cluster(&compile(&model, Resolution::Skip, &inherited).0);
        let fresh = only_cluster(&compile(&model, Resolution::Skip, &Inherited::default()).0);
        assert!(again.shares_state_with(&first));
        assert!(!fresh.shares_state_with(&first));
    }

    /// The prefix index must choose exactly what a scan in evaluation order
    /// chooses, for every kind of path matcher.
    #[test]
    fn indexed_lookup_equals_a_linear_scan() {
        let shapes = [
            "prefix: /api/",
            "prefix: /api/v1/",
            "prefix: /api/v1/users",
            "prefix: /API/v2/\n  case_sensitive: false",
            "prefix: /exact\n  prefix_exact: true",
            "prefix: \"/re/[0-9]+/x\"\n  prefix_regex: true",
            "prefix: \"/re/(a|b)/y\"\n  prefix_regex: true",
            "prefix: \"/opt?ional\"\n  prefix_regex: true",
            "prefix: \"/CI/[a-z]+\"\n  prefix_regex: true\n  case_sensitive: false",
            "prefix: /\n  precedence: -1",
            "prefix: /api/\n  headers:\n    x-a: b",
            "prefix: /api/\n  method: POST",
        ];
        let mut text = String::new();
        for (i, shape) in shapes.iter().enumerate() {
            text.push_str(&format!(
                "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m{i}\n\
                 spec:\n  hostname: \"*\"\n  service: s{i}\n  {shape}\n"
            ));
        }
        let model = model_of(&text);
        let (snapshot, _) = compile(&model, Resolution::Skip, &Inherited::default());
        let (_, host) = snapshot.listeners[0].hosts.select("h").unwrap();
        let mut headers = http::HeaderMap::new();
        let paths = [
            "/",
            "/api",
            "/api/",
            "/api/v1/",
            "/api/v1/users/7",
            "/api/v2/x",
            "/API/V2/x",
            "/exact",
            "/exact/",
            "/re/12/x",
            "/re/12/xy",
            "/re/a/y",
            "/re/c/y",
            "/optional",
            "/opional",
            "/ci/abc",
            "/CI/ABC",
            "/other",
        ];
        for with_header in [false, true] {
            if with_header {
                headers.insert("x-a", http::HeaderValue::from_static("b"));
            }
            for method in ["GET", "POST"] {
                for path in paths {
                    let view = RequestView {
                        path,
                        query: "",
                        authority: "h",
                        method,
                        headers: &headers,
                    };
                    let scanned = host.groups.iter().position(|g| g.matcher.matches(&view));
                    let indexed = host.find(&view).and_then(|found| {
                        host.groups
                            .iter()
                            .position(|g| std::ptr::eq(g.as_ref(), found))
                    });
                    assert_eq!(indexed, scanned, "{method} {path} header={with_header}");
                }
            }
        }
    }
}
