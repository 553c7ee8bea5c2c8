//! Client connections: how many the gateway holds, and how long and how
//! much of a request head it waits for. Both wrap Pingora apps:
//!
//! - [`Admitted`] counts the open connections of every service it wraps
//!   and closes a new one at once beyond `max_connections`, or beyond
//!   `max_connections_per_client` from one client address;
//! - [`BoundedHttp`] puts each HTTP connection in a
//!   [`head::BoundedStream`], which bounds the request heads Pingora reads
//!   from it.

pub mod drain;
pub mod head;
pub mod tls;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::config::downstream::DownstreamConf;
use crate::metrics::metrics;
use drain::Drains;
use head::{BoundedStream, LimitSource};
use tls::EdgeHandshakes;

/// The connection caps, shared by every service that accepts clients.
#[derive(Debug)]
pub struct Gate {
    max: usize,
    per_client_max: Option<usize>,
    open: AtomicUsize,
    /// When a connection was last refused at `max`, in milliseconds since
    /// `origin`: idle connections give their places up while it is recent.
    last_refusal: AtomicU64,
    origin: Instant,
    /// Open connections per client, present only while it has some: at
    /// most `max` entries.
    per_client: Mutex<HashMap<ClientKey, usize>>,
}

/// Whom a per-client cap counts: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64, and would otherwise have 2^64 caps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    V6(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.into()),
                None => ClientKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl Gate {
    pub fn new(conf: &DownstreamConf) -> Gate {
        Gate {
            max: conf.max_connections,
            per_client_max: conf.max_connections_per_client,
            open: AtomicUsize::new(0),
            last_refusal: AtomicU64::new(u64::MAX),
            origin: Instant::now(),
            per_client: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a new connection from `client`, or why there is none.
    fn admit(self: &Arc<Self>, client: Option<IpAddr>) -> Result<Ticket, &'static str> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            });
        if taken.is_err() {
            self.last_refusal.store(self.now_ms(), Ordering::Relaxed);
            return Err("max_connections");
        }
        metrics().downstream.connections.inc();
        let mut ticket = Ticket {
            gate: self.clone(),
            client: None,
        };
        if let (Some(cap), Some(ip)) = (self.per_client_max, client) {
            let key = ClientKey::of(ip);
            let mut per_client = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
            let count = per_client.entry(key).or_insert(0);
            if *count >= cap {
                // The ticket drops without a client, giving back its
                // global place only.
                return Err("max_connections_per_client");
            }
            *count += 1;
            ticket.client = Some(key);
        }
        Ok(ticket)
    }
}

impl Gate {
    /// Whether connections were refused at `max` in the last two seconds.
    pub(crate) fn is_refusing(&self) -> bool {
        let last = self.last_refusal.load(Ordering::Relaxed);
        last != u64::MAX && self.now_ms().saturating_sub(last) < REFUSING_FOR_MS
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }
}

/// How long after a refusal idle connections give their places up.
const REFUSING_FOR_MS: u64 = 2000;

/// One admitted connection; its place is given back when it drops.
struct Ticket {
    gate: Arc<Gate>,
    client: Option<ClientKey>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(key) = self.client {
            let mut per_client = self
                .gate
                .per_client
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = per_client.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    per_client.remove(&key);
                }
            }
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        metrics().downstream.connections.dec();
    }
}

/// Runs `app` on a connection until it is not reused any more: Pingora
/// hands a kept-alive connection back for its next request.
pub(crate) async fn serve_for_life<A: ServerApp>(
    app: &Arc<A>,
    stream: Stream,
    shutdown: &ShutdownWatch,
) {
    let mut next = Some(stream);
    while let Some(stream) = next {
        next = app.process_new(stream, shutdown).await;
    }
}

/// What every client connection passes, in order: the [`Gate`], the TLS
/// handshake on TLS ports, and the watch that may end it early.
pub struct Door {
    pub gate: Arc<Gate>,
    pub handshakes: EdgeHandshakes,
    pub drains: Drains,
}

/// An app whose connections pass the [`Door`] first.
pub struct Admitted<A> {
    app: Arc<A>,
    door: Arc<Door>,
}

impl<A> Admitted<A> {
    pub fn new(app: A, door: Arc<Door>) -> Admitted<A> {
        Admitted {
            app: Arc::new(app),
            door,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Admitted<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(SocketAddr::as_inet).map(|a| a.ip()));
        let _ticket = match self.door.gate.admit(client) {
            Ok(ticket) => ticket,
            Err(cap) => {
                metrics().downstream_refused(cap);
                return None;
            }
        };
        let stream = match self.door.handshakes.accept(stream).await {
            Ok(stream) => stream,
            Err(unshaken) => {
                metrics().downstream_closed(unshaken.reason());
                return None;
            }
        };
        // The ticket must live as long as the connection, keep-alive
        // included, so the reuse loop runs here.
        let app = &self.app;
        self.door
            .drains
            .serve(stream, shutdown, |stream, own| async move {
                serve_for_life(app, stream, &own).await;
            })
            .await;
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}

/// An HTTP app whose connections bound their request heads.
pub struct BoundedHttp<A> {
    app: Arc<A>,
    limits: LimitSource,
    gate: Arc<Gate>,
}

impl<A> BoundedHttp<A> {
    pub fn new(app: A, limits: LimitSource, gate: Arc<Gate>) -> BoundedHttp<A> {
        BoundedHttp {
            app: Arc::new(app),
            limits,
            gate,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for BoundedHttp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let bounded = BoundedStream::new(stream, self.limits.clone(), self.gate.clone());
        serve_for_life(&self.app, Box::new(bounded), shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.app.cleanup().await;
    }
}
