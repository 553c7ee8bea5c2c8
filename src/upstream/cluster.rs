//! Clusters: the upstream endpoints of a service, with their `HttpPeer`s
//! prepared ahead of requests (TLS material attached, pool identity set),
//! and the load balancer that picks one per request.
//!
//! A cluster's endpoints sit behind an `ArcSwap`: background work (DNS
//! refresh, health checks) publishes a new [`Selection`]; a request reads
//! the current one without a lock and clones one peer.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderMap;
use pingora::protocols::tls::ALPN;
use pingora::protocols::TcpKeepalive;
use pingora::upstreams::peer::HttpPeer;

use crate::tls::TlsContext;
use crate::upstream::endpoints::{EndpointError, EndpointIndex};

use super::balancer::{Choice, Endpoint, EndpointState, Policy, RequestKey, Selection};
use super::breaker::{Breaker, Thresholds};
use super::dns::{self, DnsError, DnsOptions, DnsTarget, Lookup};
use super::health::{self, HealthCheck};
use super::service::ServiceAddr;
use super::trust::{self, Trust};

/// A snapshot's cluster: its name, and the state it shares with the
/// clusters of every other live snapshot that have the same identity.
#[derive(Debug)]
pub struct Cluster {
    /// e.g. `https://quote.default:443 tls=quote-context.default`.
    pub name: String,
    pub tls: Option<Arc<TlsContext>>,
    pub key: ClusterKey,
    state: Arc<ClusterState>,
}

/// What belongs to a cluster's identity, not to a snapshot: its endpoints
/// (with their health and load), the round-robin position, the circuit
/// breaker and the background tasks. While an old snapshot lives on (a
/// tunnel, a WebSocket, a long request), it shares these with the new one,
/// so reloads never multiply `max_connections` or probe an upstream twice.
#[derive(Debug)]
pub struct ClusterState {
    /// The name of the cluster that created it, for the tasks' log lines.
    name: String,
    tls: Option<Arc<TlsContext>>,
    key: ClusterKey,
    selection: ArcSwap<Selection>,
    next: AtomicUsize,
    breaker: Breaker,
    tasks_started: AtomicBool,
}

impl Cluster {
    /// The endpoint for this request. `None` when the service has no
    /// endpoints (the request gets a 503).
    pub fn choose(&self, request: &RequestKey) -> Option<Choice> {
        self.state.choose(request)
    }

    /// An endpoint for a connection with no request to hash on (a TCP
    /// tunnel, a call to an authorizer); least_request does not count it.
    pub fn peer(&self) -> Option<HttpPeer> {
        static NO_HEADERS: LazyLock<HeaderMap> = LazyLock::new(HeaderMap::new);
        let request = RequestKey {
            headers: &NO_HEADERS,
            client: None,
        };
        self.choose(&request).map(|choice| choice.peer)
    }

    /// The circuit breaker of the cluster's identity.
    pub fn breaker(&self) -> &Breaker {
        &self.state.breaker
    }

    pub fn endpoint_count(&self) -> usize {
        self.state.selection.load().endpoints.len()
    }

    /// Endpoints that pass their health checks (all, without checks).
    pub fn healthy_count(&self) -> usize {
        self.state
            .selection
            .load()
            .endpoints
            .iter()
            .filter(|e| e.state.healthy.load(Ordering::Relaxed))
            .count()
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.state.endpoints()
    }

    /// Whether two clusters share their identity's state.
    #[cfg(test)]
    pub(crate) fn shares_state_with(&self, other: &Cluster) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

impl ClusterState {
    /// Starts the background work of the identity (DNS refresh, health
    /// checks) on the current runtime, unless it runs already. The tasks
    /// end when no snapshot holds the identity any more.
    fn start_tasks(self: &Arc<Self>) {
        if self.tasks_started.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(target) = self.key.dns_target() {
            tokio::spawn(dns::run(Arc::downgrade(self), target));
        }
        if let Some(check) = &self.key.health_check {
            tokio::spawn(health::run(Arc::downgrade(self), check.clone()));
        }
    }

    fn choose(&self, request: &RequestKey) -> Option<Choice> {
        self.selection
            .load()
            .choose(&self.key.policy, &self.next, request)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.selection.load().endpoints.clone()
    }

    /// Publishes a new set of addresses. Addresses the cluster already had
    /// keep their prepared peer and their health and load.
    pub fn set_addresses(&self, addresses: &[SocketAddr]) {
        let current = self.selection.load();
        if current.endpoints.iter().map(|e| &e.address).eq(addresses) {
            return;
        }
        let endpoints = endpoints_for(
            addresses,
            &current.endpoints,
            &self.key,
            self.tls.as_deref(),
        );
        self.selection
            .store(Arc::new(Selection::new(endpoints, &self.key.policy)));
    }

    /// Rebuilds the selection when the health of an endpoint changed.
    pub fn refresh_health(&self) {
        let current = self.selection.load();
        if current.is_stale() {
            let endpoints = current.endpoints.clone();
            self.selection
                .store(Arc::new(Selection::new(endpoints, &self.key.policy)));
        }
    }
}

/// How a Mapping finds its upstream's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResolverKind {
    /// The service is a DNS name (or an IP address): one logical endpoint
    /// per address the name resolves to.
    Service,
    /// The service names a Kubernetes Service; its ready endpoints come
    /// from Endpoints and EndpointSlices.
    Endpoint,
    /// Consul's catalog, which pingress cannot query.
    Consul,
}

/// What makes two Mappings share a cluster (and its connection pool and
/// balancer state).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub service: ServiceAddr,
    /// Where the endpoints come from.
    pub resolver: ResolverKind,
    /// The Kubernetes namespace of a bare service name.
    pub namespace: String,
    pub originate_tls: bool,
    pub tls_identity: Option<u64>,
    /// The upstream is verified against the system trust store (TLS, no
    /// context CA, `upstream_tls: {verify: system}`). Set by
    /// [`ClusterBuilder::cluster`], whatever the caller wrote.
    pub system_trust: bool,
    pub connect_timeout_ms: u64,
    /// Speak HTTP/2 only (gRPC).
    pub h2_only: bool,
    /// Breakers are part of a cluster's identity, as in Emissary.
    pub breaker: Thresholds,
    /// So is the load balancer: two policies never share a balancer state.
    pub policy: Policy,
    pub health_check: Option<HealthCheck>,
    /// How the service resolver looks the name up.
    pub dns: DnsOptions,
    pub connections: ConnectionOptions,
    /// A TCPMapping's cluster counts tunnels, not requests, against its
    /// breaker, so it never shares one with HTTP Mappings.
    pub tcp: bool,
}

impl ClusterKey {
    /// A plain cleartext cluster of `service` through the service
    /// resolver, with every option at its default; callers set the rest.
    pub fn of_service(service: ServiceAddr) -> ClusterKey {
        ClusterKey {
            service,
            resolver: ResolverKind::Service,
            namespace: String::new(),
            originate_tls: false,
            tls_identity: None,
            system_trust: false,
            connect_timeout_ms: 3000,
            h2_only: false,
            breaker: Thresholds::default(),
            policy: Policy::default(),
            health_check: None,
            dns: DnsOptions::default(),
            connections: ConnectionOptions::default(),
            tcp: false,
        }
    }
}

/// How pooled upstream connections are kept (`cluster_idle_timeout_ms`,
/// `cluster_max_connection_lifetime_ms`, `keepalive`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ConnectionOptions {
    /// How long a pooled connection may sit idle; `None`: until the pool
    /// evicts it or the upstream closes it.
    pub idle_timeout: Option<Duration>,
    /// How old an HTTP/1 connection may be and still take a new request
    /// (Envoy's `max_connection_duration`); `None`: no limit.
    pub max_lifetime: Option<Duration>,
    pub keepalive: Option<Keepalive>,
}

/// TCP keepalive on upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: usize,
}

impl ClusterKey {
    /// The name DNS resolves for this cluster, if any.
    pub fn dns_target(&self) -> Option<DnsTarget> {
        (self.resolver == ResolverKind::Service && !self.service.is_ip()).then(|| DnsTarget {
            host: self.service.host.clone(),
            port: self.service.port,
            options: self.dns,
        })
    }
}

/// The state of every cluster identity a live snapshot holds (the serving
/// one, or an earlier one still draining), by identity: a snapshot built
/// after them takes a state over when one of its clusters has the same
/// identity. It is passed to each build by whoever builds snapshots one
/// after another (the pipeline's `LastGood`); a snapshot built alone
/// starts from an empty one. Entries whose last holder has gone are
/// dropped as snapshots are built.
#[derive(Default)]
pub struct ClusterStates {
    live: Mutex<HashMap<ClusterKey, Weak<ClusterState>>>,
    /// How many builds have registered their clusters.
    builds: AtomicUsize,
}

impl std::fmt::Debug for ClusterStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStates").finish_non_exhaustive()
    }
}

impl ClusterStates {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<ClusterKey, Weak<ClusterState>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_over(&self, key: &ClusterKey) -> Option<Arc<ClusterState>> {
        self.live().get(key).and_then(Weak::upgrade)
    }

    /// Starts the background work of every live identity that has none
    /// yet, if a build came after the one `seen` counts (which it then
    /// counts).
    pub fn start_tasks(&self, seen: &mut usize) {
        let builds = self.builds.load(Ordering::Acquire);
        if builds == *seen {
            return;
        }
        *seen = builds;
        let states: Vec<Arc<ClusterState>> =
            self.live().values().filter_map(Weak::upgrade).collect();
        for state in states {
            state.start_tasks();
        }
    }
}

/// Builds clusters for one snapshot.
pub struct ClusterBuilder<'m> {
    resolve: bool,
    index: &'m EndpointIndex,
    states: &'m ClusterStates,
    /// How upstreams without a CA of their own are verified.
    trust: Trust,
    clusters: HashMap<ClusterKey, Arc<Cluster>>,
    resolved: HashMap<DnsTarget, Lookup>,
}

impl<'m> ClusterBuilder<'m> {
    /// Without `resolve`, no name is looked up (`pingress -t`). Clusters
    /// take over the states in `states` that have their identity.
    pub fn new(resolve: bool, index: &'m EndpointIndex, states: &'m ClusterStates) -> Self {
        ClusterBuilder {
            resolve,
            index,
            states,
            trust: Trust::default(),
            clusters: HashMap::new(),
            resolved: HashMap::new(),
        }
    }

    /// Verifies upstreams without a CA of their own as `trust` says (the
    /// gateway file's `upstream_tls`).
    pub fn trusting(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// Resolves the names of the clusters to come, all at once and within
    /// a deadline, so that no name waits for another.
    pub fn prefetch(&mut self, keys: impl Iterator<Item = ClusterKey>) {
        if !self.resolve {
            return;
        }
        let mut targets: Vec<DnsTarget> = keys.filter_map(|k| k.dns_target()).collect();
        targets.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        targets.dedup();
        self.resolved = dns::resolve_all(targets, dns::FIRST_LOOKUP_DEADLINE);
    }

    /// Returns the cluster and, the first time it finds no endpoints, why.
    pub fn cluster(
        &mut self,
        mut key: ClusterKey,
        tls: Option<Arc<TlsContext>>,
    ) -> (Arc<Cluster>, Option<AddressError>) {
        // Part of the identity: a cluster verified differently never
        // inherits its predecessor's prepared peers.
        key.system_trust =
            trust::verifies_with_system(self.trust, key.originate_tls, tls.as_deref());
        if let Some(existing) = self.clusters.get(&key) {
            return (existing.clone(), None);
        }
        let previous = self.states.take_over(&key);
        let inherited = previous.as_ref().map(|p| p.endpoints()).unwrap_or_default();
        let (addresses, problem) = match self.addresses(&key) {
            Ok(addresses) => (addresses, None),
            // A name that fails to resolve keeps the addresses it had.
            Err(e) if key.dns_target().is_some() && !inherited.is_empty() => {
                (inherited.iter().map(|e| e.address).collect(), Some(e))
            }
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut name = key.service.to_string();
        if key.originate_tls && !key.service.https {
            name = name.replacen("http://", "https://", 1);
        }
        if let Some(tls) = &tls {
            name.push_str(&format!(" tls={}", tls.name));
        }
        let state = match previous {
            Some(state) => {
                state.set_addresses(&addresses);
                state
            }
            None => {
                let endpoints = endpoints_for(&addresses, &[], &key, tls.as_deref());
                Arc::new(ClusterState {
                    name: name.clone(),
                    tls: tls.clone(),
                    key: key.clone(),
                    selection: ArcSwap::from_pointee(Selection::new(endpoints, &key.policy)),
                    next: AtomicUsize::new(0),
                    breaker: Breaker::new(key.breaker),
                    tasks_started: AtomicBool::new(false),
                })
            }
        };
        let cluster = Arc::new(Cluster {
            name,
            tls,
            key: key.clone(),
            state,
        });
        self.clusters.insert(key, cluster.clone());
        (cluster, problem)
    }

    /// Every cluster built, registered as live.
    pub fn finish(self) -> Vec<Arc<Cluster>> {
        let mut live = self.states.live();
        for (key, cluster) in &self.clusters {
            live.insert(key.clone(), Arc::downgrade(&cluster.state));
        }
        live.retain(|_, state| state.strong_count() > 0);
        drop(live);
        self.states.builds.fetch_add(1, Ordering::Release);
        self.clusters.into_values().collect()
    }

    fn addresses(&self, key: &ClusterKey) -> Result<Vec<SocketAddr>, AddressError> {
        let service = &key.service;
        if let Ok(ip) = service.host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, service.port)]);
        }
        match (key.resolver, key.dns_target()) {
            (ResolverKind::Endpoint, _) => {
                let (name, namespace) = match service.host.split_once('.') {
                    Some((name, rest)) => (name, rest.split('.').next().unwrap_or(rest)),
                    None => (service.host.as_str(), key.namespace.as_str()),
                };
                let port = service.explicit_port.then_some(service.port);
                Ok(self.index.lookup(namespace, name, port)?)
            }
            (_, Some(target)) if self.resolve => match self.resolved.get(&target) {
                Some(lookup) => Ok(lookup.clone()?),
                None => Err(DnsError::NotLookedUp { host: target.host }.into()),
            },
            _ => Ok(Vec::new()),
        }
    }
}

/// Why a cluster has no addresses.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AddressError {
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Endpoints(#[from] EndpointError),
}

/// Endpoints for `addresses`, reusing what `known` has for an address.
fn endpoints_for(
    addresses: &[SocketAddr],
    known: &[Endpoint],
    key: &ClusterKey,
    tls: Option<&TlsContext>,
) -> Vec<Endpoint> {
    addresses
        .iter()
        .map(
            |address| match known.iter().find(|e| e.address == *address) {
                Some(endpoint) => endpoint.clone(),
                None => Endpoint {
                    address: *address,
                    peer: prepare_peer(*address, key, tls),
                    state: Arc::new(EndpointState::default()),
                },
            },
        )
        .collect()
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
    peer.options.idle_timeout = key.connections.idle_timeout;
    peer.options.tcp_keepalive = key.connections.keepalive.map(|k| TcpKeepalive {
        idle: k.idle,
        interval: k.interval,
        count: k.probes,
        // The system's default.
        #[cfg(target_os = "linux")]
        user_timeout: Duration::ZERO,
    });
    // Without a CA of the context's, Pingora's connectors verify against
    // the system trust store (OpenSSL's default verify paths).
    let verify = tls.is_some_and(|t| t.ca.is_some()) || key.system_trust;
    peer.options.verify_cert = verify;
    peer.options.verify_hostname = verify;
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
    if key.connections != ConnectionOptions::default() {
        // Pingora's pool key ignores the idle timeout, lifetime and keepalive:
        // without this, another cluster's connections (and limits) would be
        // shared.
        let mut hasher = std::hash::DefaultHasher::new();
        (peer.group_key, key.connections).hash(&mut hasher);
        peer.group_key = hasher.finish();
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, max_connections: usize) -> ClusterKey {
        let service = ServiceAddr::parse(&format!("127.0.0.1:{port}"), false, None)
            .expect("an address is a service");
        ClusterKey {
            breaker: Thresholds {
                max_connections,
                ..Thresholds::default()
            },
            ..ClusterKey::of_service(service)
        }
    }

    /// Two snapshots built one after the other, the first still alive.
    fn two_snapshots(first: ClusterKey, second: ClusterKey) -> (Arc<Cluster>, Arc<Cluster>) {
        let (index, states) = (EndpointIndex::default(), ClusterStates::default());
        let mut builder = ClusterBuilder::new(true, &index, &states);
        let (old, _) = builder.cluster(first, None);
        builder.finish();
        let mut builder = ClusterBuilder::new(true, &index, &states);
        let (new, _) = builder.cluster(second, None);
        builder.finish();
        (old, new)
    }

    #[test]
    fn live_snapshots_share_an_identity_s_breaker_and_endpoints() {
        let (old, new) = two_snapshots(key(40001, 1), key(40001, 1));
        assert!(old.shares_state_with(&new));
        let held = old.breaker().try_admit();
        assert!(held.is_some());
        assert!(new.breaker().try_admit().is_none(), "a second place");
        drop(held);
        assert!(new.breaker().try_admit().is_some());
    }

    #[test]
    fn another_identity_has_its_own_state() {
        let (old, new) = two_snapshots(key(40002, 1), key(40002, 2));
        assert!(!old.shares_state_with(&new));
    }

    #[test]
    fn an_identity_no_snapshot_holds_starts_afresh() {
        let (index, states) = (EndpointIndex::default(), ClusterStates::default());
        let mut builder = ClusterBuilder::new(true, &index, &states);
        let (gone, _) = builder.cluster(key(40003, 1), None);
        builder.finish();
        let _held = gone.breaker().try_admit();
        let gone_state = Arc::downgrade(&gone.state);
        drop(gone);
        assert!(gone_state.upgrade().is_none());
        let mut builder = ClusterBuilder::new(true, &index, &states);
        let (fresh, _) = builder.cluster(key(40003, 1), None);
        assert!(fresh.breaker().try_admit().is_some());
    }
}
