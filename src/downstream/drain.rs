//! What ends a connection that is already serving, without waiting for its
//! next request: a WebSocket, a tunnel or an HTTP/2 connection may never
//! make one.
//!
//! Each connection gets a shutdown signal of its own, raised when the
//! server shuts down (as before), at a random moment within
//! `downstream.tls_drain_window_ms` after a reload leaves its TLS handshake
//! outdated, or at `downstream.max_connection_age_ms`. Pingora answers it
//! the way it answers a server shutdown: HTTP/2 sends GOAWAY and finishes
//! its streams, HTTP/1 closes after the current response. A connection the
//! current client-certificate policy refuses is closed at once; one past
//! its age is closed if it is still open a grace period after the signal,
//! as Envoy ends a connection at `max_connection_duration` after its drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use rand::Rng;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep, Instant};

use crate::metrics::metrics;
use crate::snapshot::Snapshot;
use crate::tls::edge::{EdgeSession, Standing};

/// What every connection's signal follows.
pub struct Drains {
    watch: Watch,
    max_age: Option<Duration>,
}

/// What a connection's watch reads; each watched connection has a task
/// with its own copy.
#[derive(Clone)]
struct Watch {
    snapshot: Arc<ArcSwap<Snapshot>>,
    swaps: watch::Receiver<()>,
    grace: Duration,
    tls_drain_window: Duration,
}

/// A TLS connection's handshake, and the port it came to.
struct Handshake {
    digest: Arc<SslDigest>,
    port: u16,
}

impl Handshake {
    fn of(stream: &Stream) -> Option<Handshake> {
        let digest = stream.get_ssl_digest()?;
        digest.extension.get::<EdgeSession>()?;
        let port = stream.get_socket_digest()?.local_addr()?.as_inet()?.port();
        Some(Handshake { digest, port })
    }

    fn standing(&self, snapshot: &Snapshot) -> Standing {
        let Some(edge) = self.digest.extension.get::<EdgeSession>() else {
            return Standing::Current;
        };
        edge.standing(snapshot.edge_tls(self.port, edge.sni.as_deref()))
    }
}

impl Drains {
    /// `swaps` changes when a new snapshot serves; `grace` is how long a
    /// connection past its age may take to finish; `tls_drain_window` how
    /// long after a reload outdated its handshake a connection is drained.
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        swaps: watch::Receiver<()>,
        max_age: Option<Duration>,
        tls_drain_window: Duration,
        grace: Duration,
    ) -> Drains {
        Drains {
            watch: Watch {
                snapshot,
                swaps,
                grace,
                tls_drain_window,
            },
            max_age,
        }
    }

    /// Runs `serve` on `stream` with the connection's own shutdown signal,
    /// until it is done or the connection must end.
    pub async fn serve<F, Fut>(&self, stream: Stream, shutdown: &ShutdownWatch, serve: F)
    where
        F: FnOnce(Stream, ShutdownWatch) -> Fut,
        Fut: Future<Output = ()>,
    {
        let handshake = Handshake::of(&stream);
        if handshake.is_none() && self.max_age.is_none() {
            // Nothing but the server's shutdown can end it early.
            return serve(stream, shutdown.clone()).await;
        }
        let (signal, own) = watch::channel(*shutdown.borrow());
        let (cut, must_end) = oneshot::channel();
        // The watch is a task of its own, so the connection's every wake
        // polls one cheap receiver, not the watch's timers and channels.
        tokio::spawn(self.watch.clone().run(
            handshake,
            self.max_age,
            signal,
            shutdown.clone(),
            cut,
        ));
        let must_end = async {
            match must_end.await {
                Ok(reason) => reason,
                // The watch is over without ending the connection.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            reason = must_end => metrics().downstream_closed(reason),
            () = serve(stream, own) => {}
        }
    }
}

impl Watch {
    /// Raises `signal` when the connection should end, and sends on `cut`
    /// why it must end now. Over when the connection is (its signal has no
    /// receiver left).
    async fn run(
        self,
        mut handshake: Option<Handshake>,
        max_age: Option<Duration>,
        signal: watch::Sender<bool>,
        mut shutdown: ShutdownWatch,
        cut: oneshot::Sender<&'static str>,
    ) {
        // Not marked as seen: a reload between the handshake and this
        // task's first poll must still be checked (the first check after
        // an earlier reload costs one comparison).
        let mut swaps = self.swaps.clone();
        let mut forwarding = true;
        let mut old_at = max_age.map(|age| Instant::now() + age);
        let mut outdated_at = None;
        let mut cut_at = None;
        let reason = loop {
            tokio::select! {
                () = signal.closed() => return,
                changed = swaps.changed(), if handshake.is_some() => {
                    let Some(held) = handshake.as_ref().filter(|_| changed.is_ok()) else {
                        // No more reloads to follow.
                        handshake = None;
                        continue;
                    };
                    match held.standing(&self.snapshot.load()) {
                        // Put back as it was: nothing to drain for.
                        Standing::Current => outdated_at = None,
                        Standing::Outdated => {
                            outdated_at.get_or_insert_with(|| self.drain_moment());
                        }
                        Standing::NoTls => break "host_gone",
                        Standing::CertificateNowRequired | Standing::CertificateRefused => {
                            break "client_policy"
                        }
                    }
                }
                changed = shutdown.changed(), if forwarding => {
                    forwarding = changed.is_ok();
                    if forwarding && *shutdown.borrow() {
                        signal.send_replace(true);
                    }
                }
                () = sleep_until(outdated_at), if outdated_at.is_some() => {
                    outdated_at = None;
                    signal.send_replace(true);
                }
                () = sleep_until(old_at), if old_at.is_some() => {
                    old_at = None;
                    signal.send_replace(true);
                    // A grace beyond any clock (a huge Pingora setting)
                    // never cuts.
                    cut_at = Instant::now().checked_add(self.grace);
                }
                () = sleep_until(cut_at), if cut_at.is_some() => break "max_connection_age",
            }
        };
        let _ = cut.send(reason);
    }
}

impl Watch {
    /// A moment within the drain window, drawn for each connection.
    fn drain_moment(&self) -> Instant {
        let window = u64::try_from(self.tls_drain_window.as_millis()).unwrap_or(u64::MAX);
        let delay = match window {
            0 => 0,
            window => rand::thread_rng().gen_range(0..window),
        };
        Instant::now() + Duration::from_millis(delay)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => sleep(at.saturating_duration_since(Instant::now())).await,
        None => std::future::pending().await,
    }
}
