//! TLS on client connections. Ports with HTTPS Hosts or TCPMapping hosts
//! listen in cleartext and shake hands here, after the connection has its
//! place at the [`Gate`](super::Gate) and under the head deadline: a client
//! that opens connections and never finishes a handshake holds places like
//! any other, and only for as long as it may take to send a head. (Pingora's
//! own TLS listeners shake hands before any app sees the connection, for up
//! to 60 s, outside every cap.)
//!
//! Which Host's certificate a handshake gets is read from the snapshot that
//! serves at that moment, so a reload reaches the next handshake.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::debug;
use openssl::error::ErrorStack;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::Stream;
use pingora::tls::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslMethod, SslOptions, SslSessionCacheMode,
};

use crate::snapshot::Snapshot;
use crate::throttle::throttled;
use crate::tls::edge::{check_identity_index, sni, EdgeSession, NoIdentityIndex};

/// The TLS of every port that has it, and how long a handshake may take.
pub struct EdgeHandshakes {
    ports: HashMap<u16, PortTls>,
    deadline: Duration,
}

struct PortTls {
    acceptor: SslAcceptor,
    hosts: HostChoice,
}

/// TLS ports that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerTlsError {
    #[error(transparent)]
    NoIdentityIndex(#[from] NoIdentityIndex),
    /// OpenSSL refused the port's acceptor or one of its settings.
    #[error("TLS listener on port {port}: {error}")]
    Port { port: u16, error: ErrorStack },
}

/// Why a connection ended before its handshake did, as the metric counts it.
pub enum Unshaken {
    Timeout,
    Failed,
}

impl Unshaken {
    pub fn reason(&self) -> &'static str {
        match self {
            Unshaken::Timeout => "handshake_timeout",
            Unshaken::Failed => "handshake_failed",
        }
    }
}

impl EdgeHandshakes {
    /// TLS for `ports`, whose Hosts come from `snapshot` at each handshake;
    /// each handshake must end within `deadline`.
    pub fn new(
        ports: impl IntoIterator<Item = u16>,
        snapshot: &Arc<ArcSwap<Snapshot>>,
        deadline: Duration,
    ) -> Result<EdgeHandshakes, ListenerTlsError> {
        check_identity_index()?;
        let ports = ports
            .into_iter()
            .map(|port| Ok((port, PortTls::new(port, snapshot)?)))
            .collect::<Result<_, ListenerTlsError>>()?;
        Ok(EdgeHandshakes { ports, deadline })
    }

    /// The connection as the app should read it: decrypted on a TLS port,
    /// as it came on the others.
    pub async fn accept(&self, stream: Stream) -> Result<Stream, Unshaken> {
        let port = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).map(|a| a.port()));
        let tls = match port {
            Some(port) => self.ports.get(&port),
            // Which port it came to decides whether it must be TLS: unknown,
            // it is refused wherever some port is.
            None if !self.ports.is_empty() => return Err(Unshaken::Failed),
            None => None,
        };
        let Some(tls) = tls else {
            return Ok(stream);
        };
        // TLS ports listen in cleartext, so the stream is Pingora's socket.
        let Ok(socket) = stream.into_any().downcast::<L4Stream>() else {
            throttled!(
                warn,
                "TLS on port {port:?}: the connection is not a plain socket"
            );
            return Err(Unshaken::Failed);
        };
        let handshake = handshake_with_callback(&tls.acceptor, *socket, &tls.hosts);
        match tokio::time::timeout(self.deadline, handshake).await {
            Ok(Ok(tls_stream)) => Ok(Box::new(tls_stream)),
            Ok(Err(e)) => {
                // Clients end handshakes at will: not worth a log line each.
                debug!("TLS handshake on port {port:?} failed: {e}");
                Err(Unshaken::Failed)
            }
            Err(_) => Err(Unshaken::Timeout),
        }
    }
}

impl PortTls {
    /// TLS for one port: certificates and client-certificate policy come
    /// from the current snapshot during each handshake, and so does ALPN
    /// (h2 only for Hosts whose context offers it).
    fn new(port: u16, snapshot: &Arc<ArcSwap<Snapshot>>) -> Result<PortTls, ListenerTlsError> {
        let problem = |error| ListenerTlsError::Port { port, error };
        let bounds = snapshot
            .load()
            .listener(port)
            .map(|l| l.tls_bounds.clone())
            .unwrap_or_default();
        // Mozilla's intermediate profile, as Pingora's TLS listeners use.
        let mut builder =
            SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(problem)?;
        // Resumption is decided before the SNI is looked at: a TLS 1.3
        // ticket from a Host without client certificates would otherwise
        // open a Host that requires them. Every connection does a full
        // handshake.
        builder.set_options(SslOptions::NO_TICKET);
        builder.set_num_tickets(0).map_err(problem)?;
        builder.set_session_cache_mode(SslSessionCacheMode::OFF);
        if bounds.min.is_some() {
            builder.set_min_proto_version(bounds.min).map_err(problem)?;
        }
        if bounds.max.is_some() {
            builder.set_max_proto_version(bounds.max).map_err(problem)?;
        }
        if let Some(curves) = &bounds.curves {
            builder.set_groups_list(curves).map_err(problem)?;
        }
        let alpn_snapshot = snapshot.clone();
        builder.set_alpn_select_callback(move |ssl, offered| {
            let name = sni(ssl);
            let snapshot = alpn_snapshot.load();
            if snapshot
                .tcp_port(port)
                .and_then(|p| p.group(name.as_deref()))
                .is_some()
            {
                // A tunnel's bytes are not necessarily HTTP.
                return Err(AlpnError::NOACK);
            }
            let h2 = snapshot
                .listener(port)
                .and_then(|l| l.tls_host(name.as_deref()))
                .is_some_and(|(_, edge)| edge.allows_h2());
            let ours: &[u8] = if h2 {
                b"\x02h2\x08http/1.1"
            } else {
                b"\x08http/1.1"
            };
            select_next_proto(ours, offered).ok_or(AlpnError::NOACK)
        });
        Ok(PortTls {
            acceptor: builder.build(),
            hosts: HostChoice {
                port,
                snapshot: snapshot.clone(),
            },
        })
    }
}

/// Picks the Host (or TCPMapping host) a handshake's SNI names.
struct HostChoice {
    port: u16,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

#[async_trait]
impl TlsAccept for HostChoice {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let snapshot = self.snapshot.load();
        let name = sni(ssl);
        let Some(edge) = snapshot.edge_tls(self.port, name.as_deref()) else {
            // No certificate: the handshake fails with an alert. A client
            // never gets a cleartext answer to a ClientHello.
            debug!("TLS on port {}: no TLS Host for SNI {name:?}", self.port);
            return;
        };
        if let Err(e) = edge.take_handshake(ssl) {
            // Every client that names this Host gets here: one line a
            // second says it.
            throttled!(
                warn,
                "TLS on port {}: cannot use {}: {e}",
                self.port,
                edge.context.name
            );
        }
    }

    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(Arc::new(EdgeSession::of_handshake(ssl)))
    }
}
