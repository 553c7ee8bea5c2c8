//! Clusters: the upstream endpoints of a service, with their `HttpPeer`s
//! prepared at compile time (TLS material attached, pool identity set).
//! The request path only clones a peer.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::protocols::tls::ALPN;
use pingora::protocols::TcpKeepalive;
use pingora::upstreams::peer::HttpPeer;

use crate::tls::TlsContext;

use super::breaker::{Breaker, Thresholds};
use super::service::ServiceAddr;

#[derive(Debug)]
pub struct Cluster {
    /// e.g. `https://quote.default:443 tls=quote-context.default`.
    pub name: String,
    pub tls: Option<Arc<TlsContext>>,
    pub breaker: Breaker,
    endpoints: Vec<HttpPeer>,
    next: AtomicUsize,
}

impl Cluster {
    /// The next endpoint's peer, round robin. `None` when the service has no
    /// endpoints (the request gets a 503).
    pub fn peer(&self) -> Option<HttpPeer> {
        if self.endpoints.is_empty() {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[index].clone())
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
}

/// What makes two Mappings share a cluster (and its connection pool).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub service: ServiceAddr,
    pub originate_tls: bool,
    pub tls_identity: Option<u64>,
    pub connect_timeout_ms: u64,
    /// Speak HTTP/2 only (gRPC).
    pub h2_only: bool,
    /// Breakers are part of a cluster's identity, as in Emissary.
    pub breaker: Thresholds,
    /// A TCPMapping's cluster counts tunnels, not requests, against its
    /// breaker, so it never shares one with HTTP Mappings.
    pub tcp: bool,
    /// `(enable_ipv4, enable_ipv6)` when they differ from the Module's.
    pub families: Option<(bool, bool)>,
    pub keepalive: Option<Keepalive>,
}

/// TCP keepalive on upstream connections (`keepalive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: usize,
}

impl Default for Keepalive {
    /// Linux's defaults, for what a `keepalive` leaves out (Envoy leaves
    /// them to the system too).
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(7200),
            interval: Duration::from_secs(75),
            probes: 9,
        }
    }
}

/// Builds clusters for one snapshot, resolving each host name once.
pub struct ClusterBuilder {
    enable_ipv4: bool,
    enable_ipv6: bool,
    resolve: bool,
    clusters: HashMap<ClusterKey, Arc<Cluster>>,
    resolved: HashMap<(String, u16), Result<Vec<SocketAddr>, String>>,
}

impl ClusterBuilder {
    /// Without `resolve`, clusters get no endpoints and no name is looked up.
    pub fn new(enable_ipv4: bool, enable_ipv6: bool, resolve: bool) -> Self {
        ClusterBuilder {
            enable_ipv4,
            enable_ipv6,
            resolve,
            clusters: HashMap::new(),
            resolved: HashMap::new(),
        }
    }

    /// Returns the cluster and, the first time a name fails to resolve, why.
    pub fn cluster(
        &mut self,
        key: ClusterKey,
        tls: Option<Arc<TlsContext>>,
    ) -> (Arc<Cluster>, Option<String>) {
        if let Some(existing) = self.clusters.get(&key) {
            return (existing.clone(), None);
        }
        let (addresses, problem) = match self.resolve {
            false => (Vec::new(), None),
            true => match self.lookup(&key) {
                Ok(addresses) => (addresses, None),
                Err(e) => (Vec::new(), Some(e)),
            },
        };
        let endpoints = addresses
            .iter()
            .map(|address| prepare_peer(*address, &key, tls.as_deref()))
            .collect();
        let mut name = key.service.to_string();
        if key.originate_tls && !key.service.https {
            name = name.replacen("http://", "https://", 1);
        }
        if let Some(tls) = &tls {
            name.push_str(&format!(" tls={}", tls.name));
        }
        let cluster = Arc::new(Cluster {
            name,
            tls,
            breaker: Breaker::new(key.breaker),
            endpoints,
            next: AtomicUsize::new(0),
        });
        self.clusters.insert(key, cluster.clone());
        (cluster, problem)
    }

    /// Resolution happens while a snapshot is compiled, never per request:
    /// Pingora's `HttpPeer::new` would block (and panic) on a failed lookup.
    fn lookup(&mut self, key: &ClusterKey) -> Result<Vec<SocketAddr>, String> {
        let service = &key.service;
        let (v4, v6) = key.families.unwrap_or((self.enable_ipv4, self.enable_ipv6));
        let found = self
            .resolved
            .entry((service.host.clone(), service.port))
            .or_insert_with(|| {
                (service.host.as_str(), service.port)
                    .to_socket_addrs()
                    .map(Iterator::collect)
                    .map_err(|e| format!("cannot resolve {}: {e}", service.host))
            })
            .clone()?;
        let mut usable: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| (a.is_ipv4() && v4) || (a.is_ipv6() && v6))
            .collect();
        // Emissary prefers IPv6 when both families are enabled.
        usable.sort_by_key(|a| a.is_ipv4());
        usable.dedup();
        if usable.is_empty() {
            return Err(format!(
                "{} resolves to no address of an enabled family ({} found; \
                 enable_ipv4={v4}, enable_ipv6={v6})",
                service.host,
                found.len()
            ));
        }
        Ok(usable)
    }
}

/// Concurrent streams on one upstream HTTP/2 connection; Pingora's default
/// of one would open a connection per call.
const H2_STREAMS: usize = 100;

fn prepare_peer(address: SocketAddr, key: &ClusterKey, tls: Option<&TlsContext>) -> HttpPeer {
    let service = &key.service;
    // Emissary sends no SNI unless the context names one; with an empty SNI
    // OpenSSL cannot verify, and many servers need SNI to pick a
    // certificate, so pingress defaults it to the service's host name.
    let default_sni = if service.is_ip() {
        String::new()
    } else {
        service.host.clone()
    };
    let sni = tls.and_then(|t| t.sni.clone()).unwrap_or(default_sni);
    let mut peer = HttpPeer::new(address, key.originate_tls, sni);
    let connect = Duration::from_millis(key.connect_timeout_ms);
    peer.options.connection_timeout = Some(connect);
    peer.options.total_connection_timeout = Some(connect);
    let verify = tls.is_some_and(|t| t.ca.is_some());
    peer.options.verify_cert = verify;
    peer.options.verify_hostname = verify;
    peer.options.tcp_keepalive = key.keepalive.map(|k| TcpKeepalive {
        idle: k.idle,
        interval: k.interval,
        count: k.probes,
        // The system's default.
        #[cfg(target_os = "linux")]
        user_timeout: Duration::ZERO,
    });
    if key.h2_only {
        // gRPC over h2 (or h2c in cleartext) multiplexes its calls.
        peer.options.alpn = ALPN::H2;
        peer.options.max_h2_streams = H2_STREAMS;
    }
    if let Some(tls) = tls {
        peer.client_cert_key = tls.cert_key.clone();
        peer.options.ca = tls.ca.clone();
        if !key.h2_only {
            peer.options.alpn = tls.alpn.clone().unwrap_or(ALPN::H1);
        }
        peer.options.curves = tls.curves.clone().map(Into::into);
        peer.group_key = tls.identity;
    }
    peer
}
