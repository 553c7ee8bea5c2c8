//! The admin listener (`admin.listen`, loopback by default): Emissary's
//! liveness and readiness probes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

use diag::{DiagCache, Form};

pub const ALIVE_PATH: &str = "/ambassador/v0/check_alive";
pub const READY_PATH: &str = "/ambassador/v0/check_ready";
pub const DIAG_PATH: &str = "/ambassador/v0/diag/";
pub const METRICS_PATH: &str = "/metrics";

pub struct AdminApp {
    ready: Arc<AtomicBool>,
    live: Arc<Live>,
    diag: Mutex<DiagCache>,
}

impl AdminApp {
    pub fn new(ready: Arc<AtomicBool>, live: Arc<Live>) -> Self {
        AdminApp {
            ready,
            live,
            diag: Mutex::default(),
        }
    }

    fn diag(&self, session: &ServerSession, form: Form, content_type: &str) -> Response<Vec<u8>> {
        // Emissary's rule: the diag shows every route and error of the
        // configuration, so only a client on this host sees it unless the
        // Module's diagnostics.allow_non_local says otherwise.
        let local = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| is_loopback(a.ip()));
        if !local && !self.live.snapshot.load().module.diagnostics_allow_non_local {
            return text(
                403,
                "the diag answers loopback clients only (Module diagnostics.allow_non_local)",
            );
        }
        let body = self
            .diag
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&self.live, form);
        reply(200, content_type, body.as_str().to_owned())
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
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
                let form = if query_flag(query, "filter", "errors") {
                    Form::ErrorsJson
                } else {
                    Form::Json
                };
                self.diag(session, form, "application/json")
            }
            DIAG_PATH | "/ambassador/v0/diag" => {
                self.diag(session, Form::Text, "text/plain; charset=utf-8")
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
