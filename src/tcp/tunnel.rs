//! Serving the ports of TCPMappings. Each connection reads the current
//! snapshot, so a reload changes where the next connection goes; it picks
//! a TCPMapping (by the SNI its handshake saw where TLS is terminated),
//! connects with the cluster's prepared peer (TLS origination, client
//! certificate and verification as for HTTP Mappings), and copies bytes
//! both ways until both sides are done or the tunnel idles out.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{debug, info};
use pingora::apps::ServerApp;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::tls::ALPN;
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::tls::ssl::NameType;
use pingora::upstreams::peer::{HttpPeer, Peer, PeerOptions};
use pingora::utils::tls::CertKey;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::downstream::serve_for_life;
use crate::metrics::metrics;
use crate::model::AccessLog;
use crate::snapshot::Snapshot;
use crate::upstream::policy::check_negotiated;

use super::log::TunnelEntry;
use crate::snapshot::tcp::TcpRoute;

/// The app behind every port that carries TCPMappings. `H` serves the
/// HTTP side of a port shared with an HTTPS Listener.
pub struct TcpProxy<H> {
    snapshot: Arc<ArcSwap<Snapshot>>,
    connector: TransportConnector,
    http: Arc<H>,
}

impl<H> TcpProxy<H> {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, http: H, conf: &ServerConf) -> Self {
        TcpProxy {
            snapshot,
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
            http: Arc::new(http),
        }
    }
}

#[async_trait]
impl<H: ServerApp + Send + Sync + 'static> ServerApp for TcpProxy<H> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let started = Instant::now();
        let socket = stream.get_socket_digest();
        let port = socket
            .as_ref()
            .and_then(|d| d.local_addr())
            .and_then(SocketAddr::as_inet)
            .map(|a| a.port())?;
        let client = socket
            .as_ref()
            .and_then(|d| d.peer_addr())
            .map(ToString::to_string);
        let sni = stream
            .get_ssl()
            .and_then(|ssl| ssl.servername(NameType::HOST_NAME))
            .map(str::to_ascii_lowercase);
        let snapshot = self.snapshot.load_full();
        let route = snapshot
            .tcp_port(port)
            .and_then(|p| p.group(sni.as_deref()))
            .map(|group| group.pick(rand::thread_rng().gen_range(0..100)).clone());
        let mut entry = TunnelEntry {
            client,
            port,
            sni: sni.as_deref(),
            mapping: None,
            upstream: None,
            received: 0,
            sent: 0,
            duration: Duration::ZERO,
            note: "",
        };
        let Some(route) = route else {
            if snapshot.listener(port).is_some() {
                // An HTTPS Host's SNI on a shared port: the connection is
                // HTTP for its whole life, keep-alive included.
                drop(snapshot);
                serve_for_life(&self.http, stream, shutdown).await;
                return None;
            }
            metrics().tcp_refused("no_route");
            entry.note = "no TCPMapping for this port and SNI";
            log(&mut entry, snapshot.module.access_log, started);
            return None;
        };
        // A tunnel may last for days: it holds its route, not the whole
        // configuration it was routed by.
        let format = snapshot.module.access_log;
        drop(snapshot);
        entry.mapping = Some(&route.mapping);
        let outcome = self.serve(stream, &route, &mut entry).await;
        entry.note = outcome;
        log(&mut entry, format, started);
        None
    }

    async fn cleanup(&self) {
        self.http.cleanup().await;
    }
}

impl<H> TcpProxy<H> {
    /// Connects upstream and runs the tunnel; returns how it ended.
    async fn serve(
        &self,
        client: Stream,
        route: &TcpRoute,
        entry: &mut TunnelEntry<'_>,
    ) -> &'static str {
        let cluster = &route.cluster;
        let Some(_admission) = cluster.breaker().try_admit() else {
            metrics().tcp_refused("overloaded");
            metrics().upstream_error(&route.mapping, "overloaded");
            return "circuit breaker open: max_connections reached";
        };
        let Some(peer) = cluster.peer() else {
            metrics().upstream_error(&route.mapping, "no_endpoint");
            return "the service has no address";
        };
        entry.upstream = Some(peer.address().to_string());
        let peer = TunnelPeer {
            alpn: cluster.tls.as_ref().and_then(|t| t.alpn.clone()),
            peer,
        };
        let upstream = match self.connector.new_stream(&peer).await {
            Ok(upstream) => upstream,
            Err(e) => {
                debug!(
                    "TCPMapping {}: cannot connect to {peer}: {e}",
                    route.mapping
                );
                metrics().upstream_error(&route.mapping, "connect");
                return "upstream connect failed";
            }
        };
        if let (Some(tls), Some(ssl)) = (&cluster.tls, upstream.get_ssl_digest()) {
            if let Err(e) = check_negotiated(tls, &ssl.version, &ssl.cipher) {
                debug!("TCPMapping {}: {e}", route.mapping);
                metrics().upstream_error(&route.mapping, "tls_policy");
                return "upstream TLS outside the context's bounds";
            }
        }
        let _active = route.metrics.open();
        let counts = Counts::default();
        let outcome = tunnel(client, upstream, route, &counts).await;
        entry.received = counts.received.load(Ordering::Relaxed);
        entry.sent = counts.sent.load(Ordering::Relaxed);
        outcome
    }
}

fn log(entry: &mut TunnelEntry, format: AccessLog, started: Instant) {
    if log::log_enabled!(target: "access", log::Level::Info) {
        entry.duration = started.elapsed();
        info!(target: "access", "{}", entry.render(format));
    }
}

/// Bytes each way and the time of the last activity.
#[derive(Default)]
struct Counts {
    received: AtomicU64,
    sent: AtomicU64,
    /// Milliseconds since the tunnel opened.
    last_active: AtomicU64,
}

/// Copies both ways. When one side ends its writing, the other side's
/// writing is shut in turn, and the opposite direction goes on (a client
/// that half-closes still gets the reply). An error either way, or no
/// byte either way for the idle timeout, ends both.
async fn tunnel(
    client: Stream,
    upstream: Stream,
    route: &TcpRoute,
    counts: &Counts,
) -> &'static str {
    let opened = Instant::now();
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let metrics = &route.metrics;
    let upward = pump(client_read, upstream_write, opened, counts, |n| {
        counts.received.fetch_add(n as u64, Ordering::Relaxed);
        metrics.received(n);
    });
    let downward = pump(upstream_read, client_write, opened, counts, |n| {
        counts.sent.fetch_add(n as u64, Ordering::Relaxed);
        metrics.sent(n);
    });
    let both = async { tokio::try_join!(upward, downward) };
    tokio::select! {
        done = both => match done {
            Ok(_) => "closed",
            Err(_) => "reset",
        },
        () = idle(route.idle_timeout, opened, counts) => "idle timeout",
    }
}

const BUFFER: usize = 16 * 1024;

/// Copies `from` into `to` until `from` ends, then shuts `to` for writing.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    opened: Instant,
    counts: &Counts,
    count: impl Fn(usize),
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        to.flush().await?;
        count(n);
        counts
            .last_active
            .store(opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Resolves once nothing has moved for `timeout`; never without one.
async fn idle(timeout: Option<Duration>, opened: Instant, counts: &Counts) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let last = Duration::from_millis(counts.last_active.load(Ordering::Relaxed));
        let quiet = opened.elapsed().saturating_sub(last);
        if quiet >= timeout {
            return;
        }
        tokio::time::sleep(timeout - quiet).await;
    }
}

/// A cluster's prepared peer without its HTTP ALPN: a tunnel offers the
/// TLSContext's `alpn_protocols`, or nothing, since the bytes it carries
/// are not necessarily HTTP.
#[derive(Clone)]
struct TunnelPeer {
    peer: HttpPeer,
    alpn: Option<ALPN>,
}

impl fmt::Display for TunnelPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.peer.fmt(f)
    }
}

impl Peer for TunnelPeer {
    fn address(&self) -> &SocketAddr {
        self.peer.address()
    }

    fn tls(&self) -> bool {
        self.peer.tls()
    }

    fn sni(&self) -> &str {
        self.peer.sni()
    }

    fn reuse_hash(&self) -> u64 {
        self.peer.reuse_hash()
    }

    fn get_peer_options(&self) -> Option<&PeerOptions> {
        self.peer.get_peer_options()
    }

    fn get_mut_peer_options(&mut self) -> Option<&mut PeerOptions> {
        self.peer.get_mut_peer_options()
    }

    fn get_client_cert_key(&self) -> Option<&Arc<CertKey>> {
        self.peer.get_client_cert_key()
    }

    fn get_alpn(&self) -> Option<&ALPN> {
        self.alpn.as_ref()
    }
}
