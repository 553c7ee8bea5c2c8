//! TCPMappings compiled into ports: which port carries which TCPMappings,
//! cleartext or TLS, grouped by SNI, with their canary thresholds and
//! prepared clusters.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::diagnostics::{Code, Diagnostic, Location};
use crate::metrics::{metrics, TunnelMetrics};
use crate::model::{Listener, TcpMapping};
use crate::routing::table::{pick, split, weighted_first};
use crate::tls::edge::EdgeTls;
use crate::upstream::cluster::{Cluster, ClusterBuilder, ClusterKey};
use crate::upstream::dns::DnsOptions;

/// Emissary's cluster connect timeout, which TCPMappings cannot change.
const CONNECT_TIMEOUT_MS: u64 = 3000;

/// What a TCPMapping does with a connection.
#[derive(Debug)]
pub struct TcpRoute {
    /// `name.namespace` of the TCPMapping.
    pub mapping: String,
    pub cluster: Arc<Cluster>,
    pub idle_timeout: Option<Duration>,
    pub metrics: TunnelMetrics,
}

/// TCPMappings that share a port (and, with `host`, an SNI): one canary
/// set.
#[derive(Debug)]
pub struct TcpGroup {
    /// `None` on a cleartext port, which carries one group.
    pub sni: Option<String>,
    /// The certificate that terminates TLS for `sni`.
    pub edge: Option<Arc<EdgeTls>>,
    /// Cumulative thresholds out of 100, in order.
    pub members: Vec<(u32, Arc<TcpRoute>)>,
}

impl TcpGroup {
    /// One random number in 0..100 against the thresholds: each member
    /// gets exactly its share of connections.
    pub fn pick(&self, roll: u32) -> &Arc<TcpRoute> {
        pick(&self.members, roll)
    }
}

/// How a port that carries TCPMappings is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpPortKind {
    /// Cleartext bytes, one group.
    Tcp,
    /// TLS terminated here, groups by SNI.
    Tls,
    /// An HTTPS Listener's port: SNIs of TCPMappings tunnel, the others are
    /// HTTP.
    SharedWithHttps,
}

#[derive(Debug)]
pub struct TcpPort {
    pub port: u16,
    /// The TCPMappings' `address`; every address when `None`.
    pub address: Option<IpAddr>,
    pub kind: TcpPortKind,
    pub groups: Vec<TcpGroup>,
}

impl TcpPort {
    /// The group a connection belongs to: by SNI when TLS is terminated.
    pub fn group(&self, sni: Option<&str>) -> Option<&TcpGroup> {
        match self.kind {
            TcpPortKind::Tcp => self.groups.first(),
            TcpPortKind::Tls | TcpPortKind::SharedWithHttps => {
                let sni = sni?;
                self.groups.iter().find(|g| g.sni.as_deref() == Some(sni))
            }
        }
    }
}

/// Assigns TCPMappings to ports. `listeners` are the Listener resources;
/// `http_default` is the port of the HTTP listener pingress adds when
/// there is none. A TCPMapping that cannot have its port as it asks is
/// reported and left out.
pub fn compile(
    mappings: &[TcpMapping],
    listeners: &[Listener],
    http_default: Option<u16>,
    clusters: &mut ClusterBuilder,
    diags: &mut Vec<Diagnostic>,
) -> Vec<TcpPort> {
    let mut by_port: BTreeMap<u16, Vec<&TcpMapping>> = BTreeMap::new();
    for mapping in mappings {
        by_port.entry(mapping.port).or_default().push(mapping);
    }
    let mut ports = Vec::new();
    for (port, members) in by_port {
        let Some(kind) = port_kind(port, &members, listeners, http_default, diags) else {
            continue;
        };
        let address = members[0].address;
        let accepted = fitting(port, kind, address, members, diags);
        let groups: Vec<TcpGroup> = by_sni(accepted)
            .into_iter()
            .filter_map(|(sni, members)| group(sni, &members, clusters, diags))
            .collect();
        if !groups.is_empty() {
            ports.push(TcpPort {
                port,
                address,
                kind,
                groups,
            });
        }
    }
    ports
}

/// How `port` serves its TCPMappings: as its Listener says, or as the
/// Listener Emissary would synthesize. `None`, with every TCPMapping of
/// the port refused, when an HTTP listener has the port.
fn port_kind(
    port: u16,
    members: &[&TcpMapping],
    listeners: &[Listener],
    http_default: Option<u16>,
    diags: &mut Vec<Diagnostic>,
) -> Option<TcpPortKind> {
    let listener = listeners.iter().find(|l| l.port == port);
    let kind = match listener {
        Some(l) if l.l4 && l.tls => TcpPortKind::Tls,
        Some(l) if l.l4 => TcpPortKind::Tcp,
        Some(l) if l.tls => TcpPortKind::SharedWithHttps,
        Some(l) => {
            for mapping in members {
                diags.push(refuse(
                    mapping,
                    format!("port {port} belongs to the HTTP Listener {}", l.name),
                    "a TCPMapping needs a port of its own, or a TLS or HTTPS port with host",
                ));
            }
            return None;
        }
        None if http_default == Some(port) => {
            for mapping in members {
                diags.push(refuse(
                    mapping,
                    format!("port {port} is the HTTP listener pingress adds when no Listener is defined"),
                    "pick another port, or define the Listeners yourself",
                ));
            }
            return None;
        }
        // Emissary synthesizes the Listener: TLS when any TCPMapping
        // of the port names a host.
        None if members.iter().any(|m| m.sni.is_some()) => TcpPortKind::Tls,
        None => TcpPortKind::Tcp,
    };
    Some(kind)
}

/// The TCPMappings of `port` that fit it: bound to the port's `address`
/// (the first TCPMapping's), with a host exactly where the port routes by
/// SNI. The others are reported.
fn fitting<'m>(
    port: u16,
    kind: TcpPortKind,
    address: Option<IpAddr>,
    members: Vec<&'m TcpMapping>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<&'m TcpMapping> {
    let mut accepted: Vec<&TcpMapping> = Vec::new();
    for mapping in members {
        if mapping.address != address {
            diags.push(
                Diagnostic::error(
                    Location::Resource(mapping.id.clone()),
                    format!(
                        "port {port} is bound to {} by {}; one port has one address",
                        address.map_or("every address".to_string(), |a| a.to_string()),
                        accepted
                            .first()
                            .map_or("another TCPMapping", |m| m.name.as_str())
                    ),
                )
                .code(Code::Conflict)
                .field("spec.address"),
            );
            continue;
        }
        match (kind, &mapping.sni) {
            (TcpPortKind::Tcp, Some(_)) => diags.push(
                refuse(
                    mapping,
                    format!("port {port} is a cleartext TCP Listener, so host cannot be matched"),
                    "use a Listener with protocol TLS, or no Listener for this port",
                )
                .field("spec.host"),
            ),
            (TcpPortKind::Tls | TcpPortKind::SharedWithHttps, None) => diags.push(refuse(
                mapping,
                format!(
                    "port {port} terminates TLS and routes by SNI; this TCPMapping has no host"
                ),
                "without host a TCPMapping needs a cleartext port of its own",
            )),
            _ => accepted.push(mapping),
        }
    }
    accepted
}

/// A TCPMapping the port it asks for cannot take.
fn refuse(mapping: &TcpMapping, message: String, hint: &str) -> Diagnostic {
    Diagnostic::error(Location::Resource(mapping.id.clone()), message)
        .code(Code::Conflict)
        .field("spec.port")
        .hint(hint)
}

/// The TCPMappings of one port by the SNI they answer, in the order each
/// SNI first comes.
fn by_sni(accepted: Vec<&TcpMapping>) -> Vec<(Option<&str>, Vec<&TcpMapping>)> {
    let mut by_sni: Vec<(Option<&str>, Vec<&TcpMapping>)> = Vec::new();
    for mapping in accepted {
        let sni = mapping.sni.as_ref().map(|(name, _)| name.as_str());
        match by_sni.iter_mut().find(|(s, _)| *s == sni) {
            Some((_, group)) => group.push(mapping),
            None => by_sni.push((sni, vec![mapping])),
        }
    }
    by_sni
}

/// One canary set; `None` when its weights cannot be honoured.
fn group(
    sni: Option<&str>,
    members: &[&TcpMapping],
    clusters: &mut ClusterBuilder,
    diags: &mut Vec<Diagnostic>,
) -> Option<TcpGroup> {
    let members = weighted_first(members, |m| m.weight);
    let weights: Vec<Option<u32>> = members.iter().map(|m| m.weight).collect();
    let thresholds = match split(&weights) {
        Ok(thresholds) => thresholds,
        Err(total) => {
            for mapping in &members {
                diags.push(
                    Diagnostic::error(
                        Location::Resource(mapping.id.clone()),
                        format!(
                            "the weights of the TCPMappings on port {}{} add up to {total}, \
                             above 100; all of them are dropped",
                            mapping.port,
                            sni.map(|s| format!(" for host {s}")).unwrap_or_default()
                        ),
                    )
                    .code(Code::Conflict)
                    .field("spec.weight"),
                );
            }
            return None;
        }
    };
    let edge = match members[0].sni.as_ref() {
        None => None,
        Some((_, context)) => match EdgeTls::new(context.clone()) {
            Ok(edge) => Some(Arc::new(edge)),
            Err(e) => {
                diags.push(
                    Diagnostic::error(
                        Location::Resource(members[0].id.clone()),
                        format!("cannot prepare TLS with {}: {e}", context.name),
                    )
                    .field("spec.host"),
                );
                return None;
            }
        },
    };
    let routes = members
        .iter()
        .zip(thresholds)
        .map(|(mapping, threshold)| {
            let (cluster, problem) = clusters.cluster(
                ClusterKey {
                    originate_tls: mapping.originate_tls,
                    tls_identity: mapping.tls.as_ref().map(|t| t.identity),
                    connect_timeout_ms: CONNECT_TIMEOUT_MS,
                    breaker: mapping.breaker,
                    dns: DnsOptions {
                        ipv4: mapping.enable_ipv4,
                        ipv6: mapping.enable_ipv6,
                        ..DnsOptions::default()
                    },
                    tcp: true,
                    ..ClusterKey::of_service(mapping.service.clone())
                },
                mapping.tls.clone(),
            );
            if let Some(problem) = problem.map(|p| p.to_string()) {
                diags.push(
                    Diagnostic::warning(Location::Resource(mapping.id.clone()), problem)
                        .field("spec.service")
                        .hint("connections to this TCPMapping are closed until the name resolves"),
                );
            }
            let route = TcpRoute {
                mapping: mapping.name.clone(),
                cluster,
                idle_timeout: mapping.idle_timeout,
                metrics: metrics().tunnel(&mapping.name),
            };
            (threshold, Arc::new(route))
        })
        .collect();
    Some(TcpGroup {
        sni: sni.map(str::to_string),
        edge,
        members: routes,
    })
}
