//! The admin listener (`admin.listen`, loopback by default): Emissary's
//! liveness and readiness probes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::metrics::metrics;
use crate::reload::Live;

mod diag;

pub const ALIVE_PATH: &str = "/ambassador/v0/check_alive";
pub const READY_PATH: &str = "/ambassador/v0/check_ready";
pub const DIAG_PATH: &str = "/ambassador/v0/diag/";
pub const METRICS_PATH: &str = "/metrics";

pub struct AdminApp {
    ready: Arc<AtomicBool>,
    live: Arc<Live>,
}

impl AdminApp {
    pub fn new(ready: Arc<AtomicBool>, live: Arc<Live>) -> Self {
        AdminApp { ready, live }
    }
}

fn reply(status: u16, content_type: &str, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

fn text(status: u16, body: &str) -> Response<Vec<u8>> {
    reply(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

fn query_flag(query: &str, key: &str, value: &str) -> bool {
    query
        .split('&')
        .any(|pair| pair.split_once('=') == Some((key, value)))
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let uri = &session.req_header().uri;
        let query = uri.query().unwrap_or("");
        match uri.path() {
            ALIVE_PATH => text(200, "pingress is alive and well"),
            DIAG_PATH | "/ambassador/v0/diag" if query_flag(query, "json", "true") => {
                let body = if query_flag(query, "filter", "errors") {
                    diag::errors_json(&self.live)
                } else {
                    diag::full_json(&self.live)
                };
                reply(200, "application/json", format!("{body:#}\n"))
            }
            DIAG_PATH | "/ambassador/v0/diag" => {
                reply(200, "text/plain; charset=utf-8", diag::text(&self.live))
            }
            METRICS_PATH => reply(200, "text/plain; version=0.0.4", metrics().render()),
            READY_PATH if self.ready.load(Ordering::Acquire) => {
                text(200, "pingress is ready and waiting")
            }
            READY_PATH => text(503, "pingress is not ready yet"),
            _ => text(404, "not found"),
        }
    }
}

/// Is a socket listening on this TCP port? Read from the kernel's socket
/// table rather than by connecting: a connection that closes without a TLS
/// handshake would be logged as a failed handshake on HTTPS listeners.
fn listening(port: u16) -> bool {
    const LISTEN: &str = "0A";
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace().skip(1);
                let local = fields.next().unwrap_or("");
                let state = fields.nth(1).unwrap_or("");
                state == LISTEN
                    && local
                        .rsplit_once(':')
                        .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
                        == Some(port)
            })
        })
    })
}

/// Marks the gateway ready once every proxy listener accepts connections,
/// so a probe never sends traffic to a port that is not bound yet.
pub struct ReadinessProbe {
    pub ports: Vec<u16>,
    pub ready: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for ReadinessProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        for port in &self.ports {
            loop {
                if listening(*port) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        self.ready.store(true, Ordering::Release);
    }
}
