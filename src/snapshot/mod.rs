//! Stage 3: compile the model into the immutable runtime [`Snapshot`] that
//! requests read. Publication (stage 4) is an `ArcSwap` in [`crate::proxy`].

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::diagnostics::{Diagnostic, Location};
use crate::metrics::{metrics, RouteMetrics};
use crate::model::{
    HostBinding, Listener, Model, ModuleSettings, ResolverKind, Rewrite, SecurityModel, VirtualHost,
};
use crate::routing::headers::HeaderEdits;
use crate::routing::matchers::PathMatch;
use crate::routing::redirect::Redirect;
use crate::routing::table::{
    associates, describe, group_mappings, route_match, HostRoutes, HostTable, MappingGroup,
    RouteGroup,
};
use crate::tls::edge::EdgeTls;
use crate::tls::TlsContext;
use crate::upstream::cluster::{Cluster, ClusterBuilder, ClusterKey};
use crate::upstream::dns::DnsOptions;
use crate::upstream::retry::RetryPolicy;
use pingora::tls::ssl::SslVersion;

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
/// bounds any of its TLS Hosts asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsBounds {
    pub min: Option<SslVersion>,
    pub max: Option<SslVersion>,
    pub curves: Option<String>,
}

impl TlsBounds {
    fn of<'e>(contexts: impl Iterator<Item = &'e TlsContext>) -> (TlsBounds, bool) {
        let contexts: Vec<&TlsContext> = contexts.collect();
        let rank = crate::upstream::policy::version_rank;
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
    pub listeners: Vec<ListenerRoutes>,
    pub module: ModuleSettings,
    /// The files and directories this snapshot was built from.
    pub sources: Vec<std::path::PathBuf>,
    /// Every upstream cluster, for the background work on them.
    pub clusters: Vec<Arc<Cluster>>,
}

impl Snapshot {
    pub fn listener(&self, port: u16) -> Option<&ListenerRoutes> {
        self.listeners.iter().find(|l| l.listener.port == port)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.listeners.iter().map(|l| l.listener.port).collect()
    }
}

/// Whether compiling resolves service names. `pingress -t` checks the
/// configuration, not the network it happens to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Resolve,
    Skip,
}

/// Compiles the model. Problems found here (canary conflicts, unresolvable
/// services, unreachable Mappings) are returned beside the snapshot.
pub fn compile(model: &Model, resolution: Resolution) -> (Snapshot, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut clusters = ClusterBuilder::new(resolution == Resolution::Resolve, &model.endpoints);
    clusters.prefetch(
        model
            .mappings
            .iter()
            .filter(|m| m.redirect.is_none())
            .map(cluster_key),
    );

    let groups = group_mappings(&model.mappings, &mut diags);
    let mut compiled: Vec<(Arc<RouteGroup<Route>>, &MappingGroup)> = Vec::new();
    for group in &groups {
        let members = group
            .members
            .iter()
            .zip(&group.thresholds)
            .map(|(mapping, threshold)| {
                if let Some(redirect) = &mapping.redirect {
                    let target = Target::Redirect(redirect.clone());
                    return (*threshold, Arc::new(route(mapping, target, &model.module)));
                }
                let endpoints = mapping.resolver == ResolverKind::Endpoint;
                let (cluster, problem) =
                    clusters.cluster(cluster_key(mapping), mapping.tls.clone());
                if let Some(problem) = problem {
                    let hint = match endpoints {
                        true => "requests for this Mapping get 503 until endpoints appear",
                        false => "requests for this Mapping get 503 until the name resolves",
                    };
                    diags.push(
                        Diagnostic::warning(Location::Resource(mapping.id.clone()), problem)
                            .field("spec.service")
                            .hint(hint),
                    );
                }
                let target = Target::Upstream(cluster);
                (*threshold, Arc::new(route(mapping, target, &model.module)))
            })
            .collect();
        compiled.push((
            Arc::new(RouteGroup {
                matcher: route_match(group.members[0]),
                summary: describe(group.members[0]),
                members,
            }),
            group,
        ));
    }

    let hosts: Vec<VirtualHost> = if model.hosts.is_empty() {
        vec![VirtualHost::synthesized_default()]
    } else {
        model.hosts.clone()
    };
    let listeners: Vec<Listener> = if model.listeners.is_empty() {
        vec![Listener {
            name: "default".into(),
            id: None,
            port: DEFAULT_PORT,
            tls: false,
            security: SecurityModel::Xfp,
            l7_depth: model.module.xff_num_trusted_hops,
            binding: HostBinding::default(),
        }]
    } else {
        model.listeners.clone()
    };

    // Each TLS Host's handshake material, built once for all listeners.
    let edges: Vec<Option<Arc<EdgeTls>>> = hosts
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
        .collect();

    let mut reachable = vec![false; compiled.len()];
    let listeners = listeners
        .into_iter()
        .map(|listener| {
            let bound_hosts: Vec<usize> = (0..hosts.len())
                .filter(|i| binds(&listener.binding, &hosts[*i]))
                .collect();
            let edge = if listener.tls {
                bound_hosts.iter().map(|i| edges[*i].clone()).collect()
            } else {
                Vec::new()
            };
            if listener.tls && !bound_hosts.iter().any(|i| edges[*i].is_some()) {
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
                .map(|i| &hosts[*i])
                .map(|host| {
                    let groups = compiled
                        .iter()
                        .enumerate()
                        .filter(|(_, (_, mappings))| {
                            mappings.members.iter().any(|m| associates(host, m))
                        })
                        .map(|(index, (group, _))| {
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
                             min/max_tls_version or ecdh_curves; the loosest bounds apply to all",
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
        })
        .collect();

    for (index, (_, mappings)) in compiled.iter().enumerate() {
        let first = mappings.members[0];
        if !reachable[index] {
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
                .hint(hint),
            );
        }
    }

    (
        Snapshot {
            listeners,
            module: model.module.clone(),
            sources: model.referenced_files.clone(),
            clusters: clusters.finish(),
        },
        diags,
    )
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
    }
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

fn route(mapping: &crate::model::Mapping, target: Target, module: &ModuleSettings) -> Route {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_documents;
    use crate::routing::table::RequestView;

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
        let (mut raw, mut diags) = (Vec::new(), Vec::new());
        parse_documents(std::path::Path::new("t.yaml"), &text, &mut raw, &mut diags);
        let (model, problems) = crate::model::validate(raw, "default");
        assert!(problems.iter().all(|d| !d.is_error()), "{problems:?}");
        let (snapshot, _) = compile(&model, Resolution::Skip);
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
